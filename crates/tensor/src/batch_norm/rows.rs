//! The per-row loops of the batch-normalization kernels, compiled for each instruction set (see
//! `simd.rs`): one row is one image's values of one channel. Plain multiplies and adds, never
//! fused (Rust does not contract them), so every instruction set gives the same bits.

use super::{Coefficients, InputGradient};
use crate::pool::{Pool2dDims, max_pool_plane};
use crate::simd::dispatched;
use crate::vector::Simd;

/// Eight f64 lanes and a remainder for each of two sums: the summation order of every channel
/// sum of the batch normalization.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Sums {
    lanes: [[f64; 8]; 2],
    rest: [f64; 2],
}

impl Sums {
    /// The two totals.
    pub(super) fn total(&self) -> [f64; 2] {
        [
            self.lanes[0].iter().sum::<f64>() + self.rest[0],
            self.lanes[1].iter().sum::<f64>() + self.rest[1],
        ]
    }

    /// Adds `f` of each pair of values of `xs` and `ys` (of one length).
    #[inline(always)]
    fn add(&mut self, xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> [f64; 2]) {
        let (x_chunks, x_tail) = xs.as_chunks::<8>();
        let (y_chunks, y_tail) = ys.as_chunks::<8>();
        for (xc, yc) in x_chunks.iter().zip(y_chunks) {
            for lane in 0..8 {
                let [a, b] = f(xc[lane], yc[lane]);
                self.lanes[0][lane] += a;
                self.lanes[1][lane] += b;
            }
        }
        for (&xv, &yv) in x_tail.iter().zip(y_tail) {
            let [a, b] = f(xv, yv);
            self.rest[0] += a;
            self.rest[1] += b;
        }
    }
}

dispatched! {
    /// Adds `d = x - shift` and `d * d` of a row's values to `sums`.
    fn add_moments(sums: &mut Sums, xs: &[f32], shift: f64) => add_moments_body;
}

#[inline(always)]
fn add_moments_body<S: Simd, const LANES: usize>(_: S, sums: &mut Sums, xs: &[f32], shift: f64) {
    sums.add(xs, xs, |v, _| {
        let d = f64::from(v) - shift;
        [d, d * d]
    });
}

dispatched! {
    /// Adds `dz` and `dz * x_hat` of a row to `sums`, with `dz` the gradient `dy` through the
    /// ReLU when `relu` (0 where the output was not positive).
    fn add_gradients(sums: &mut Sums, dy: &[f32], xs: &[f32], k: Coefficients, relu: bool)
        => add_gradients_body;
}

#[inline(always)]
fn add_gradients_body<S: Simd, const LANES: usize>(
    _: S,
    sums: &mut Sums,
    dy: &[f32],
    xs: &[f32],
    k: Coefficients,
    relu: bool,
) {
    let f = |g: f32, x: f32| {
        let g = f64::from(k.dz(g, x, relu));
        [g, g * f64::from(k.x_hat(x))]
    };
    sums.add(dy, xs, f);
}

dispatched! {
    /// `y = gamma * x_hat + beta` of a row, then `max(y, 0)` when `relu`.
    fn normalize(xs: &[f32], ys: &mut [f32], k: Coefficients, relu: bool) => normalize_body;
}

#[inline(always)]
fn normalize_body<S: Simd, const LANES: usize>(
    _: S,
    xs: &[f32],
    ys: &mut [f32],
    k: Coefficients,
    relu: bool,
) {
    for (y, &x) in ys.iter_mut().zip(xs) {
        let v = k.output(x);
        *y = if relu { v.max(0.0) } else { v };
    }
}

dispatched! {
    /// The input's gradient of a row from the output's gradient `dy`, through the ReLU when
    /// `relu`, written over the input `xs` it is computed from.
    fn input_gradient_over_input(dy: &[f32], xs: &mut [f32], k: Coefficients, d: InputGradient, relu: bool)
        => input_gradient_over_input_body;
}

#[inline(always)]
fn input_gradient_over_input_body<S: Simd, const LANES: usize>(
    _: S,
    dy: &[f32],
    xs: &mut [f32],
    k: Coefficients,
    d: InputGradient,
    relu: bool,
) {
    for (x, &g) in xs.iter_mut().zip(dy) {
        *x = d.dx(k.dz(g, *x, relu), k.x_hat(*x));
    }
}

dispatched! {
    /// The input's gradient of a row from the output's gradient `g`, written over `g`, through
    /// the ReLU when `relu`.
    fn input_gradient_in_place(g: &mut [f32], xs: &[f32], k: Coefficients, d: InputGradient, relu: bool)
        => input_gradient_in_place_body;
}

#[inline(always)]
fn input_gradient_in_place_body<S: Simd, const LANES: usize>(
    _: S,
    g: &mut [f32],
    xs: &[f32],
    k: Coefficients,
    d: InputGradient,
    relu: bool,
) {
    for (g, &x) in g.iter_mut().zip(xs) {
        *g = d.dx(k.dz(*g, x, relu), k.x_hat(x));
    }
}

dispatched! {
    /// The max pooling of one plane's normalized, activated values `max(gamma * x_hat + beta,
    /// 0)` into `y`, with where each maximum came from into `argmax`.
    fn normalize_and_pool(pool: &Pool2dDims, xs: &[f32], y: &mut [f32], argmax: &mut [u32], k: Coefficients)
        => normalize_and_pool_body;
}

#[inline(always)]
fn normalize_and_pool_body<S: Simd, const LANES: usize>(
    _: S,
    pool: &Pool2dDims,
    xs: &[f32],
    y: &mut [f32],
    argmax: &mut [u32],
    k: Coefficients,
) {
    max_pool_plane(pool, xs, y, argmax, |v| k.output(v).max(0.0));
}
