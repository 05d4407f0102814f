//! Batch normalization's kernels over `[N, C, S]` values (S pixels per channel; 1 for the
//! features of a dense layer): per-channel statistics, the normalization, and its gradient.
//!
//! A channel's values lie in N rows of S, one per image. Statistics run in parallel over
//! channels and the elementwise passes over images; every value is computed by one thread in a
//! fixed order, so the bits do not depend on the thread count. Sums accumulate in f64 (a
//! channel holds up to tens of thousands of values) over eight lanes, which the compiler keeps
//! in vector registers.

use ndarray::{ArrayView1, ArrayView3, ArrayViewMut1, ArrayViewMut3};
use rayon::prelude::*;

use crate::error::{TensorError, expect_shape};

/// Two sums over each channel's values, `f(c, x, y)` summed pairwise over two operands of one
/// shape, in one pass.
fn channel_sums(
    x: &[f32],
    y: &[f32],
    [images, channels, pixels]: [usize; 3],
    f: impl Fn(usize, f32, f32) -> [f64; 2] + Sync,
) -> Vec<[f64; 2]> {
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mut lanes = [[0.0f64; 8]; 2];
            let mut rest = [0.0f64; 2];
            for n in 0..images {
                let start = (n * channels + c) * pixels;
                let (xs, ys) = (&x[start..start + pixels], &y[start..start + pixels]);
                let (x_chunks, x_tail) = xs.as_chunks::<8>();
                let (y_chunks, y_tail) = ys.as_chunks::<8>();
                for (xc, yc) in x_chunks.iter().zip(y_chunks) {
                    for lane in 0..8 {
                        let [a, b] = f(c, xc[lane], yc[lane]);
                        lanes[0][lane] += a;
                        lanes[1][lane] += b;
                    }
                }
                for (&xv, &yv) in x_tail.iter().zip(y_tail) {
                    let [a, b] = f(c, xv, yv);
                    rest[0] += a;
                    rest[1] += b;
                }
            }
            [
                lanes[0].iter().sum::<f64>() + rest[0],
                lanes[1].iter().sum::<f64>() + rest[1],
            ]
        })
        .collect()
}

/// An operand's values, which must be in standard layout.
fn slice<'a>(
    op: &'static str,
    operand: &'static str,
    a: &'a ArrayView3<'_, f32>,
) -> Result<&'a [f32], TensorError> {
    a.as_slice().ok_or(TensorError::Layout { op, operand })
}

/// A per-channel operand's values, which must be one per channel.
fn per_channel(
    op: &'static str,
    operand: &str,
    a: &ArrayView1<'_, f32>,
    channels: usize,
) -> Result<Vec<f32>, TensorError> {
    expect_shape(op, operand, a.shape(), &[channels])?;
    Ok(a.to_vec())
}

/// Each channel's mean and biased variance, in one pass over the values.
///
/// Sums of `x - K` and its square, with K the channel's first value: shifted so, the variance's
/// `E[d^2] - E[d]^2` loses no precision to a mean far from zero (in f64, from f32 inputs).
pub fn channel_mean_var(x: ArrayView3<'_, f32>) -> Result<(Vec<f64>, Vec<f64>), TensorError> {
    const OP: &str = "channel_mean_var";
    let (n, c, s) = x.dim();
    let shape = [n, c, s];
    let values = slice(OP, "input", &x)?;
    let count = (n * s) as f64;
    let shifts: Vec<f64> = (0..c)
        .map(|channel| values.get(channel * s).map_or(0.0, |&v| f64::from(v)))
        .collect();
    let sums = channel_sums(values, values, shape, |channel, v, _| {
        let d = f64::from(v) - shifts[channel];
        [d, d * d]
    });
    let mean = (0..c).map(|k| shifts[k] + sums[k][0] / count).collect();
    let var = sums
        .iter()
        .map(|&[sum, squares]| {
            let m = sum / count;
            (squares / count - m * m).max(0.0)
        })
        .collect();
    Ok((mean, var))
}

/// Writes `y = gamma[c] * (x - mean[c]) * inv_std[c] + beta[c]`.
pub fn batch_norm_forward(
    x: ArrayView3<'_, f32>,
    mut y: ArrayViewMut3<'_, f32>,
    mean: ArrayView1<'_, f32>,
    inv_std: ArrayView1<'_, f32>,
    gamma: ArrayView1<'_, f32>,
    beta: ArrayView1<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_forward";
    let (_, channels, pixels) = x.dim();
    expect_shape(OP, "output", y.shape(), x.shape())?;
    let mean = per_channel(OP, "mean", &mean, channels)?;
    let inv_std = per_channel(OP, "inv_std", &inv_std, channels)?;
    let gamma = per_channel(OP, "gamma", &gamma, channels)?;
    let beta = per_channel(OP, "beta", &beta, channels)?;
    let xs = slice(OP, "input", &x)?;
    let ys = y.as_slice_mut().ok_or(TensorError::Layout {
        op: OP,
        operand: "output",
    })?;
    let image = (channels * pixels).max(1);
    ys.par_chunks_mut(image)
        .zip(xs.par_chunks(image))
        .for_each(|(yi, xi)| {
            for (c, (yc, xc)) in yi
                .chunks_mut(pixels.max(1))
                .zip(xi.chunks(pixels.max(1)))
                .enumerate()
            {
                let (m, is, g, b) = (mean[c], inv_std[c], gamma[c], beta[c]);
                for (yv, &xv) in yc.iter_mut().zip(xc) {
                    *yv = g * ((xv - m) * is) + b;
                }
            }
        });
    Ok(())
}

