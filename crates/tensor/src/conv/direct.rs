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

use ndarray::{ArrayView3, ArrayViewMut3};

use super::scatter::{ALIGN_SLACK, aligned_mut};
use super::{Conv2dDims, copy_short, unpool_plane};
use crate::pool::replaces_max;
use crate::simd::dispatched;
use crate::vector::{Simd, vector_dispatched};

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

/// Whether [`Conv2dDims`] describes a convolution computed directly rather than by im2col.
pub(crate) fn applies(dims: &Conv2dDims) -> bool {
    dims.stride_h == 1 && dims.stride_w == 1 && dims.patch_len() <= MAX_PATCH
}

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
    /// ReLU and 2x2 max pooling (stride 2) of it, and, if wanted, the argmax of each window,
    /// `[O, PH*PW]` each: the comparisons of `max_pool_plane` in the same order, so the same
    /// bits.
    ReluMaxPool2x2(&'a mut [f32], Option<&'a mut [u32]>),
}

vector_dispatched! {
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

vector_dispatched! {
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
    /// ReLU and 2x2 max pooling (stride 2) of one output plane in the padded width (`wide`,
    /// with [`POOL_SLACK`] values after it), and the argmax of each window, into the first
    /// `PH*PW` values of `y` and `argmax` (values after those, which belong to planes written
    /// later, may be overwritten): the comparisons of `max_pool_plane` in the same order, so
    /// the same bits. Without `argmax`, computes none.
    fn relu_max_pool_2x2(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        wide: &[f32],
        y: &mut [f32],
        argmax: Option<&mut [u32]>,
    ) => relu_max_pool_2x2_body;
}

/// Unfolds a padded image into `unfolded` ([`PaddedLayout::unfolded_len`] values), a block of
/// `taps_len x LANES` values for every LANES pixels: row t of block b holds the inputs that
/// receptive-field value t multiplies at pixels `b * LANES..`, zero past the last pixel (rows
/// past the patch hold whatever was there: their sums are dropped). A block's rows are
/// contiguous, so that the loops over them need one pointer and constant offsets. `row`
/// (`cols_len` values) is scratch.
#[inline(always)]
fn unfold<S: Simd>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    unfolded: &mut [f32],
    row: &mut [f32],
) {
    let (ow, pixels, lanes) = (dims.out_w(), dims.out_pixels(), S::LANES);
    let shifts = layout.shifts(dims);
    let block_len = layout.taps_len * lanes;
    let row = &mut row[..layout.cols_len];
    row[pixels..].fill(0.0);
    for (t, &shift) in shifts[..dims.patch_len()].iter().enumerate() {
        for (h, out) in row[..pixels].chunks_exact_mut(ow).enumerate() {
            copy_short(&padded[shift + h * layout.width..][..ow], out);
        }
        for (block, from) in unfolded
            .chunks_exact_mut(block_len)
            .zip(row.chunks_exact(lanes))
        {
            simd.store(simd.load(from), &mut block[t * lanes..]);
        }
    }
}

