//! The direct convolution's forward kernels: sums of shifted planes, from the padded image
//! or from its unfolded copy, and the fused (ReLU +) 2x2 pooling of a padded-width plane.

use super::{CHANNELS_AT_ONCE, Output, POOL_SLACK, PaddedLayout, STRIP, max_pool_2x2};
use crate::conv::Conv2dDims;
use crate::conv::fused::BeforePool;
use crate::conv::unfold::copy_short;
use crate::pool::replaces_max;
use crate::vector::Simd;

/// Unfolds a padded image into `unfolded` ([`PaddedLayout::unfolded_len`] values), a block of
/// `taps_len x LANES` values for every LANES pixels: row t of block b holds the inputs that
/// receptive-field value t multiplies at pixels `b * LANES..`, zero past the last pixel (rows
/// past the patch hold whatever was there: their sums are dropped). A block's rows are
/// contiguous, so that the loops over them need one pointer and constant offsets. `row`
/// (`cols_len` values) is scratch.
#[inline(always)]
pub(super) fn unfold<S: Simd>(
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
pub(super) fn forward_channels_at_once<S: Simd>(dims: &Conv2dDims) -> usize {
    if S::LANES >= 16 && dims.out_channels.is_multiple_of(CHANNELS_AT_ONCE) {
        CHANNELS_AT_ONCE
    } else {
        2
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_image_body<S: Simd, const LANES: usize>(
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
                Output::MaxPool2x2(before, y, argmax) => max_pool_2x2(
                    dims,
                    layout,
                    *before,
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
pub(super) fn forward_channels<S: Simd, const CH: usize>(
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
pub(super) fn forward_unfolded<S: Simd>(
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
pub(super) fn forward_channels_unfolded<S: Simd, const CH: usize>(
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
pub(super) fn wide_with_slack<'a>(wide: &'a [f32], layout: &PaddedLayout) -> &'a [f32] {
    &wide[..layout.wide_len + POOL_SLACK]
}

#[inline(always)]
pub(super) fn max_pool_2x2_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    before: BeforePool,
    wide: &[f32],
    y: &mut [f32],
    argmax: Option<&mut [u32]>,
) {
    // The activation as a constant, so that each loop is compiled for one (first conv of the
    // pooling-first fast-cnn, forward: 0.83-0.90 ms a batch with the choice made in the loop,
    // 0.64-0.76 ms with it constant, on a noisy host).
    use max_pool_2x2_windows as windows;
    match (argmax, before) {
        (Some(a), BeforePool::Relu) => {
            windows::<S, LANES, true, true>(simd, dims, layout, wide, y, a)
        }
        (Some(a), BeforePool::Nothing) => {
            windows::<S, LANES, true, false>(simd, dims, layout, wide, y, a)
        }
        (None, BeforePool::Relu) => {
            windows::<S, LANES, false, true>(simd, dims, layout, wide, y, &mut [])
        }
        (None, BeforePool::Nothing) => {
            windows::<S, LANES, false, false>(simd, dims, layout, wide, y, &mut [])
        }
    }
}

// LANES windows of a row at a time, their four pixels gathered into vectors first (a row of 13
// windows would not vectorize); the argmax too when ARGMAX (without it, evaluation's pooling
// ran the comparisons that pick it and stored it to scratch).
#[inline(always)]
pub(super) fn max_pool_2x2_windows<
    S: Simd,
    const LANES: usize,
    const ARGMAX: bool,
    const RELU: bool,
>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    wide: &[f32],
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let before = BeforePool::relu_if(RELU);
    let out_w = dims.out_w();
    let (pooled_h, pooled_w) = (dims.out_h() / 2, out_w / 2);
    for window_h in 0..pooled_h {
        let top = &wide[2 * window_h * layout.width..];
        let below = &top[layout.width..];
        for first in (0..pooled_w).step_by(LANES) {
            // A last, partial vector reads past the row's windows (within the plane and its
            // POOL_SLACK) and stores only its own.
            // The even and odd columns by explicit shuffles: left to the compiler (an array
            // indexed `2 * l + odd`), they went lane by lane through the stack unless the
            // ReLU's max(0) happened to make it shuffle (0.52 ms against 0.28 ms a batch for
            // fast-cnn's first convolution).
            let mut pixels = [[0.0f32; LANES]; 4];
            let [top_left, top_right, below_left, below_right] = &mut pixels;
            simd.deinterleave(&top[2 * first..], top_left, top_right);
            simd.deinterleave(&below[2 * first..], below_left, below_right);
            if RELU {
                for v in pixels.as_flattened_mut() {
                    *v = before.apply(*v);
                }
            }
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
                if before.blocks(best[l]) {
                    crate::conv::NO_GRADIENT
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
