//! Batch normalization, ReLU and max pooling in one pass, and its gradient from the argmax.
//!
//! The normalized, activated plane is never written out: each plane is pooled as it is
//! normalized, and the backward pass rebuilds each plane's gradient (a quarter of it nonzero
//! under 2x2 pooling) in a cache-sized scratch row instead of reading a whole-batch one.

use ndarray::{ArrayView4, ArrayViewMut1, ArrayViewMut4};
use rayon::prelude::*;

use super::rows::{self, Sums};
use super::{ChannelNormalization, parameter_grads, slice, slice_mut};
use crate::conv::{NO_GRADIENT, check_argmax, unpool_plane};
use crate::error::{TensorError, expect_shape};
use crate::pool::Pool2dDims;

/// Checks that `pool` pools `x`'s planes into `y`'s.
fn check_shapes(
    op: &'static str,
    pool: &Pool2dDims,
    x: &[usize],
    y: &[usize],
) -> Result<(), TensorError> {
    expect_shape(op, "input", x, &pool.input_shape())?;
    expect_shape(op, "output", y, &pool.output_shape())
}

/// `y = max_pool(relu(batch_norm(x)))` per channel, with `argmax` (when training) where each
/// maximum came from in its `[H, W]` input plane, or [`NO_GRADIENT`] where the pooled value is
/// not positive. The same bits as [`super::batch_norm_forward`] with its ReLU, then
/// [`crate::max_pool2d_forward`].
pub fn batch_norm_relu_max_pool_forward(
    x: ArrayView4<'_, f32>,
    pool: &Pool2dDims,
    normalization: ChannelNormalization<'_>,
    mut y: ArrayViewMut4<'_, f32>,
    argmax: Option<ArrayViewMut4<'_, u32>>,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_relu_max_pool_forward";
    check_shapes(OP, pool, x.shape(), y.shape())?;
    let channels = pool.channels;
    let coefficients = normalization.coefficients(OP, channels)?;
    let xs = slice(OP, "input", &x)?;
    let (plane, out_plane) = (pool.in_h * pool.in_w, pool.out_h() * pool.out_w());
    let ys = slice_mut(OP, "output", &mut y)?;
    let pool_one = |index: usize, x: &[f32], y: &mut [f32], argmax: &mut [u32]| {
        rows::normalize_and_pool(pool, x, y, argmax, coefficients[index % channels]);
    };
    match argmax {
        Some(mut argmax) => {
            expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
            let argmax = slice_mut(OP, "argmax", &mut argmax)?;
            xs.par_chunks(plane.max(1))
                .zip(ys.par_chunks_mut(out_plane.max(1)))
                .zip(argmax.par_chunks_mut(out_plane.max(1)))
                .enumerate()
                .for_each(|(index, ((x, y), argmax))| {
                    pool_one(index, x, y, argmax);
                    for (y, a) in y.iter().zip(argmax.iter_mut()) {
                        *a = if *y <= 0.0 { NO_GRADIENT } else { *a };
                    }
                });
        }
        // Inference keeps no argmax: each task pools into a scratch plane of its own.
        None => xs
            .par_chunks(plane.max(1))
            .zip(ys.par_chunks_mut(out_plane.max(1)))
            .enumerate()
            .for_each_init(
                || vec![0u32; out_plane],
                |scratch, (index, (x, y))| pool_one(index, x, y, scratch),
            ),
    }
    Ok(())
}

/// The gradient of [`batch_norm_relu_max_pool_forward`] with batch statistics, given the pooled
/// output's gradient `dy` and the `argmax` the forward pass wrote: adds the parameter
/// gradients to `dgamma` and `dbeta`, and with `input_grad` turns the forward pass's input `x`
/// into its gradient in place. The same bits as [`crate::max_pool2d_backward`],
/// [`crate::relu_backward`] and [`super::batch_norm_backward`] in turn.
///
/// In place because the input is the largest array of the layer (four times its pooled
/// output) and nothing needs it after this pass: a fresh array for its gradient cost more in
/// page faults than the arithmetic of the whole pass.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_max_pool_backward(
    dy: ArrayView4<'_, f32>,
    argmax: ArrayView4<'_, u32>,
    pool: &Pool2dDims,
    mut x: ArrayViewMut4<'_, f32>,
    normalization: ChannelNormalization<'_>,
    dgamma: ArrayViewMut1<'_, f32>,
    dbeta: ArrayViewMut1<'_, f32>,
    input_grad: bool,
) -> Result<(), TensorError> {
    const OP: &str = "batch_norm_relu_max_pool_backward";
    check_shapes(OP, pool, x.shape(), dy.shape())?;
    expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
    let (images, channels) = (pool.batch, pool.channels);
    expect_shape(OP, "dgamma", dgamma.shape(), &[channels])?;
    expect_shape(OP, "dbeta", dbeta.shape(), &[channels])?;
    let coefficients = normalization.coefficients(OP, channels)?;
    let (plane, out_plane) = (pool.in_h * pool.in_w, pool.out_h() * pool.out_w());
    let (dys, argmaxes) = (
        slice(OP, "output gradient", &dy)?,
        slice(OP, "argmax", &argmax)?,
    );
    let xs = slice_mut(OP, "input", &mut x)?;
    check_argmax(OP, argmaxes, plane, "input")?;
    // The gradient before the ReLU of plane `index`, rebuilt into `dz`.
    let unpool = |index: usize, dz: &mut [f32]| {
        let out = index * out_plane..(index + 1) * out_plane;
        unpool_plane(&dys[out.clone()], &argmaxes[out], dz);
    };
    let sums: Vec<[f64; 2]> = {
        let xs = &*xs;
        (0..channels)
            .into_par_iter()
            .map(|c| {
                let mut sums = Sums::default();
                let mut dz = vec![0.0f32; plane];
                for n in 0..images {
                    let index = n * channels + c;
                    unpool(index, &mut dz);
                    let x = &xs[index * plane..(index + 1) * plane];
                    // The ReLU is in the argmax already (no gradient where the maximum was
                    // not positive).
                    rows::add_gradients(&mut sums, &dz, x, coefficients[c], false);
                }
                sums.total()
            })
            .collect()
    };
    let per_channel = parameter_grads(&sums, &coefficients, images * plane, dgamma, dbeta);
    if !input_grad {
        return Ok(());
    }
    xs.par_chunks_mut(plane.max(1)).enumerate().for_each_init(
        || vec![0.0f32; plane],
        |dz, (index, x)| {
            let c = index % channels;
            unpool(index, dz);
            rows::input_gradient_over_input(dz, x, coefficients[c], per_channel[c], false);
        },
    );
    Ok(())
}
