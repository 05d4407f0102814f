//! What one chunk of the batch writes in the forward pass and reads in the backward pass.

use ndarray::{ArrayView2, ArrayView4, ArrayViewMut2, ArrayViewMut3, ArrayViewMut4, Axis};

use super::fused::{BeforePool, unpool_plane};
use super::{
    as_matrix, as_matrix_mut, contiguous, contiguous_mut, into_contiguous, into_contiguous_mut,
};
use crate::pool::Pool2dDims;

/// Where the forward pass puts one chunk of images.
pub(super) enum ChunkOutput<'a> {
    /// The convolution output `[B, O, OH, OW]`.
    Conv(ArrayViewMut4<'a, f32>),
    /// Max pooling of it (after a ReLU, if asked), `[B, O, PH, PW]`, and the argmax of each
    /// window.
    MaxPool(
        Pool2dDims,
        BeforePool,
        ArrayViewMut4<'a, f32>,
        ArgmaxOut<'a>,
    ),
}

/// Where a chunk's argmax goes.
pub(super) enum ArgmaxOut<'a> {
    /// `[B, O, PH, PW]`, for a backward pass.
    Kept(ArrayViewMut4<'a, u32>),
    /// Nowhere: `[O, PH, PW]` of scratch that each image overwrites.
    Dropped(ArrayViewMut3<'a, u32>),
}

impl ArgmaxOut<'_> {
    /// Where image j's argmax `[O, PH*PW]` goes, for the fused 2x2 poolings, which compute none
    /// when it is dropped.
    pub(super) fn image_2x2(&mut self, j: usize) -> Option<&mut [u32]> {
        match self {
            ArgmaxOut::Kept(argmax) => Some(into_contiguous_mut(argmax.index_axis_mut(Axis(0), j))),
            ArgmaxOut::Dropped(_) => None,
        }
    }

    /// Where image j's argmax `[O, PH, PW]` goes.
    pub(super) fn image(&mut self, j: usize) -> ArrayViewMut3<'_, u32> {
        match self {
            ArgmaxOut::Kept(argmax) => argmax.index_axis_mut(Axis(0), j),
            ArgmaxOut::Dropped(scratch) => scratch.view_mut(),
        }
    }
}

/// The output gradient of one chunk of images.
pub(super) enum ChunkGrad<'a> {
    /// Of the convolution output, `[B, O, OH, OW]`, standard layout.
    Conv(ArrayView4<'a, f32>),
    /// Of the pooled output, `[B, O, PH, PW]`, and its argmax, both standard layout, and the
    /// pooling.
    Pooled(ArrayView4<'a, f32>, ArrayView4<'a, u32>, Pool2dDims),
}

impl ChunkGrad<'_> {
    pub(super) fn images(&self) -> usize {
        match self {
            ChunkGrad::Conv(dy) | ChunkGrad::Pooled(dy, ..) => dy.len_of(Axis(0)),
        }
    }

    /// The most nonzeros one image's gradient with respect to the convolution output can
    /// have, when the pooling bounds it: one per window, as unpooling puts each window's
    /// gradient on one pixel.
    pub(super) fn nonzero_bound(&self) -> Option<usize> {
        match self {
            ChunkGrad::Conv(_) => None,
            ChunkGrad::Pooled(dy, ..) => Some(dy.len() / dy.len_of(Axis(0)).max(1)),
        }
    }

    /// Image j's gradient with respect to the convolution output, `[O, OH*OW]`, when dy holds
    /// it as it is.
    pub(super) fn conv_view(
        &self,
        j: usize,
        o: usize,
        pixels: usize,
    ) -> Option<ArrayView2<'_, f32>> {
        match self {
            ChunkGrad::Conv(dy) => Some(image_of(dy, j, o, pixels)),
            ChunkGrad::Pooled(..) => None,
        }
    }

    /// Writes image j's gradient with respect to the convolution output into `out [O, OH*OW]`
    /// (a slice of `wide`, whose rows are contiguous): a copy, or each window's gradient put
    /// back at its argmax.
    pub(super) fn write_conv_grad(&self, j: usize, mut out: ArrayViewMut2<'_, f32>) {
        match self {
            ChunkGrad::Conv(dy) => {
                let (o, pixels) = out.dim();
                out.assign(&image_of(dy, j, o, pixels));
            }
            ChunkGrad::Pooled(dy, argmax, _) => {
                let (dy, argmax) = (dy.index_axis(Axis(0), j), argmax.index_axis(Axis(0), j));
                let (dy, argmax) = (into_contiguous(dy), into_contiguous(argmax));
                let pooled = dy.len() / out.nrows().max(1);
                let planes = dy.chunks_exact(pooled).zip(argmax.chunks_exact(pooled));
                for (mut row, (dy, argmax)) in out.rows_mut().into_iter().zip(planes) {
                    let row = contiguous_mut(&mut row);
                    unpool_plane(dy, argmax, row);
                }
            }
        }
    }
}

/// Image j of a chunk's standard-layout array, as one slice.
pub(super) fn image_slice<'a, T>(a: &'a ArrayView4<'_, T>, j: usize) -> &'a [T] {
    let len = a.len() / a.len_of(Axis(0)).max(1);
    &contiguous(a)[j * len..(j + 1) * len]
}

/// Image j of a standard-layout `[B, O, OH, OW]` array as `[O, OH*OW]`.
pub(super) fn image_of<'a>(
    a: &'a ArrayView4<'_, f32>,
    j: usize,
    o: usize,
    pixels: usize,
) -> ArrayView2<'a, f32> {
    as_matrix(into_contiguous(a.index_axis(Axis(0), j)), o, pixels)
}

/// One image of the output, `[O, OH, OW]` in standard layout, as `[O, OH*OW]`.
pub(super) fn image_matrix(
    y: ArrayViewMut3<'_, f32>,
    o: usize,
    pixels: usize,
) -> ArrayViewMut2<'_, f32> {
    as_matrix_mut(into_contiguous_mut(y), o, pixels)
}
