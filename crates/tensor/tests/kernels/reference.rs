//! Slow references: nested loops in f64, written for clarity, never for speed. Each returns the
//! result and, where useful, the sum of absolute terms, which bounds f32 rounding error.

use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4};
use tensor::Conv2dDims;

/// Deterministic pseudo-random values in [-1, 1) from a seed (SplitMix64).
pub struct Values(u64);

impl Values {
    pub fn new(seed: u64) -> Self {
        Values(seed)
    }

    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn array4(&mut self, shape: [usize; 4]) -> Array4<f32> {
        Array4::from_shape_simple_fn(shape, || self.next())
    }

    pub fn array2(&mut self, shape: (usize, usize)) -> Array2<f32> {
        Array2::from_shape_simple_fn(shape, || self.next())
    }

    pub fn array1(&mut self, len: usize) -> Array1<f32> {
        Array1::from_shape_simple_fn(len, || self.next())
    }
}

/// Asserts `|fast - exact| <= 1e-4 * (1 + bound)` elementwise, where `bound` is the sum of the
/// absolute values of the terms that made each element.
pub fn assert_close<D: ndarray::Dimension>(
    what: &str,
    fast: ndarray::ArrayView<'_, f32, D>,
    exact: ndarray::ArrayView<'_, f64, D>,
    bound: ndarray::ArrayView<'_, f64, D>,
) {
    assert_eq!(fast.shape(), exact.shape(), "{what}: shape");
    for ((index, &f), (&e, &b)) in fast.indexed_iter().zip(exact.iter().zip(bound.iter())) {
        let tolerance = 1e-4 * (1.0 + b);
        assert!(
            (f as f64 - e).abs() <= tolerance,
            "{what} at {index:?}: fast {f}, reference {e}, tolerance {tolerance}"
        );
    }
}

/// `alpha * A * B + beta * C`, and the bound `|alpha| * |A| * |B| + |beta * C|`.
pub fn gemm(
    alpha: f32,
    a: ArrayView2<'_, f32>,
    b: ArrayView2<'_, f32>,
    beta: f32,
    c: ArrayView2<'_, f32>,
) -> (Array2<f64>, Array2<f64>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let mut out = Array2::zeros((m, n));
    let mut bound = Array2::zeros((m, n));
    for i in 0..m {
        for j in 0..n {
            let (mut sum, mut abs) = (0.0f64, 0.0f64);
            for p in 0..k {
                let term = a[(i, p)] as f64 * b[(p, j)] as f64;
                sum += term;
                abs += term.abs();
            }
            // beta == 0 must not read C (it may be NaN).
            let from_c = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c[(i, j)] as f64
            };
            out[(i, j)] = alpha as f64 * sum + from_c;
            bound[(i, j)] = (alpha as f64).abs() * abs + from_c.abs();
        }
    }
    (out, bound)
}

/// The padded input value at (n, c, ih, iw) in padded coordinates, or 0 in the padding.
fn padded(
    x: &ArrayView4<'_, f32>,
    d: &Conv2dDims,
    n: usize,
    c: usize,
    ph: usize,
    pw: usize,
) -> f64 {
    match (ph.checked_sub(d.pad_top), pw.checked_sub(d.pad_left)) {
        (Some(ih), Some(iw)) if ih < d.in_h && iw < d.in_w => x[(n, c, ih, iw)] as f64,
        _ => 0.0,
    }
}

/// Direct convolution: y[n, o, oh, ow] = b[o] + sum over c, kh, kw of w * x_padded.
pub fn conv_forward(
    d: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    w: ArrayView4<'_, f32>,
    b: Option<ArrayView1<'_, f32>>,
) -> (Array4<f64>, Array4<f64>) {
    let shape = d.output_shape();
    let mut y = Array4::zeros(shape);
    let mut bound = Array4::zeros(shape);
    for n in 0..d.batch {
        for o in 0..d.out_channels {
            for oh in 0..d.out_h() {
                for ow in 0..d.out_w() {
                    let bias = b.map_or(0.0, |b| b[o] as f64);
                    let (mut sum, mut abs) = (bias, bias.abs());
                    for c in 0..d.in_channels {
                        for kh in 0..d.kernel_h {
                            for kw in 0..d.kernel_w {
                                let v =
                                    padded(&x, d, n, c, oh * d.stride_h + kh, ow * d.stride_w + kw);
                                let term = w[(o, c, kh, kw)] as f64 * v;
                                sum += term;
                                abs += term.abs();
                            }
                        }
                    }
                    y[(n, o, oh, ow)] = sum;
                    bound[(n, o, oh, ow)] = abs;
                }
            }
        }
    }
    (y, bound)
}

/// The three gradients of the direct convolution, each with its bound: (dx, dw, db).
#[allow(clippy::type_complexity)]
pub fn conv_backward(
    d: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    w: ArrayView4<'_, f32>,
    dy: ArrayView4<'_, f32>,
) -> (
    (Array4<f64>, Array4<f64>),
    (Array4<f64>, Array4<f64>),
    (Array1<f64>, Array1<f64>),
) {
    let mut dx = Array4::<f64>::zeros(d.input_shape());
    let mut dx_bound = Array4::<f64>::zeros(d.input_shape());
    let mut dw = Array4::<f64>::zeros(d.weight_shape());
    let mut dw_bound = Array4::<f64>::zeros(d.weight_shape());
    let mut db = Array1::<f64>::zeros(d.out_channels);
    let mut db_bound = Array1::<f64>::zeros(d.out_channels);
    for n in 0..d.batch {
        for o in 0..d.out_channels {
            for oh in 0..d.out_h() {
                for ow in 0..d.out_w() {
                    let g = dy[(n, o, oh, ow)] as f64;
                    db[o] += g;
                    db_bound[o] += g.abs();
                    for c in 0..d.in_channels {
                        for kh in 0..d.kernel_h {
                            for kw in 0..d.kernel_w {
                                let (ph, pw) = (oh * d.stride_h + kh, ow * d.stride_w + kw);
                                let v = padded(&x, d, n, c, ph, pw);
                                dw[(o, c, kh, kw)] += g * v;
                                dw_bound[(o, c, kh, kw)] += (g * v).abs();
                                if let (Some(ih), Some(iw)) =
                                    (ph.checked_sub(d.pad_top), pw.checked_sub(d.pad_left))
                                    && ih < d.in_h
                                    && iw < d.in_w
                                {
                                    let term = g * w[(o, c, kh, kw)] as f64;
                                    dx[(n, c, ih, iw)] += term;
                                    dx_bound[(n, c, ih, iw)] += term.abs();
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    ((dx, dx_bound), (dw, dw_bound), (db, db_bound))
}