/// How many output channels the forward kernels compute at once: four where there are
/// registers for their 16 sums (AVX-512) and no group would be short (lenet5's six channels ran
/// slower as 4 + 2 padded to 4), else two.
fn forward_channels_at_once<S: Simd>(dims: &Conv2dDims) -> usize {
    if S::LANES >= 16 && dims.out_channels.is_multiple_of(CHANNELS_AT_ONCE) {
        CHANNELS_AT_ONCE
    } else {
        2
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_image_body<S: Simd>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    wide: &mut [f32],
    mut out: Output<'_>,
) {
    if let Output::Plain(y) = &mut out
        && layout.unfolds
    {
        return forward_unfolded(simd, dims, layout, padded, weight, bias, wide, y);
    }
    let patch = dims.patch_len();
    let (ow, pixels) = (dims.out_w(), dims.out_pixels());
    let pooled = (dims.out_h() / 2) * (ow / 2);
    let shifts = layout.shifts(dims);
    let shifts = &shifts[..patch];
    let len = layout.wide_len;
    let at_once = forward_channels_at_once::<S>(dims);
    for first in (0..dims.out_channels).step_by(at_once) {
        // A last, short group repeats its last channel; the copies are dropped.
        let channel = |c: usize| (first + c).min(dims.out_channels - 1);
        let last = channel(at_once - 1);
        let planes = &mut wide[..at_once * len];
        let tap_row = |o: usize| &weight[o * patch..(o + 1) * patch];
        let bias_of = |o: usize| bias.map_or(0.0, |b| b[o]);
        if at_once == CHANNELS_AT_ONCE {
            let channels: [usize; CHANNELS_AT_ONCE] = std::array::from_fn(channel);
            let (taps, biases) = (channels.map(tap_row), channels.map(bias_of));
            forward_channels(simd, planes, padded, taps, biases, shifts);
        } else {
            let channels: [usize; 2] = std::array::from_fn(channel);
            let (taps, biases) = (channels.map(tap_row), channels.map(bias_of));
            forward_channels(simd, planes, padded, taps, biases, shifts);
        }
        for (o, wide) in (first..=last).zip((0..).map(|c| &wide[c * len..])) {
            match &mut out {
                Output::Plain(out) => {
                    let out = &mut out[o * pixels..(o + 1) * pixels];
                    for (out, row) in out.chunks_exact_mut(ow).zip(wide.chunks(layout.width)) {
                        copy_short(&row[..ow], out);
                    }
                }
                Output::ReluMaxPool2x2(y, argmax) => relu_max_pool_2x2(
                    dims,
                    layout,
                    wide_with_slack(wide, layout),
                    &mut y[o * pooled..],
                    argmax
                        .as_deref_mut()
                        .map(|argmax| &mut argmax[o * pooled..]),
                ),
            }
        }
    }
}

/// The convolutions of CH output channels, `planes[c] = bias[c] + taps[c] (*) padded` (each
/// `wide_len` long), four vectors of outputs at a time summed over every tap before they are
/// stored: each shifted input vector loaded serves every channel. Bias first, then the taps in
/// order, whatever the instruction set and CH.
#[inline(always)]
fn forward_channels<S: Simd, const CH: usize>(
    simd: S,
    planes: &mut [f32],
    padded: &[f32],
    taps: [&[f32]; CH],
    bias: [f32; CH],
    shifts: &[usize],
) {
    let lanes = S::LANES;
    let len = planes.len() / CH;
    for base in (0..len).step_by(4 * lanes) {
        let mut acc: [[S::V; 4]; CH] = std::array::from_fn(|c| [simd.splat(bias[c]); 4]);
        for (t, &shift) in shifts.iter().enumerate() {
            let w: [S::V; CH] = std::array::from_fn(|c| simd.splat(taps[c][t]));
            let x = &padded[base + shift..][..4 * lanes];
            let x: [S::V; 4] = std::array::from_fn(|v| simd.load(&x[v * lanes..]));
            for (acc, &w) in acc.iter_mut().zip(&w) {
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    *acc = simd.mul_add(w, x, *acc);
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            let strip = &mut planes[c * len + base..][..4 * lanes];
            for (out, &acc) in strip.chunks_exact_mut(lanes).zip(acc) {
                simd.store(acc, out);
            }
        }
    }
}

/// The plain convolution of an image with [`PaddedLayout::unfolds`], `y [O, OH*OW]`, stored
/// from registers: as [`forward_channels`], the same sums in the same order, from the unfolded
/// image.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_unfolded<S: Simd>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    wide: &mut [f32],
    y: &mut [f32],
) {
    let patch = dims.patch_len();
    let (unfolded, row) = layout.split_scratch(wide);
    unfold(simd, dims, layout, padded, unfolded, row);
    let unfolded = &*unfolded;
    let at_once = forward_channels_at_once::<S>(dims);
    for first in (0..dims.out_channels).step_by(at_once) {
        // A last, short group repeats its last channel, storing the same values twice.
        let channel = |c: usize| (first + c).min(dims.out_channels - 1);
        let tap_row = |o: usize| &weight[o * patch..(o + 1) * patch];
        let bias_of = |o: usize| bias.map_or(0.0, |b| b[o]);
        if at_once == CHANNELS_AT_ONCE {
            let channels: [usize; CHANNELS_AT_ONCE] = std::array::from_fn(channel);
            let (taps, biases) = (channels.map(tap_row), channels.map(bias_of));
            forward_channels_unfolded(simd, unfolded, layout, taps, biases, y, channels);
        } else {
            let channels: [usize; 2] = std::array::from_fn(channel);
            let (taps, biases) = (channels.map(tap_row), channels.map(bias_of));
            forward_channels_unfolded(simd, unfolded, layout, taps, biases, y, channels);
        }
    }
}

/// [`forward_channels`] from an unfolded image, into output channels `channels` of `y [O,
/// pixels]`: a block's rows are at constant offsets, the planes stored whole vectors at a time.
#[inline(always)]
fn forward_channels_unfolded<S: Simd, const CH: usize>(
    simd: S,
    unfolded: &[f32],
    layout: &PaddedLayout,
    taps: [&[f32]; CH],
    bias: [f32; CH],
    y: &mut [f32],
    channels: [usize; CH],
) {
    let (lanes, pixels) = (S::LANES, layout.pixels);
    let block_len = layout.taps_len * lanes;
    for (strip, blocks) in unfolded.chunks_exact(4 * block_len).enumerate() {
        let base = strip * 4 * lanes;
        if base >= pixels {
            // With LANES = 8 a plane's last strip of 32 may be past it, `cols_len` being a
            // multiple of 64.
            break;
        }
        let mut acc: [[S::V; 4]; CH] = std::array::from_fn(|c| [simd.splat(bias[c]); 4]);
        for t in 0..taps[0].len() {
            let w: [S::V; CH] = std::array::from_fn(|c| simd.splat(taps[c][t]));
            let x: [S::V; 4] =
                std::array::from_fn(|v| simd.load(&blocks[v * block_len + t * lanes..]));
            for (acc, &w) in acc.iter_mut().zip(&w) {
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    *acc = simd.mul_add(w, x, *acc);
                }
            }
        }
        for (acc, &o) in acc.iter().zip(&channels) {
            let plane = &mut y[o * pixels..(o + 1) * pixels];
            if base + 4 * lanes <= pixels {
                let strip = &mut plane[base..base + 4 * lanes];
                for (out, &acc) in strip.chunks_exact_mut(lanes).zip(acc) {
                    simd.store(acc, out);
                }
            } else {
                // The last, partial strip, through the stack: the values after it belong to
                // the next plane.
                let mut spill = [0.0; STRIP];
                for (out, &acc) in spill.chunks_exact_mut(lanes).zip(acc) {
                    simd.store(acc, out);
                }
                copy_short(&spill[..pixels - base], &mut plane[base..]);
            }
        }
    }
}

