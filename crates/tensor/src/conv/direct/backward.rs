//! The direct convolution's backward kernels: the weight and bias gradients as sums of
//! shifted products, the input gradient as the forward pass's sums with the kernel flipped.

use ndarray::ArrayViewMut3;

use super::forward::unfold;
use super::{GRAD_CHANNELS_AT_ONCE, ImageGrad, PaddedLayout, STRIP, TAP_GROUP};
use crate::conv::Conv2dDims;
use crate::conv::fused::unpool_plane;
use crate::conv::unfold::copy_short;
use crate::vector::Simd;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_image_body<S: Simd, const LANES: usize>(
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
pub(super) fn weight_grads<S: Simd, const CH: usize>(
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
pub(super) fn weight_grads_unfolded<S: Simd, const CH: usize>(
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
pub(super) fn accumulate<S: Simd, const CH: usize>(
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
