//! Convolution, ReLU (or not) and max pooling in one pass, and its backward pass from the
//! argmax.
//!
//! Why: the convolution output of a layer followed by pooling is four times the
//! pooled output; computing each image's and pooling it while it is in cache saves writing
//! and reading it, and the backward pass reads only the pooled gradient and where it goes.

use ndarray::{ArrayView1, ArrayView2, ArrayView4, ArrayViewMut3, ArrayViewMut4, Axis};
use rayon::prelude::*;

use super::buffers::resize;
use super::chunks::{ArgmaxOut, ChunkGrad, ChunkOutput};
use super::{
    Backward, Conv2dBuffers, Conv2dDims, Conv2dGrads, backward, check_pool_of, contiguous, forward,
    images_per_chunk, into_contiguous, into_contiguous_mut, standard_layout,
};
use crate::error::{TensorError, expect_shape};
use crate::pool::{Pool2dDims, max_pool_plane};
use crate::simd::dispatched;
use crate::vector::Simd;

/// What a fused convolution applies to its output before max pooling it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeforePool {
    /// ReLU: a window whose maximum is not positive gives 0 and passes no gradient.
    Relu,
    /// Nothing: the convolution output is pooled as it is (a BatchNorm follows, say).
    Nothing,
}

impl BeforePool {
    /// ReLU if `relu`, else nothing: for kernels that take the choice as a constant.
    #[inline(always)]
    pub(crate) const fn relu_if(relu: bool) -> BeforePool {
        if relu {
            BeforePool::Relu
        } else {
            BeforePool::Nothing
        }
    }

    /// The activation of one value (ReLU's `max(v, 0)`, which also turns a NaN into 0, as
    /// [`crate::relu`] does).
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            BeforePool::Relu => v.max(0.0),
            BeforePool::Nothing => v,
        }
    }

    /// Whether a window whose (activated) maximum is `best` passes no gradient back.
    #[inline(always)]
    pub(crate) fn blocks(self, best: f32) -> bool {
        matches!(self, BeforePool::Relu) & (best <= 0.0)
    }
}

/// `y = max_pool(before(conv(x, weight) + bias))` in one pass, `before` a ReLU or nothing:
/// each image's convolution output is activated and pooled while it is still in cache, and
/// never written out whole. The same bits as [`conv2d_forward`], [`crate::relu`] (if asked)
/// and [`crate::max_pool2d_forward`] in turn.
///
/// `pool` describes the pooling of the `[N, O, OH, OW]` convolution output; `y` and `argmax`
/// are `[N, O, PH, PW]`. `argmax` is where each maximum came from in its convolution output
/// plane, or [`NO_GRADIENT`] where a ReLU gave the window 0 (it passes no gradient there); the
/// backward pass needs it. Without one (inference), none is written out.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_max_pool_forward(
    dims: &Conv2dDims,
    pool: &Pool2dDims,
    before: BeforePool,
    x: ArrayView4<'_, f32>,
    weight: ArrayView4<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    backward: Backward,
    y: ArrayViewMut4<'_, f32>,
    argmax: Option<ArrayViewMut4<'_, u32>>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_max_pool_forward";
    check_pool_of(OP, dims, pool)?;
    expect_shape(OP, "output", y.shape(), &pool.output_shape())?;
    if let Some(argmax) = &argmax {
        expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
    }
    let mut y = standard_layout(OP, "output", y)?;
    let per_chunk = images_per_chunk(dims.batch);
    let y_chunks = y.axis_chunks_iter_mut(Axis(0), per_chunk);
    match argmax {
        Some(argmax) => {
            let mut argmax = standard_layout(OP, "argmax", argmax)?;
            let outputs = y_chunks
                .zip(argmax.axis_chunks_iter_mut(Axis(0), per_chunk))
                .map(|(y, argmax)| ChunkOutput::MaxPool(*pool, before, y, ArgmaxOut::Kept(argmax)))
                .collect();
            forward(OP, dims, x, weight, bias, buffers, backward, outputs)
        }
        None => {
            // Written only to one image's scratch per chunk: inference needs no argmax, and
            // writing all of it doubled the pooled output's memory traffic. (Taken out of
            // `buffers` for the call, which borrows the rest of them.)
            let [_, o, ph, pw] = pool.output_shape();
            let mut scratch = std::mem::take(&mut buffers.argmax_scratch);
            resize(&mut scratch, (y_chunks.len(), o, ph, pw));
            let outputs = y_chunks
                .zip(scratch.outer_iter_mut())
                .map(|(y, scratch)| {
                    ChunkOutput::MaxPool(*pool, before, y, ArgmaxOut::Dropped(scratch))
                })
                .collect();
            let result = forward(OP, dims, x, weight, bias, buffers, backward, outputs);
            buffers.argmax_scratch = scratch;
            result
        }
    }
}

/// Marks a window of [`conv2d_max_pool_forward`] whose maximum was not positive: the ReLU
/// before the pooling passes no gradient back through it.
pub const NO_GRADIENT: u32 = u32::MAX;

