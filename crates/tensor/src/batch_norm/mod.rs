//! Batch normalization's kernels over `[N, C, S]` values (S pixels per channel; 1 for the
//! features of a dense layer): per-channel statistics, the normalization (optionally with the
//! ReLU after it, or the ReLU and a max pooling: `pooled.rs`), and their gradients.
//!
//! A channel's values lie in N rows of S, one per image. Statistics run in parallel over
//! channels and the elementwise passes over images; every value is computed by one thread in a
//! fixed order, so the bits do not depend on the thread count. Sums accumulate in f64 (a
//! channel holds up to tens of thousands of values) over eight lanes, which the compiler keeps
//! in vector registers.
//!
//! Why fused: BatchNorm, ReLU and pooling each read and write the whole activation, and on a
//! CPU that memory traffic, not arithmetic, is their cost. The fused passes give the same bits
//! as the layers run one by one.

mod pooled;
mod rows;

pub use pooled::{batch_norm_relu_max_pool_backward, batch_norm_relu_max_pool_forward};

use ndarray::{
    ArrayBase, ArrayView1, ArrayView3, ArrayViewMut1, ArrayViewMut3, Data, DataMut, Dimension,
};
use rayon::prelude::*;

use crate::error::{TensorError, expect_shape};
use rows::Sums;

/// A batch's normalization of each channel: `y = gamma * ((x - mean) * inv_std) + beta`.
#[derive(Clone, Copy, Debug)]
pub struct ChannelNormalization<'a> {
    /// The mean subtracted.
    pub mean: ArrayView1<'a, f32>,
    /// 1 / sqrt(variance + eps).
    pub inv_std: ArrayView1<'a, f32>,
    /// The learned scale.
    pub gamma: ArrayView1<'a, f32>,
    /// The learned shift.
    pub beta: ArrayView1<'a, f32>,
}

/// One channel's coefficients, copied out of a checked [`ChannelNormalization`].
#[derive(Clone, Copy, Debug)]
struct Coefficients {
    mean: f32,
    inv_std: f32,
    gamma: f32,
    beta: f32,
}

impl Coefficients {
    /// The normalized value `x_hat`, as the forward pass computes it.
    #[inline(always)]
    fn x_hat(&self, x: f32) -> f32 {
        (x - self.mean) * self.inv_std
    }

    /// The layer's output before any ReLU.
    #[inline(always)]
    fn output(&self, x: f32) -> f32 {
        self.gamma * self.x_hat(x) + self.beta
    }

    /// The gradient before the ReLU when `relu`: `dy`, or 0 where the output was not positive.
    #[inline(always)]
    fn dz(&self, dy: f32, x: f32, relu: bool) -> f32 {
        if !relu || self.output(x) > 0.0 {
            dy
        } else {
            0.0
        }
    }
}

impl ChannelNormalization<'_> {
    /// The coefficients of each of `channels` channels, or a shape error naming the operand.
    fn coefficients(
        &self,
        op: &'static str,
        channels: usize,
    ) -> Result<Vec<Coefficients>, TensorError> {
        for (name, operand) in [
            ("mean", &self.mean),
            ("inv_std", &self.inv_std),
            ("gamma", &self.gamma),
            ("beta", &self.beta),
        ] {
            expect_shape(op, name, operand.shape(), &[channels])?;
        }
        Ok((0..channels)
            .map(|c| Coefficients {
                mean: self.mean[c],
                inv_std: self.inv_std[c],
                gamma: self.gamma[c],
                beta: self.beta[c],
            })
            .collect())
    }
}

/// Two sums over each channel's values, in parallel over channels: `add(sums, c, x_row,
/// y_row)` adds one row pair of channel `c` (rows of `x` and `y`, of one shape).
fn channel_sums(
    x: &[f32],
    y: &[f32],
    [images, channels, pixels]: [usize; 3],
    add: impl Fn(&mut Sums, usize, &[f32], &[f32]) + Sync,
) -> Vec<[f64; 2]> {
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let mut sums = Sums::default();
            for n in 0..images {
                let rows = (n * channels + c) * pixels..(n * channels + c + 1) * pixels;
                add(&mut sums, c, &x[rows.clone()], &y[rows]);
            }
            sums.total()
        })
        .collect()
}

/// An operand's values, which must be in standard layout.
fn slice<'a, S: Data, D: Dimension>(
    op: &'static str,
    operand: &'static str,
    a: &'a ArrayBase<S, D>,
) -> Result<&'a [S::Elem], TensorError> {
    a.as_slice().ok_or(TensorError::Layout { op, operand })
}

/// An operand's values, mutable, which must be in standard layout.
fn slice_mut<'a, S: DataMut, D: Dimension>(
    op: &'static str,
    operand: &'static str,
    a: &'a mut ArrayBase<S, D>,
) -> Result<&'a mut [S::Elem], TensorError> {
    a.as_slice_mut().ok_or(TensorError::Layout { op, operand })
}

