//! Direct convolution for stride 1 and short receptive fields (at most [`MAX_PATCH`] values,
//! e.g. a first layer's 1x3x3 or 1x5x5): each output plane is a sum of shifted input planes.
//!
//! Why not im2col + GEMM there: im2col writes every input value KH*KW times, and a GEMM whose
//! inner dimension is 9 or 25 spends its time packing, not multiplying (conv 1->32 on 28x28 ran
//! at a fifth of the GEMM ceiling). Summing shifted planes reads each image once.
//!
//! The trick that keeps the loops long: an image is zero-padded into rows of the padded width
//! WP, and an output plane is computed over `OH * WP` positions as if it too were WP wide. Then
//! kernel tap (kh, kw) is one flat shift by `kh * WP + kw`, every loop runs over a whole plane,
//! and the `WP - OW` extra columns of each row are discarded (forward) or held at zero (backward).
//!
//! Its cost is a copy, row by row, of each output plane out of the padded width (forward) and of
//! each gradient plane into it (backward): a third of both passes of conv 1->32. Where there are
//! at least as many output channels as receptive-field values, each image is instead
//! [`unfold`]ed once (im2col, in blocks of LANES pixels), and plain outputs and all gradients
//! are read and written in their own width. The fused ReLU + pooling reads the padded width in
//! place, so it never unfolds.

//!
//! Here: the layout and the drivers that run it over the batch; the kernels are in
//! `forward.rs` and `backward.rs`.

use ndarray::parallel::prelude::*;
use ndarray::{ArrayView2, ArrayView3, ArrayViewMut3, ArrayViewMut4, Axis};

mod backward;
mod forward;

use backward::{
    PooledGrad, backward_image_body, block_registers, maxima_3x3_body, maxima_5x5_body,
    maxima_scratch_len, takes_maxima,
};
use forward::{forward_image_body, max_pool_2x2_body};

use super::buffers::{DirectBuffers, resize};
use super::chunks::{ChunkGrad, ChunkOutput, image_slice};
use super::fused::{BeforePool, max_pool_image};
use super::layout::{ALIGN_SLACK, aligned_mut};
use super::{Conv2dDims, ForwardPass, Partials, contiguous, contiguous_mut, images_per_chunk};
use crate::simd::dispatched;

/// The longest receptive field (C*KH*KW) convolved directly: at 27 (three channels, 3x3) GEMM is
/// still starved; conv 6->16 5x5 (150) runs faster as im2col + GEMM.
pub(crate) const MAX_PATCH: usize = 32;

/// A multiple of every strip of outputs computed at once (four vector registers: 32 or 64).
const STRIP: usize = 64;

/// Output channels [`forward_image`] computes at once, at most: each shifted input vector
/// loaded then serves all of them.
const CHANNELS_AT_ONCE: usize = 4;

/// Output channels whose gradients [`backward_image`] takes at once, at most (their
/// 2 x [`TAP_GROUP`] sums fill AVX-512's registers).
const GRAD_CHANNELS_AT_ONCE: usize = 2;

/// Taps whose weight gradients [`backward_image`] sums at once in registers: a 3x3 kernel's
/// nine in one pass (with two channels, 18 accumulators of AVX-512's 32 registers).
const TAP_GROUP: usize = 9;

/// Values a plane of [`PaddedLayout::wide_len`] needs after it for [`forward_image`]'s pooling,
/// whose last vector of windows may read past the plane.
pub(crate) const POOL_SLACK: usize = 32;

/// Sizes of the padded and unfolded layouts of one image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PaddedLayout {
    /// WP = W + pad_left + pad_right.
    width: usize,
    /// HP * WP.
    plane: usize,
    /// `OH * WP` rounded up to whole strips: one output plane in the padded width.
    wide_len: usize,
    /// `C * HP * WP` and enough zeros after it that every shifted read of a strip is in bounds.
    pub(crate) image_len: usize,
    /// Whether each image is [`unfold`]ed, so that output planes and their gradients are read
    /// and written in their own width: when there are at least as many output channels as
    /// receptive-field values. Otherwise copying the planes between their own and the padded
    /// width costs less than unfolding (lenet5's conv 1->6 5x5 ran 2x slower unfolded; conv
    /// 1->32 3x3 17% faster).
    unfolds: bool,
    /// OH * OW.
    pixels: usize,
    /// `OH * OW` rounded up to whole strips: the pixels of an unfolded image.
    cols_len: usize,
    /// `C * KH * KW` rounded up to whole [`TAP_GROUP`]s: the rows of a block of an unfolded
    /// image (the extra ones unused), so that every group of weight gradients is a full one.
    taps_len: usize,
}

