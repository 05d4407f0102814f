//! Elementwise activations, forward and backward side by side, both in place: forward turns `x`
//! into `y`, backward turns the output gradient into the input gradient. Each backward takes the
//! forward's *output* `y`, which is all these derivatives need, so the input need not be kept.
//! Large arrays are split across threads; elementwise work gives the same bits either way.

use ndarray::{ArrayView, ArrayViewMut, Dimension, Zip};
use rayon::prelude::*;

use crate::error::{TensorError, expect_shape};
use crate::simd::dispatched;
use crate::vector::Simd;

/// `x = max(x, 0)`.
pub fn relu<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    // Spelled out, as in `relu_keeping_signs`: `max(0.0)` may return either zero for -0.0.
    map_inplace(x, |v| *v = if *v > 0.0 { *v } else { 0.0 });
}

/// `grad`: `dy` in, `dx` out, with `dx = dy` where `y > 0`, else 0 (the subgradient at 0 is 0,
/// as in PyTorch).
pub fn relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward(
        "relu_backward",
        y,
        grad,
        |y, g| if y > 0.0 { g } else { 0.0 },
    )
}

/// Values of a ReLU's output each [`relu_keeping_signs`] word holds the signs of.
const VALUES_PER_SIGN_WORD: usize = 64;

/// The words of a [`relu_keeping_signs`] mask for `len` values.
pub fn sign_words(len: usize) -> usize {
    len.div_ceil(VALUES_PER_SIGN_WORD)
}

/// [`relu`] of `x`, writing into `signs` ([`sign_words`] of them) bit `i % 64` of word
/// `i / 64` set where output `i` is above 0: all [`relu_backward_from_signs`] needs.
///
/// Why: a ReLU layer kept a copy of its output for its backward pass, a second pass over the
/// activation and a copy as large; the signs are a 32nd of it. (A ReLU not fused into a
/// convolution, as after the first layer of PyTorch's MNIST example: on 64 x 32 x 28 x 28,
/// forward 0.38 ms and backward 0.25 ms with the copy.)
pub fn relu_keeping_signs(x: &mut [f32], signs: &mut [u64]) -> Result<(), TensorError> {
    expect_shape(
        "relu_keeping_signs",
        "signs",
        &[signs.len()],
        &[sign_words(x.len())],
    )?;
    let words_at_once = PARALLEL_MIN_LEN / VALUES_PER_SIGN_WORD;
    let chunk = words_at_once * VALUES_PER_SIGN_WORD;
    if x.len() >= PARALLEL_MIN_LEN {
        x.par_chunks_mut(chunk)
            .zip(signs.par_chunks_mut(words_at_once))
            .for_each(|(x, signs)| relu_signs(x, signs));
    } else {
        relu_signs(x, signs);
    }
    Ok(())
}

/// `grad`: `dy` in, `dx` out, with `dx = dy` where `signs` (of [`relu_keeping_signs`]) has the
/// bit set, else 0: the same values as [`relu_backward`] from the output.
pub fn relu_backward_from_signs(signs: &[u64], grad: &mut [f32]) -> Result<(), TensorError> {
    expect_shape(
        "relu_backward_from_signs",
        "signs",
        &[signs.len()],
        &[sign_words(grad.len())],
    )?;
    let words_at_once = PARALLEL_MIN_LEN / VALUES_PER_SIGN_WORD;
    let chunk = words_at_once * VALUES_PER_SIGN_WORD;
    if grad.len() >= PARALLEL_MIN_LEN {
        grad.par_chunks_mut(chunk)
            .zip(signs.par_chunks(words_at_once))
            .for_each(|(grad, signs)| mask_by_signs(signs, grad));
    } else {
        mask_by_signs(signs, grad);
    }
    Ok(())
}

dispatched! {
    /// [`relu_keeping_signs`] on one thread.
    fn relu_signs(x: &mut [f32], signs: &mut [u64]) => relu_signs_body;
}

#[inline(always)]
fn relu_signs_body<S: Simd, const LANES: usize>(_: S, x: &mut [f32], signs: &mut [u64]) {
    for (x, word) in x.chunks_mut(VALUES_PER_SIGN_WORD).zip(signs) {
        let mut bits = 0u64;
        for (i, v) in x.iter_mut().enumerate() {
            // Spelled out, as in `relu`: `max(0.0)` may return either zero for -0.0 (compiled
            // here for SSE2 it kept the sign, where `relu`'s loop dropped it).
            let above = *v > 0.0;
            *v = if above { *v } else { 0.0 };
            bits |= u64::from(above) << i;
        }
        *word = bits;
    }
}

dispatched! {
    /// [`relu_backward_from_signs`] on one thread.
    fn mask_by_signs(signs: &[u64], grad: &mut [f32]) => mask_by_signs_body;
}

#[inline(always)]
fn mask_by_signs_body<S: Simd, const LANES: usize>(_: S, signs: &[u64], grad: &mut [f32]) {
    for (grad, &word) in grad.chunks_mut(VALUES_PER_SIGN_WORD).zip(signs) {
        for (i, g) in grad.iter_mut().enumerate() {
            if word >> i & 1 == 0 {
                *g = 0.0;
            }
        }
    }
}

/// `x = x` where `x > 0`, else `slope * x`.
pub fn leaky_relu<D: Dimension>(x: ArrayViewMut<'_, f32, D>, slope: f32) {
    map_inplace(x, |v| {
        if *v <= 0.0 {
            *v *= slope;
        }
    });
}