/// `before` and max pooling of one image's convolution output `conv [O, OH*OW]` (a slice of
/// `gathered_out`, whose rows are contiguous) into `y` and `argmax` `[O, PH, PW]`, both in
/// standard layout.
pub(super) fn max_pool_image(
    pool: &Pool2dDims,
    before: BeforePool,
    conv: ArrayView2<'_, f32>,
    y: ArrayViewMut3<'_, f32>,
    argmax: ArrayViewMut3<'_, u32>,
) {
    let (y, argmax) = (into_contiguous_mut(y), into_contiguous_mut(argmax));
    let out_len = pool.out_h() * pool.out_w();
    let planes = y
        .chunks_exact_mut(out_len)
        .zip(argmax.chunks_exact_mut(out_len));
    for (row, (y, argmax)) in conv.outer_iter().zip(planes) {
        let row = into_contiguous(row);
        match before {
            BeforePool::Relu => {
                max_pool_plane(pool, row, y, argmax, |v| before.apply(v));
                for (y, a) in y.iter().zip(argmax.iter_mut()) {
                    // A select, not a branch: the loop vectorizes.
                    *a = if before.blocks(*y) { NO_GRADIENT } else { *a };
                }
            }
            BeforePool::Nothing => max_pool_plane(pool, row, y, argmax, |v| v),
        }
    }
}

/// The gradients of [`conv2d_max_pool_forward`] given the gradient of its pooled output
/// `dy [N, O, PH, PW]` and the `argmax` it returned.
pub fn conv2d_max_pool_backward(
    dims: &Conv2dDims,
    pool: &Pool2dDims,
    weight: ArrayView4<'_, f32>,
    dy: ArrayView4<'_, f32>,
    argmax: ArrayView4<'_, u32>,
    buffers: &mut Conv2dBuffers,
    grads: Conv2dGrads<'_>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_max_pool_backward";
    check_pool_of(OP, dims, pool)?;
    expect_shape(OP, "output gradient", dy.shape(), &pool.output_shape())?;
    expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
    let (dy, argmax) = (dy.as_standard_layout(), argmax.as_standard_layout());
    check_argmax(OP, contiguous(&argmax), dims.out_pixels(), "output")?;
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dy
        .axis_chunks_iter(Axis(0), per_chunk)
        .zip(argmax.axis_chunks_iter(Axis(0), per_chunk))
        .map(|(dy, argmax)| ChunkGrad::Pooled(dy, argmax, *pool))
        .collect();
    backward(OP, dims, weight, chunks, buffers, grads)
}

/// Values of an argmax array checked by one task: 128 KB, enough to outweigh a task's cost.
const ARGMAX_PER_TASK: usize = 1 << 15;

/// Checks that every `argmax` of a fused backward pass is [`NO_GRADIENT`] or a pixel of its
/// `pixels`-pixel plane (`plane` names which one, for the error).
pub(crate) fn check_argmax(
    op: &'static str,
    argmax: &[u32],
    pixels: usize,
    plane: &str,
) -> Result<(), TensorError> {
    // One flat pass without early exit, vectorized, to check (as "argmax + 1 > pixels", which
    // NO_GRADIENT + 1 = 0 passes), a second only to name the culprit. (A pass written with
    // `find` compared in 64 bits on the baseline target: 7% of a fused training step.)
    // In parallel: the pass ran on one thread while the other waited (2% of a fast-cnn step).
    let largest = argmax
        .par_chunks(ARGMAX_PER_TASK)
        .map(|chunk| {
            let mut largest = 0;
            largest_plus_one(chunk, &mut largest);
            largest
        })
        .max()
        .unwrap_or(0);
    if largest as usize > pixels {
        let outside = |&a: &u32| a != NO_GRADIENT && a as usize >= pixels;
        let bad = argmax.iter().copied().find(outside).unwrap_or_default();
        return Err(TensorError::Shape {
            op,
            detail: format!("argmax {bad} is outside the {pixels}-pixel {plane} plane"),
        });
    }
    Ok(())
}

dispatched! {
    /// `largest = max(values[i] + 1)`, wrapping (so [`NO_GRADIENT`] counts as 0), 0 if empty.
    fn largest_plus_one(values: &[u32], largest: &mut u32) => largest_plus_one_body;
}

#[inline(always)]
fn largest_plus_one_body<S: Simd, const LANES: usize>(_simd: S, values: &[u32], largest: &mut u32) {
    let mut lanes = [0u32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane).max(v.wrapping_add(1));
        }
    }
    let tail = tail.iter().map(|v| v.wrapping_add(1));
    *largest = lanes.into_iter().chain(tail).max().unwrap_or(0);
}

/// Writes into the plane `out` each pooling window's gradient `dy` at its `argmax` (a pixel of
/// `out`, or [`NO_GRADIENT`]), zero elsewhere.
pub(crate) fn unpool_plane(dy: &[f32], argmax: &[u32], out: &mut [f32]) {
    out.fill(0.0);
    for (&g, &at) in dy.iter().zip(argmax) {
        // Without a branch, which would be mispredicted on about half of the windows: a
        // window without gradient adds 0 to pixel 0.
        let passes = at != NO_GRADIENT;
        out[if passes { at as usize } else { 0 }] += if passes { g } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_plus_one_sees_every_value_and_skips_no_gradient() {
        // Lengths around every vector width, the largest value in every position.
        for len in 0..70usize {
            for at in 0..len {
                let mut values: Vec<u32> = (0..len as u32).map(|i| (i * 7) % 13).collect();
                values[at] = 1000;
                if len > 1 {
                    values[(at + 1) % len] = NO_GRADIENT;
                }
                let mut largest = 0;
                largest_plus_one(&values, &mut largest);
                assert_eq!(largest, 1001, "length {len}, largest at {at}");
            }
            let mut largest = 7;
            largest_plus_one(&vec![NO_GRADIENT; len], &mut largest);
            assert_eq!(largest, 0, "length {len} of NO_GRADIENT");
        }
    }
}