impl PaddedLayout {
    /// The padded layout for these dimensions.
    pub(crate) fn new(dims: &Conv2dDims) -> Self {
        let width = dims.padded_w();
        let plane = dims.padded_h() * width;
        let used = dims.out_h() * width;
        let wide_len = used.div_ceil(STRIP) * STRIP;
        // The last channel is read up to (wide_len - 1) + (KH - 1) * WP + (KW - 1), and
        // used + (KH - 1) * WP = HP * WP: so `wide_len - used + KW - 1` zeros past the planes.
        let image_len = dims.in_channels * plane + (wide_len - used) + dims.kernel_w - 1;
        PaddedLayout {
            width,
            plane,
            wide_len,
            image_len,
            unfolds: dims.out_channels >= dims.patch_len(),
            pixels: dims.out_pixels(),
            cols_len: dims.out_pixels().div_ceil(STRIP) * STRIP,
            taps_len: dims.patch_len().div_ceil(TAP_GROUP) * TAP_GROUP,
        }
    }

    /// The scratch [`forward_image`] and [`backward_image`] need (`wide`): the same for both,
    /// so that neither reallocates it for the other.
    pub(crate) fn scratch_len(&self) -> usize {
        // The unfolded image, planes in the padded width (or one row of the unfolded image,
        // before them), and two unpooled gradient planes.
        self.unfolded_len() + ALIGN_SLACK + self.planes_len() + GRAD_CHANNELS_AT_ONCE * self.pixels
    }

    /// The scratch after the unfolded image for planes in the padded width (and, while
    /// unfolding, one row of the unfolded image).
    fn planes_len(&self) -> usize {
        (CHANNELS_AT_ONCE * self.wide_len + POOL_SLACK).max(self.cols_len)
    }

    /// The values of one unfolded image, if images are unfolded.
    fn unfolded_len(&self) -> usize {
        if self.unfolds {
            self.taps_len * self.cols_len
        } else {
            0
        }
    }

    /// Splits scratch of [`Self::scratch_len`] values into the unfolded image (aligned to a
    /// cache line, so that none of its vector loads splits one) and the planes after it.
    fn split_scratch<'a>(&self, scratch: &'a mut [f32]) -> (&'a mut [f32], &'a mut [f32]) {
        let (unfolded, planes) = scratch.split_at_mut(self.unfolded_len() + ALIGN_SLACK);
        (&mut aligned_mut(unfolded)[..self.unfolded_len()], planes)
    }

    /// The flat shift of each receptive-field value (c, kh, kw), in weight order (the first
    /// `C*KH*KW` entries; a fixed-size table, so that the kernels need no allocation).
    fn shifts(&self, dims: &Conv2dDims) -> [usize; MAX_PATCH] {
        let mut shifts = [0; MAX_PATCH];
        for (r, shift) in shifts.iter_mut().enumerate().take(dims.patch_len()) {
            let (c, kh, kw) = dims.tap_of_row(r);
            *shift = c * self.plane + kh * self.width + kw;
        }
        shifts
    }
}

/// Copies `x [C, H, W]` into `padded` (`image_len` values) inside its zero border.
pub(crate) fn pad_image(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    x: ArrayView3<'_, f32>,
    padded: &mut [f32],
) {
    padded.fill(0.0);
    for (c, channel) in x.outer_iter().enumerate() {
        for (h, row) in channel.outer_iter().enumerate() {
            let start = c * layout.plane + (h + dims.pad_top) * layout.width + dims.pad_left;
            for (out, &v) in padded[start..start + dims.in_w].iter_mut().zip(row.iter()) {
                *out = v;
            }
        }
    }
}

/// One image's output gradient, as [`backward_image`] reads it.
pub(crate) enum ImageGrad<'a> {
    /// Of the convolution output, `[O, OH*OW]`.
    Conv(&'a [f32]),
    /// Of its max pooling, `[O, PH*PW]`, and the argmax of each window (a pixel of its plane,
    /// or `NO_GRADIENT`): unpooled two channels at a time into scratch, where it stays in L1.
    /// (Unpooling all 32 channels of an image first wrote 86 KB, a tenth of a one-conv step.)
    Pooled(&'a [f32], &'a [u32]),
}

/// Where [`forward_image`] puts its output.
pub(crate) enum Output<'a> {
    /// The convolution, `[O, OH*OW]`.
    Plain(&'a mut [f32]),
    /// 2x2 max pooling (stride 2) of it after `BeforePool`, and, if wanted, the argmax of
    /// each window, `[O, PH*PW]` each: the comparisons of `max_pool_plane` in the same order,
    /// so the same bits.
    MaxPool2x2(BeforePool, &'a mut [f32], Option<&'a mut [u32]>),
}