/// `grad`: `dy` in, `dx` out, with `dx = dy` where `y > 0`, else `slope * dy`; `slope` must be
/// positive, so that `y`'s sign is `x`'s.
pub fn leaky_relu_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
    slope: f32,
) -> Result<(), TensorError> {
    if slope.is_nan() || slope <= 0.0 {
        return Err(TensorError::Config {
            op: "leaky_relu_backward",
            detail: format!("slope {slope} must be positive to recover the sign of x from y"),
        });
    }
    backward("leaky_relu_backward", y, grad, |y, g| {
        if y > 0.0 { g } else { slope * g }
    })
}

/// `x = 1 / (1 + exp(-x))`, computed without overflow for large `|x|`.
pub fn sigmoid<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    map_curve(x, Curve::Sigmoid);
}

/// `grad`: `dy` in, `dx = dy * y * (1 - y)` out.
pub fn sigmoid_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("sigmoid_backward", y, grad, |y, g| g * y * (1.0 - y))
}

/// `x = tanh(x)`.
pub fn tanh<D: Dimension>(x: ArrayViewMut<'_, f32, D>) {
    map_curve(x, Curve::Tanh);
}

/// Which of the exponential curves [`map_curve`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Curve {
    Sigmoid,
    Tanh,
}

/// [`sigmoid`] or [`tanh`] of every value of `x`: contiguous values through [`curve_values`],
/// compiled for the CPU's vectors, others one by one with the same function (the same bits).
///
/// Why not `f32::tanh` and `f32::exp`: they are calls into libm, one value at a time. The
/// classic LeNet-5 (tanh after every layer) spent 1.4 ms of its 3.6 ms step in the tanh of
/// its first layer's 64 x 6 x 28 x 28 outputs.
fn map_curve<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>, curve: Curve) {
    let Some(values) = x.as_slice_memory_order_mut() else {
        let f = match curve {
            Curve::Sigmoid => sigmoid_value,
            Curve::Tanh => tanh_value,
        };
        map_inplace(x, |v| *v = f(*v));
        return;
    };
    if values.len() >= PARALLEL_MIN_LEN {
        values
            .par_chunks_mut(PARALLEL_MIN_LEN / 2)
            .for_each(|values| curve_values(values, curve));
    } else {
        curve_values(values, curve);
    }
}

dispatched! {
    /// [`map_curve`] of some values on one thread.
    fn curve_values(values: &mut [f32], curve: Curve) => curve_values_body;
}

#[inline(always)]
fn curve_values_body<S: Simd, const LANES: usize>(_: S, values: &mut [f32], curve: Curve) {
    match curve {
        Curve::Sigmoid => values.iter_mut().for_each(|v| *v = sigmoid_value(*v)),
        Curve::Tanh => values.iter_mut().for_each(|v| *v = tanh_value(*v)),
    }
}

/// e^x for x <= 0, within about 1 ulp, by Cephes' `expf`: x = n ln 2 + r with |r| <= ln 2 / 2,
/// a degree-6 polynomial for e^r, and 2^n put in the exponent bits. Below -87, where e^x is
/// under 2^-125, it returns 0. Only additions, multiplications and bit moves, so the
/// compiler vectorizes it and every instruction set gives the same bits.
#[inline(always)]
fn exp_non_positive(x: f32) -> f32 {
    const LOWEST: f32 = -87.0;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (for |v| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits (Cody and Waite).
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let clamped = if x > LOWEST { x } else { LOWEST };
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let e_r = p * (r * r) + r + 1.0;
    // n is in [-126, 0]: 2^n is a normal number.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x > LOWEST { e_r * two_n } else { 0.0 }
}

/// The logistic function, from e^-|x| so that nothing overflows; NaN stays NaN.
#[inline(always)]
fn sigmoid_value(x: f32) -> f32 {
    let e = exp_non_positive(-x.abs());
    let s = if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    if x.is_nan() { x } else { s }
}

/// tanh, as Cephes' `tanhf`: an odd polynomial below |x| = 0.625, else (1 - e) / (1 + e) with
/// e = e^(-2|x|), and the sign of x; NaN stays NaN.
#[inline(always)]
fn tanh_value(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_988_7e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z
            - 3.333_328e-1)
            * z
            * x
            + x;
    // (The polynomial's sum loses the sign of -0.0; tanh keeps the sign of x everywhere.)
    let small = small.copysign(x);
    let e = exp_non_positive(-2.0 * a);
    let large = ((1.0 - e) / (1.0 + e)).copysign(x);
    if x.is_nan() {
        x
    } else if a < 0.625 {
        small
    } else {
        large
    }
}

/// `grad`: `dy` in, `dx = dy * (1 - y^2)` out.
pub fn tanh_backward<D: Dimension>(
    y: ArrayView<'_, f32, D>,
    grad: ArrayViewMut<'_, f32, D>,
) -> Result<(), TensorError> {
    backward("tanh_backward", y, grad, |y, g| g * (1.0 - y * y))
}

/// Elementwise work on at least this many values is split across threads; below it, handing
/// it off costs more than the pass.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// `f` applied to every value of `x`.
fn map_inplace<D: Dimension>(mut x: ArrayViewMut<'_, f32, D>, f: impl Fn(&mut f32) + Sync + Send) {
    if x.len() >= PARALLEL_MIN_LEN {
        x.par_map_inplace(f);
    } else {
        x.map_inplace(f);
    }
}

/// `grad = f(y, grad)` elementwise, after checking the shapes agree.
fn backward<D: Dimension>(
    op: &'static str,
    y: ArrayView<'_, f32, D>,
    mut grad: ArrayViewMut<'_, f32, D>,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<(), TensorError> {
    expect_shape(op, "output gradient", grad.shape(), y.shape())?;
    let zip = Zip::from(&mut grad).and(&y);
    let apply = |g: &mut f32, &y: &f32| *g = f(y, *g);
    if y.len() >= PARALLEL_MIN_LEN {
        zip.par_for_each(apply);
    } else {
        zip.for_each(apply);
    }
    Ok(())
}