/// `x <- scale[c] * x + shift[c]` in place: evaluation's normalization with running statistics
/// folded into one scale and shift per channel.
pub fn scale_channels(
    mut x: ArrayViewMut3<'_, f32>,
    scale: ArrayView1<'_, f32>,
    shift: ArrayView1<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "scale_channels";
    let (_, channels, pixels) = x.dim();
    let scale = per_channel(OP, "scale", &scale, channels)?;
    let shift = per_channel(OP, "shift", &shift, channels)?;
    let xs = x.as_slice_mut().ok_or(TensorError::Layout {
        op: OP,
        operand: "input",
    })?;
    xs.par_chunks_mut((channels * pixels).max(1))
        .for_each(|xi| {
            for (c, xc) in xi.chunks_mut(pixels.max(1)).enumerate() {
                let (a, b) = (scale[c], shift[c]);
                xc.iter_mut().for_each(|v| *v = a * *v + b);
            }
        });
    Ok(())
}

/// The gradient of batch normalization with batch statistics, from the forward pass's input `x`
/// and statistics (`x_hat = (x - mean) * inv_std`). Adds `sum(dy * x_hat)` to `dgamma` and
/// `sum(dy)` to `dbeta` per channel; with `input_grad`, turns `dy` into the input's gradient in
/// place: `dx = gamma * inv_std / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat))` with M the
/// values per channel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    mut dy: ArrayViewMut3<'_, f32>,
    x: ArrayView3<'_, f32>,
    mean: ArrayView1<'_, f32>,
    inv_std: ArrayView1<'_, f32>,
    gamma: ArrayView1<'_, f32>,
    mut dgamma: ArrayViewMut1<'_, f32>,
    mut dbeta: ArrayViewMut1<'_, f32>,
    input_grad: bool,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_backward";
    let shape @ [images, channels, pixels] = {
        let (n, c, s) = dy.dim();
        [n, c, s]
    };
    expect_shape(OP, "input", x.shape(), dy.shape())?;
    expect_shape(OP, "dgamma", dgamma.shape(), &[channels])?;
    expect_shape(OP, "dbeta", dbeta.shape(), &[channels])?;
    let mean = per_channel(OP, "mean", &mean, channels)?;
    let inv_std = per_channel(OP, "inv_std", &inv_std, channels)?;
    let gamma = per_channel(OP, "gamma", &gamma, channels)?;
    let xs = slice(OP, "input", &x)?;
    let g = dy.as_slice().ok_or(TensorError::Layout {
        op: OP,
        operand: "output gradient",
    })?;
    // Per channel: sum(dy) and sum(dy * x_hat).
    let sums = channel_sums(g, xs, shape, |c, g, x| {
        let g = f64::from(g);
        [g, g * f64::from((x - mean[c]) * inv_std[c])]
    });
    for (c, &[sum_dy, sum_dy_xhat]) in sums.iter().enumerate() {
        dgamma[c] += sum_dy_xhat as f32;
        dbeta[c] += sum_dy as f32;
    }
    if !input_grad {
        return Ok(());
    }
    let count = (images * pixels) as f32;
    let coefficients: Vec<[f32; 3]> = (0..channels)
        .map(|c| {
            let [sum_dy, sum_dy_xhat] = sums[c];
            [
                gamma[c] * inv_std[c] / count,
                sum_dy as f32,
                sum_dy_xhat as f32,
            ]
        })
        .collect();
    let gs = dy.as_slice_mut().ok_or(TensorError::Layout {
        op: OP,
        operand: "output gradient",
    })?;
    let image = (channels * pixels).max(1);
    gs.par_chunks_mut(image)
        .zip(xs.par_chunks(image))
        .for_each(|(gi, xi)| {
            for (c, (gc, xc)) in gi
                .chunks_mut(pixels.max(1))
                .zip(xi.chunks(pixels.max(1)))
                .enumerate()
            {
                let [scale, sd, sdx] = coefficients[c];
                let (m, is) = (mean[c], inv_std[c]);
                for (g, &x) in gc.iter_mut().zip(xc) {
                    *g = scale * (count * *g - sd - (x - m) * is * sdx);
                }
            }
        });
    Ok(())
}