dispatched! {
    /// The convolution of one padded image: `out [O, OH*OW] = W [O, C*KH*KW] (*) padded
    /// (+ bias)`, or its pooling, using `wide` ([`PaddedLayout::scratch_len`] values) as
    /// scratch.
    fn forward_image(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        padded: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        wide: &mut [f32],
        out: Output<'_>,
    ) => forward_image_body;
}

dispatched! {
    /// The gradients of one image: `dW [O, C*KH*KW] += dy (*) padded`, `db [O] += sums of dy`,
    /// and, when `dx` is given, `dx [C, H, W] = W^T (*) dy`, using `padded_dx` (`image_len`
    /// values) as scratch. `wide` ([`PaddedLayout::scratch_len`] values) is scratch.
    fn backward_image(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        padded: &[f32],
        weight: &[f32],
        grad: ImageGrad<'_>,
        wide: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dx: Option<(&mut [f32], ArrayViewMut3<'_, f32>)>,
    ) => backward_image_body;
}

dispatched! {
    /// The weight and bias gradients of one image of a first layer with a 3x3 kernel under
    /// 2x2 pooling (see `takes_maxima`), `dW [O, 9] += dy (*) padded` and `db [O] += sums of
    /// dy`, read at the pooling maxima alone, with `maxima` ([`maxima_scratch_len`]) and `wide`
    /// as scratch; the same bits as [`backward_image`]. False, having done nothing, where
    /// registers are too narrow.
    fn weight_grads_from_maxima_3x3(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        padded: &[f32],
        pooled: PooledGrad<'_>,
        maxima: &mut [u32],
        wide: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) -> bool => maxima_3x3_body;
}

dispatched! {
    /// [`weight_grads_from_maxima_3x3`] for a 5x5 kernel, `dW [O, 25]`.
    fn weight_grads_from_maxima_5x5(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        padded: &[f32],
        pooled: PooledGrad<'_>,
        maxima: &mut [u32],
        wide: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
    ) -> bool => maxima_5x5_body;
}

dispatched! {
    /// `before` and 2x2 max pooling (stride 2) of one output plane in the padded width (`wide`,
    /// with [`POOL_SLACK`] values after it), and the argmax of each window, into the first
    /// `PH*PW` values of `y` and `argmax` (values after those, which belong to planes written
    /// later, may be overwritten): the comparisons of `max_pool_plane` in the same order, so
    /// the same bits. Without `argmax`, computes none.
    fn max_pool_2x2(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        before: BeforePool,
        wide: &[f32],
        y: &mut [f32],
        argmax: Option<&mut [u32]>,
    ) => max_pool_2x2_body;
}

/// [`weight_grads_from_maxima_3x3`] or [`weight_grads_from_maxima_5x5`].
type WeightGradsFromMaxima = fn(
    &Conv2dDims,
    &PaddedLayout,
    &[f32],
    PooledGrad<'_>,
    &mut [u32],
    &mut [f32],
    &mut [f32],
    &mut [f32],
) -> bool;

/// The forward pass: each image is zero-padded (and kept, for backward, when `pass.keep`) and
/// convolved directly, into one `outputs` entry per chunk of the batch.
pub(in crate::conv) fn forward(
    pass: &ForwardPass<'_, '_>,
    own: &mut DirectBuffers,
    outputs: Vec<ChunkOutput<'_>>,
) {
    let ForwardPass {
        dims,
        x,
        weight,
        bias,
        keep: keep_padded,
    } = *pass;
    let layout = PaddedLayout::new(dims);
    let (o, pixels) = (dims.out_channels, dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    let kept_images = if keep_padded { per_chunk } else { 1 };
    let pooled = matches!(outputs.first(), Some(ChunkOutput::MaxPool(..)));
    let staged = if pooled { (o, pixels) } else { (0, 0) };
    resize(&mut own.padded, (chunks, kept_images * layout.image_len));
    resize(&mut own.wide, (chunks, layout.scratch_len()));
    resize(&mut own.staged, (chunks, staged.0, staged.1));
    let weight = weight.as_standard_layout();
    let weight = contiguous(&weight);
    let bias = bias.map(|b| b.to_vec());
    let DirectBuffers {
        padded,
        wide,
        staged,
        ..
    } = own;
    padded
        .outer_iter_mut()
        .into_par_iter()
        .zip(wide.outer_iter_mut())
        .zip(staged.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(|((((mut padded, mut plane), mut staged), x), mut output)| {
            let padded = contiguous_mut(&mut padded);
            let plane = contiguous_mut(&mut plane);
            for (j, x) in x.outer_iter().enumerate() {
                let slot = if keep_padded { j } else { 0 };
                let padded = &mut padded[slot * layout.image_len..(slot + 1) * layout.image_len];
                pad_image(dims, &layout, x, padded);
                let mut conv = |out: Output<'_>| {
                    forward_image(dims, &layout, padded, weight, bias.as_deref(), plane, out)
                };
                match &mut output {
                    ChunkOutput::Conv(y) => conv(Output::Plain(contiguous_mut(
                        &mut y.index_axis_mut(Axis(0), j),
                    ))),
                    ChunkOutput::MaxPool(pool, before, y, argmax) if pool.is_2x2_stride_2() => {
                        conv(Output::MaxPool2x2(
                            *before,
                            contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                            argmax.image_2x2(j),
                        ));
                    }
                    ChunkOutput::MaxPool(pool, before, y, argmax) => {
                        conv(Output::Plain(contiguous_mut(&mut staged)));
                        max_pool_image(
                            pool,
                            *before,
                            staged.view(),
                            y.index_axis_mut(Axis(0), j),
                            argmax.image(j),
                        );
                    }
                }
            }
        });
}

/// The backward pass, from the padded input the forward pass kept: each chunk's gradient sums
/// into `partials`, and the input gradient onto `dx_chunks`.
pub(in crate::conv) fn backward(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    own: &mut DirectBuffers,
    partials: Partials<'_>,
    dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>>,
) {
    let layout = PaddedLayout::new(dims);
    let chunks = chunk_grads.len();
    let wants_dx = dx_chunks.iter().any(Option::is_some);
    let dx_len = if wants_dx { layout.image_len } else { 0 };
    // (A pooled gradient is unpooled two channels at a time, in `wide`.)
    // The forward pass's size, so that neither pass reallocates it for the other.
    resize(&mut own.wide, (chunks, layout.scratch_len()));
    resize(&mut own.padded_dx, (chunks, dx_len));
    // Scratch for a 2x2 pooling's maxima in pixel order, where a first layer's weight
    // gradient is read there.
    let maxima_pool = match chunk_grads.first() {
        Some(ChunkGrad::Pooled(.., pool)) if takes_maxima(dims, pool, wants_dx) => {
            let from_maxima: WeightGradsFromMaxima = match block_registers(dims) {
                Some(1) => weight_grads_from_maxima_3x3,
                _ => weight_grads_from_maxima_5x5,
            };
            Some((*pool, from_maxima))
        }
        _ => None,
    };
    let maxima_len = maxima_pool.map_or(0, |(pool, _)| {
        maxima_scratch_len(pool.out_h() * pool.out_w())
    });
    resize(&mut own.maxima, (chunks, maxima_len));
    let weight = weight.as_standard_layout();
    let weight = contiguous(&weight);
    let DirectBuffers {
        padded,
        wide,
        padded_dx,
        maxima,
        ..
    } = own;
    partials
        .dw
        .outer_iter_mut()
        .into_par_iter()
        .zip(partials.db.outer_iter_mut())
        .zip(padded.outer_iter())
        .zip(chunk_grads)
        .zip(dx_chunks)
        .zip(wide.outer_iter_mut())
        .zip(padded_dx.outer_iter_mut())
        .zip(maxima.outer_iter_mut())
        .for_each(
            |(
                ((((((mut pdw, mut pdb), padded), dy), mut dx), mut plane), mut padded_dx),
                mut maxima,
            )| {
                pdw.fill(0.0);
                pdb.fill(0.0);
                let (pdw, pdb) = (contiguous_mut(&mut pdw), contiguous_mut(&mut pdb));
                let plane = contiguous_mut(&mut plane);
                let padded_dx = contiguous_mut(&mut padded_dx);
                let padded = contiguous(&padded);
                let maxima = contiguous_mut(&mut maxima);
                for j in 0..dy.images() {
                    let image = &padded[j * layout.image_len..(j + 1) * layout.image_len];
                    let grad = match &dy {
                        ChunkGrad::Conv(dy) => ImageGrad::Conv(image_slice(dy, j)),
                        ChunkGrad::Pooled(dy, argmax, _) => {
                            let (dy, argmax) = (image_slice(dy, j), image_slice(argmax, j));
                            if let Some((pool, from_maxima)) = maxima_pool {
                                let pool_w = pool.out_w();
                                let pooled = PooledGrad { dy, argmax, pool_w };
                                let (image, layout) = (image, &layout);
                                if from_maxima(dims, layout, image, pooled, maxima, plane, pdw, pdb)
                                {
                                    continue;
                                }
                            }
                            ImageGrad::Pooled(dy, argmax)
                        }
                    };
                    let dx = dx
                        .as_mut()
                        .map(|dx| (&mut *padded_dx, dx.index_axis_mut(Axis(0), j)));
                    backward_image(dims, &layout, image, weight, grad, plane, pdw, pdb, dx);
                }
            },
        );
}