/// The plane starting at `wide` with the [`POOL_SLACK`] values after it that pooling reads.
fn wide_with_slack<'a>(wide: &'a [f32], layout: &PaddedLayout) -> &'a [f32] {
    &wide[..layout.wide_len + POOL_SLACK]
}

#[inline(always)]
fn relu_max_pool_2x2_body<M, const LANES: usize>(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    wide: &[f32],
    y: &mut [f32],
    argmax: Option<&mut [u32]>,
) {
    match argmax {
        Some(argmax) => relu_max_pool_2x2_windows::<M, LANES, true>(dims, layout, wide, y, argmax),
        None => relu_max_pool_2x2_windows::<M, LANES, false>(dims, layout, wide, y, &mut []),
    }
}

// LANES windows of a row at a time, their four pixels gathered into vectors first (a row of 13
// windows would not vectorize); the argmax too when ARGMAX (without it, evaluation's pooling
// ran the comparisons that pick it and stored it to scratch).
#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // `dispatched!` passes the multiply-add kind
fn relu_max_pool_2x2_windows<M, const LANES: usize, const ARGMAX: bool>(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    wide: &[f32],
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let out_w = dims.out_w();
    let (pooled_h, pooled_w) = (dims.out_h() / 2, out_w / 2);
    let relu = |v: f32| v.max(0.0);
    for window_h in 0..pooled_h {
        let top = &wide[2 * window_h * layout.width..];
        let below = &top[layout.width..];
        for first in (0..pooled_w).step_by(LANES) {
            // A last, partial vector reads past the row's windows (within the plane and its
            // POOL_SLACK) and stores only its own.
            let (top, below) = (
                &top[2 * first..][..2 * LANES],
                &below[2 * first..][..2 * LANES],
            );
            // Even and odd columns of two whole vectors each, indexed by constants: the
            // compiler makes permutes of them (a loop writing lane by lane went through memory).
            let halves = |row: &[f32]| -> [[f32; LANES]; 2] {
                std::array::from_fn(|h| {
                    row[h * LANES..(h + 1) * LANES]
                        .try_into()
                        .unwrap_or_else(|_| unreachable!("whole vectors"))
                })
            };
            let deinterleave = |[lo, hi]: [[f32; LANES]; 2], odd: usize| -> [f32; LANES] {
                std::array::from_fn(|l| {
                    let i = 2 * l + odd;
                    relu(if i < LANES { lo[i] } else { hi[i - LANES] })
                })
            };
            let (top, below) = (halves(top), halves(below));
            let pixels = [
                deinterleave(top, 0),
                deinterleave(top, 1),
                deinterleave(below, 0),
                deinterleave(below, 1),
            ];
            let mut best = pixels[0];
            let mut at = [0u32; LANES];
            let offsets = [1, out_w as u32, out_w as u32 + 1];
            for (values, offset) in pixels[1..].iter().zip(offsets) {
                for ((best, at), &v) in best.iter_mut().zip(at.iter_mut()).zip(values) {
                    // In scan order, as every pooling loop (see `replaces_max`).
                    let wins = replaces_max(v, *best);
                    *best = if wins { v } else { *best };
                    if ARGMAX {
                        *at = if wins { offset } else { *at };
                    }
                }
            }
            let corner = (2 * window_h * out_w + 2 * first) as u32;
            let found: [u32; LANES] = std::array::from_fn(|l| {
                if best[l] <= 0.0 {
                    super::NO_GRADIENT
                } else {
                    corner + 2 * l as u32 + at[l]
                }
            });
            // Whole vectors where the output has room, past this row's windows too: the next
            // row, or plane, is written later and overwrites them. (Copying just the 13
            // windows of a row went through memcpy and a stalled reload: 40% of the pooling.)
            let start = window_h * pooled_w + first;
            let n = LANES.min(pooled_w - first);
            match y.get_mut(start..start + LANES) {
                Some(y) => y.copy_from_slice(&best),
                None => copy_short(&best[..n], &mut y[start..start + n]),
            }
            if ARGMAX {
                match argmax.get_mut(start..start + LANES) {
                    Some(argmax) => argmax.copy_from_slice(&found),
                    None => copy_short(&found[..n], &mut argmax[start..start + n]),
                }
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_image_body<S: Simd>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    weight: &[f32],
    grad: ImageGrad<'_>,
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    mut dx: Option<(&mut [f32], ArrayViewMut3<'_, f32>)>,
) {
    let patch = dims.patch_len();
    let (ow, pixels) = (dims.out_w(), dims.out_pixels());
    let shifts = layout.shifts(dims);
    let shifts = &shifts[..patch];
    let len = layout.wide_len;
    let (unfolded, planes) = layout.split_scratch(wide);
    let (planes, unpooled) = planes.split_at_mut(layout.planes_len());
    if layout.unfolds {
        unfold(simd, dims, layout, padded, unfolded, planes);
    }
    let unfolded = &*unfolded;
    if let Some((padded_dx, _)) = dx.as_mut() {
        padded_dx.fill(0.0);
    }
    // dy goes into planes in the padded width for the shifted weight gradients and for dx;
    // their extra columns stay zero, so they add nothing.
    let padded_width = !layout.unfolds || dx.is_some();
    let planes = &mut planes[..GRAD_CHANNELS_AT_ONCE * len];
    if padded_width {
        planes.fill(0.0);
    }
    // Two channels at a time where there are registers for their 2 x TAP_GROUP sums (32 with
    // AVX-512; AVX2's 16 hold one channel's).
    let at_once = if S::LANES >= 16 {
        GRAD_CHANNELS_AT_ONCE
    } else {
        1
    };
    for first in (0..dims.out_channels).step_by(at_once) {
        let channels = first..(first + at_once).min(dims.out_channels);
        let grads: &[f32] = match grad {
            ImageGrad::Conv(grad) => &grad[channels.start * pixels..channels.end * pixels],
            ImageGrad::Pooled(dy, argmax) => {
                let pooled = dy.len() / dims.out_channels;
                let planes = &mut unpooled[..channels.len() * pixels];
                for (o, plane) in channels.clone().zip(planes.chunks_exact_mut(pixels)) {
                    let window = o * pooled..(o + 1) * pooled;
                    unpool_plane(&dy[window.clone()], &argmax[window], plane);
                }
                planes
            }
        };
        if padded_width {
            for (plane, grad) in planes.chunks_exact_mut(len).zip(grads.chunks_exact(pixels)) {
                for (row, grad) in plane.chunks_mut(layout.width).zip(grad.chunks_exact(ow)) {
                    copy_short(grad, &mut row[..ow]);
                }
            }
        }
        let (dw, db) = (
            &mut dw[channels.start * patch..channels.end * patch],
            &mut db[channels.clone()],
        );
        if layout.unfolds {
            let (grad0, grad1) = grads.split_at(pixels);
            match channels.len() {
                2 => {
                    let grads = [grad0, grad1];
                    weight_grads_unfolded(simd, grads, unfolded, layout, dw, db);
                }
                _ => weight_grads_unfolded(simd, [grad0], unfolded, layout, dw, db),
            }
        } else {
            let (plane0, plane1) = planes.split_at(len);
            match channels.len() {
                2 => weight_grads(simd, [plane0, plane1], padded, shifts, dw, db),
                _ => weight_grads(simd, [plane0], padded, shifts, dw, db),
            }
        }
        if let Some((padded_dx, _)) = dx.as_mut() {
            for (o, plane) in channels.zip(planes.chunks_exact(len)) {
                let taps = &weight[o * patch..(o + 1) * patch];
                for (&w, &shift) in taps.iter().zip(shifts) {
                    let w = simd.splat(w);
                    let target = &mut padded_dx[shift..shift + len];
                    for (t, g) in target
                        .chunks_exact_mut(S::LANES)
                        .zip(plane.chunks_exact(S::LANES))
                    {
                        let sum = simd.mul_add(w, simd.load(g), simd.load(t));
                        simd.store(sum, t);
                    }
                }
            }
        }
    }
    if let Some((padded_dx, mut dx)) = dx {
        for (c, mut channel) in dx.outer_iter_mut().enumerate() {
            for (h, mut row) in channel.outer_iter_mut().enumerate() {
                let start = c * layout.plane + (h + dims.pad_top) * layout.width + dims.pad_left;
                for (v, &g) in row.iter_mut().zip(&padded_dx[start..start + dims.in_w]) {
                    *v = g;
                }
            }
        }
    }
}

/// `dw [CH, patch] += planes (*) padded` and `db [CH] += sums of planes` for CH output
/// channels whose gradients `planes` are in padded width: [`TAP_GROUP`] taps at a time, every
/// sum in a register across the whole plane, so that each gradient vector is loaded once per
/// group and each shifted input vector once for all CH channels. (One dot product per tap
/// loaded two vectors per multiply-add and spent a fifth of its time adding up lanes.)
#[inline(always)]
fn weight_grads<S: Simd, const CH: usize>(
    simd: S,
    planes: [&[f32]; CH],
    padded: &[f32],
    shifts: &[usize],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (patch, len, lanes) = (shifts.len(), planes[0].len(), S::LANES);
    for (group, taps) in shifts.chunks(TAP_GROUP).enumerate() {
        // A short last group repeats its first tap, whose sums are dropped: a fixed count
        // keeps the sums in registers.
        let group_shifts: [usize; TAP_GROUP] =
            std::array::from_fn(|t| taps.get(t).copied().unwrap_or(taps[0]));
        let xs = group_shifts.map(|shift| &padded[shift..shift + len]);
        let mut acc = [[simd.splat(0.0); TAP_GROUP]; CH];
        let mut sums = [simd.splat(0.0); CH];
        for base in (0..len).step_by(lanes) {
            let g: [S::V; CH] = std::array::from_fn(|c| simd.load(&planes[c][base..]));
            if group == 0 {
                for (sum, &g) in sums.iter_mut().zip(&g) {
                    *sum = simd.add(*sum, g);
                }
            }
            for (t, x) in xs.iter().enumerate() {
                let x = simd.load(&x[base..]);
                for (acc, &g) in acc.iter_mut().zip(&g) {
                    acc[t] = simd.mul_add(g, x, acc[t]);
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            let dw = &mut dw[c * patch + group * TAP_GROUP..][..taps.len()];
            for (dw, &acc) in dw.iter_mut().zip(acc) {
                *dw += simd.sum(acc);
            }
        }
        if group == 0 {
            for (db, &sum) in db.iter_mut().zip(&sums) {
                *db += simd.sum(sum);
            }
        }
    }
}

/// [`weight_grads`] from an unfolded image, for gradients `grads` `[OH*OW]` as they are: a
/// block's rows are at constant offsets, so one pointer reaches all of a group's inputs.
#[inline(always)]
fn weight_grads_unfolded<S: Simd, const CH: usize>(
    simd: S,
    grads: [&[f32]; CH],
    unfolded: &[f32],
    layout: &PaddedLayout,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (lanes, pixels, patch) = (S::LANES, layout.pixels, dw.len() / CH);
    let whole = pixels / lanes;
    let block_len = layout.taps_len * lanes;
    // The last, partial vector of each gradient, zero-filled (the unfolded image is zero there).
    let tails: [[f32; STRIP]; CH] = std::array::from_fn(|c| {
        let mut tail = [0.0; STRIP];
        tail[..pixels - whole * lanes].copy_from_slice(&grads[c][whole * lanes..]);
        tail
    });
    let tail_block = unfolded.chunks_exact(block_len).nth(whole);
    for group in 0..layout.taps_len / TAP_GROUP {
        let mut acc = [[simd.splat(0.0); TAP_GROUP]; CH];
        let mut sums = [simd.splat(0.0); CH];
        let first_tap = group * TAP_GROUP * lanes;
        for (b, block) in unfolded.chunks_exact(block_len).take(whole).enumerate() {
            let g = std::array::from_fn(|c| simd.load(&grads[c][b * lanes..]));
            accumulate(simd, &mut acc, &mut sums, g, block, first_tap);
        }
        if let Some(block) = tail_block.filter(|_| whole * lanes < pixels) {
            let g = std::array::from_fn(|c| simd.load(&tails[c]));
            accumulate(simd, &mut acc, &mut sums, g, block, first_tap);
        }
        let taps = (group * TAP_GROUP..patch).take(TAP_GROUP);
        for (c, acc) in acc.iter().enumerate() {
            for (tap, &acc) in taps.clone().zip(acc.iter()) {
                dw[c * patch + tap] += simd.sum(acc);
            }
        }
        // Every group sums the gradients (two adds beside 2 x TAP_GROUP multiply-adds, and a
        // branch less in the loop); the first group's sums are kept.
        if group == 0 {
            for (db, &sum) in db.iter_mut().zip(&sums) {
                *db += simd.sum(sum);
            }
        }
    }
}

/// One vector of pixels of [`weight_grads_unfolded`]: `acc[c][t] += g[c] * (row first + t of
/// block)`, `sums[c] += g[c]`. (A function: a closure was not always inlined into the
/// `#[target_feature]` function, and its intrinsics became calls, 30x slower.)
#[inline(always)]
fn accumulate<S: Simd, const CH: usize>(
    simd: S,
    acc: &mut [[S::V; TAP_GROUP]; CH],
    sums: &mut [S::V; CH],
    g: [S::V; CH],
    block: &[f32],
    first: usize,
) {
    let block = &block[first..first + TAP_GROUP * S::LANES];
    for (sum, &g) in sums.iter_mut().zip(&g) {
        *sum = simd.add(*sum, g);
    }
    for t in 0..TAP_GROUP {
        let x = simd.load(&block[t * S::LANES..]);
        for (acc, &g) in acc.iter_mut().zip(&g) {
            acc[t] = simd.mul_add(g, x, acc[t]);
        }
    }
}