/// Each channel's mean and biased variance, in one pass over the values.
///
/// Sums of `x - K` and its square, with K the channel's first value: shifted so, the variance's
/// `E[d^2] - E[d]^2` loses no precision to a mean far from zero (in f64, from f32 inputs).
pub fn channel_mean_var(x: ArrayView3<'_, f32>) -> Result<(Vec<f64>, Vec<f64>), TensorError> {
    const OP: &str = "channel_mean_var";
    let (n, c, s) = x.dim();
    let values = slice(OP, "input", &x)?;
    let count = (n * s) as f64;
    let shifts: Vec<f64> = (0..c)
        .map(|channel| values.get(channel * s).map_or(0.0, |&v| f64::from(v)))
        .collect();
    let sums = channel_sums(values, values, [n, c, s], |sums, channel, row, _| {
        rows::add_moments(sums, row, shifts[channel]);
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

/// Writes `y = gamma * ((x - mean) * inv_std) + beta` per channel, then `max(y, 0)` with `relu`.
pub fn batch_norm_forward(
    x: ArrayView3<'_, f32>,
    mut y: ArrayViewMut3<'_, f32>,
    normalization: ChannelNormalization<'_>,
    relu: bool,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_forward";
    let (_, channels, pixels) = x.dim();
    expect_shape(OP, "output", y.shape(), x.shape())?;
    let coefficients = normalization.coefficients(OP, channels)?;
    let xs = slice(OP, "input", &x)?;
    let ys = slice_mut(OP, "output", &mut y)?;
    let image = (channels * pixels).max(1);
    ys.par_chunks_mut(image)
        .zip(xs.par_chunks(image))
        .for_each(|(yi, xi)| {
            let rows = yi.chunks_mut(pixels.max(1)).zip(xi.chunks(pixels.max(1)));
            for (&k, (yc, xc)) in coefficients.iter().zip(rows) {
                rows::normalize(xc, yc, k, relu);
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
    expect_shape(OP, "scale", scale.shape(), &[channels])?;
    expect_shape(OP, "shift", shift.shape(), &[channels])?;
    let (scale, shift) = (scale.to_vec(), shift.to_vec());
    let xs = slice_mut(OP, "input", &mut x)?;
    xs.par_chunks_mut((channels * pixels).max(1))
        .for_each(|xi| {
            for (c, xc) in xi.chunks_mut(pixels.max(1)).enumerate() {
                let (a, b) = (scale[c], shift[c]);
                xc.iter_mut().for_each(|v| *v = a * *v + b);
            }
        });
    Ok(())
}

/// What the gradient of the normalization's input needs per channel.
#[derive(Clone, Copy, Debug)]
struct InputGradient {
    /// gamma * inv_std / M, with M the values per channel.
    scale: f32,
    /// M.
    count: f32,
    /// sum(dz).
    sum_dz: f32,
    /// sum(dz * x_hat).
    sum_dz_xhat: f32,
}

impl InputGradient {
    /// `dx = gamma * inv_std / M * (M * dz - sum(dz) - x_hat * sum(dz * x_hat))`.
    #[inline(always)]
    fn dx(&self, dz: f32, x_hat: f32) -> f32 {
        self.scale * (self.count * dz - self.sum_dz - x_hat * self.sum_dz_xhat)
    }
}

/// Adds each channel's parameter gradients (`sum(dz * x_hat)` to `dgamma`, `sum(dz)` to
/// `dbeta`) from its sums, and returns what the input's gradient needs.
fn parameter_grads(
    sums: &[[f64; 2]],
    coefficients: &[Coefficients],
    count: usize,
    mut dgamma: ArrayViewMut1<'_, f32>,
    mut dbeta: ArrayViewMut1<'_, f32>,
) -> Vec<InputGradient> {
    let count = count as f32;
    sums.iter()
        .zip(coefficients)
        .enumerate()
        .map(|(c, (&[sum_dz, sum_dz_xhat], k))| {
            dgamma[c] += sum_dz_xhat as f32;
            dbeta[c] += sum_dz as f32;
            InputGradient {
                scale: k.gamma * k.inv_std / count,
                count,
                sum_dz: sum_dz as f32,
                sum_dz_xhat: sum_dz_xhat as f32,
            }
        })
        .collect()
}

/// The gradient of [`batch_norm_forward`] with batch statistics, from the forward pass's input
/// `x` and `normalization` (`x_hat = (x - mean) * inv_std`), through the ReLU with `relu`
/// (recomputed from `x`: no mask is kept). Adds `sum(dz * x_hat)` to `dgamma` and `sum(dz)` to
/// `dbeta` per channel, with `dz` the gradient before the ReLU; with `input_grad`, turns `dy`
/// into the input's gradient in place:
/// `dx = gamma * inv_std / M * (M * dz - sum(dz) - x_hat * sum(dz * x_hat))`, M the values per
/// channel.
pub fn batch_norm_backward(
    mut dy: ArrayViewMut3<'_, f32>,
    x: ArrayView3<'_, f32>,
    normalization: ChannelNormalization<'_>,
    relu: bool,
    dgamma: ArrayViewMut1<'_, f32>,
    dbeta: ArrayViewMut1<'_, f32>,
    input_grad: bool,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_backward";
    let (images, channels, pixels) = dy.dim();
    expect_shape(OP, "input", x.shape(), dy.shape())?;
    expect_shape(OP, "dgamma", dgamma.shape(), &[channels])?;
    expect_shape(OP, "dbeta", dbeta.shape(), &[channels])?;
    let coefficients = normalization.coefficients(OP, channels)?;
    let xs = slice(OP, "input", &x)?;
    let g = slice(OP, "output gradient", &dy)?;
    let sums = channel_sums(g, xs, [images, channels, pixels], |sums, c, g, x| {
        rows::add_gradients(sums, g, x, coefficients[c], relu);
    });
    let per_channel = parameter_grads(&sums, &coefficients, images * pixels, dgamma, dbeta);
    if !input_grad {
        return Ok(());
    }
    let gs = slice_mut(OP, "output gradient", &mut dy)?;
    let image = (channels * pixels).max(1);
    gs.par_chunks_mut(image)
        .zip(xs.par_chunks(image))
        .for_each(|(gi, xi)| {
            let rows = gi.chunks_mut(pixels.max(1)).zip(xi.chunks(pixels.max(1)));
            for ((&k, &d), (gc, xc)) in coefficients.iter().zip(&per_channel).zip(rows) {
                rows::input_gradient_in_place(gc, xc, k, d, relu);
            }
        });
    Ok(())
}
