//! The direct convolution's backward kernels: the weight and bias gradients as sums of
//! shifted products, the input gradient as the forward pass's sums with the kernel flipped.

use ndarray::ArrayViewMut3;

use super::forward::unfold;
use super::{GRAD_CHANNELS_AT_ONCE, ImageGrad, PaddedLayout, STRIP, TAP_GROUP};
use crate::conv::fused::unpool_plane;
use crate::conv::unfold::copy_short;
use crate::conv::{Conv2dDims, NO_GRADIENT};
use crate::pool::Pool2dDims;
use crate::vector::{BLOCK_3X3_ONE, MaximaGrid, MaximaOut, Simd};

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

/// The lanes of the registers [`weight_grads_from_maxima`] runs on: the nine taps of a 3x3
/// kernel and a bias fit in 16.
const MAXIMA_LANES: usize = 16;

/// The largest fraction (numerator, denominator) of an image's pooling windows passing
/// gradient for which [`weight_grads_from_maxima_body`] beats the dense kernels (measured
/// break-even near 0.8).
const MAXIMA_MOST_PASSING: (usize, usize) = (3, 4);

/// The scratch [`weight_grads_from_maxima`] needs for a plane of `windows` pooling windows.
pub(super) fn maxima_scratch_len(windows: usize) -> usize {
    3 * (windows + MAXIMA_LANES)
}

/// One output channel's plane of 2x2-pooled gradient (stride 2, `pool_w` windows to a row).
#[derive(Clone, Copy)]
struct PooledPlane<'a> {
    dy: &'a [f32],
    /// Each window's maximum, a pixel of the convolution output, or NO_GRADIENT.
    argmax: &'a [u32],
    pool_w: usize,
}

/// Whether [`weight_grads_from_maxima_body`] takes a layer: a first layer (one input channel,
/// a 3x3 kernel, no input gradient) under 2x2 pooling with stride 2.
pub(super) fn takes_maxima(dims: &Conv2dDims, pool: &Pool2dDims, input_grad: bool) -> bool {
    !input_grad
        && dims.in_channels == 1
        && (dims.kernel_h, dims.kernel_w) == (3, 3)
        && pool.is_2x2_stride_2()
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn weight_grads_from_maxima_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    dy: &[f32],
    argmax: &[u32],
    pool_w: usize,
    maxima: &mut [u32],
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> bool {
    if S::LANES != MAXIMA_LANES || simd.block_3x3(padded, layout.width).is_none() {
        return false;
    }
    // Each maximum costs a chain of loads and a multiply-add into memory, where the dense
    // kernels spend a few multiply-adds per 16 pixels: two-conv's first layer, with 54% of
    // its windows passing gradient behind a ReLU, took 0.64x the dense pass's time; fast-cnn's,
    // with all of them passing (no ReLU before the pooling), 1.33x.
    let passing: u32 = argmax.iter().map(|&at| u32::from(at != NO_GRADIENT)).sum();
    if passing as usize * MAXIMA_MOST_PASSING.1 > argmax.len() * MAXIMA_MOST_PASSING.0 {
        return false;
    }
    let windows = dy.len() / dims.out_channels;
    let planes = dy.chunks_exact(windows).zip(argmax.chunks_exact(windows));
    let (_, scratch) = layout.split_scratch(wide);
    let unpooled = &mut scratch[layout.planes_len()..][..dims.out_pixels()];
    for ((dw, db), (dy, argmax)) in dw.chunks_exact_mut(9).zip(db).zip(planes) {
        let pooled = PooledPlane { dy, argmax, pool_w };
        weight_grads_from_maxima(simd, dims, layout, padded, pooled, maxima, unpooled, dw, db);
    }
    true
}

/// The weight and bias gradients of one output channel of a first layer (one input channel,
/// a 3x3 kernel) from its 2x2-pooled gradient, without unpooling it: each window's gradient
/// times the 3x3 block of the padded image at its maximum ([`Simd::block_3x3`]), the windows
/// taken in their maxima's pixel order ([`Simd::maxima_in_pixel_order`], with `maxima` as
/// scratch). Unpooling wrote a whole plane, three quarters zeros, and the weight
/// gradient then read it all back with the unfolded image: two thirds of the first layer's
/// backward pass, whose multiply-adds take a twentieth of it at the peak.
///
/// The same bits as unpooling and [`weight_grads_unfolded`] (or [`weight_grads`]): those sum
/// the pixels p of lane `p % 16` in pixel order and add the 16 lanes up as [`Simd::sum`] does.
/// Here each lane class is a register of its own, whose lanes hold its nine taps' sums and
/// its bias's; the maxima come in pixel order, the zeros between them add nothing, and the 16
/// registers are added up in the same tree. A plane with a maximum outside its window (a
/// caller's argmax) is unpooled into `unpooled` and read whole, in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weight_grads_from_maxima<S: Simd>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    pooled: PooledPlane<'_>,
    maxima: &mut [u32],
    unpooled: &mut [f32],
    dw: &mut [f32],
    db: &mut f32,
) {
    let mut classes = [simd.splat(0.0); MAXIMA_LANES];
    let (ow, width) = (dims.out_w(), layout.width);
    let (pixels, rest) = maxima.split_at_mut(maxima.len() / 3);
    let (starts, grads) = rest.split_at_mut(rest.len() / 2);
    let grid = MaximaGrid {
        pool_w: pooled.pool_w,
        out_w: ow,
        padded_w: width,
    };
    let out = MaximaOut {
        pixels,
        starts,
        grads,
    };
    match simd.maxima_in_pixel_order(pooled.dy, pooled.argmax, grid, out) {
        Some(count) => {
            let maxima = pixels[..count]
                .iter()
                .zip(&starts[..count])
                .zip(&grads[..count]);
            let maxima = maxima.map(|((&at, &start), &g)| (f32::from_bits(g), at, start));
            // The branch outside the loop.
            if layout.unfolds {
                add_blocks::<S, true>(simd, &mut classes, width, padded, maxima);
            } else {
                add_blocks::<S, false>(simd, &mut classes, width, padded, maxima);
            }
        }
        None => {
            unpool_plane(pooled.dy, pooled.argmax, unpooled);
            let pixels = unpooled.iter().enumerate().map(|(at, &g)| {
                let start = at / ow * width + at % ow;
                (g, at as u32, start as u32)
            });
            if layout.unfolds {
                add_blocks::<S, true>(simd, &mut classes, width, padded, pixels);
            } else {
                add_blocks::<S, false>(simd, &mut classes, width, padded, pixels);
            }
        }
    }
    // Lane i plus lane i + 8, then i + 4, i + 2, i + 1, as `Simd::sum` adds.
    let mut half = MAXIMA_LANES / 2;
    while half > 0 {
        for i in 0..half {
            classes[i] = simd.add(classes[i], classes[i + half]);
        }
        half /= 2;
    }
    let mut lanes = [0.0f32; MAXIMA_LANES];
    simd.store(classes[0], &mut lanes);
    for (r, dw) in dw.chunks_exact_mut(3).enumerate() {
        for (c, dw) in dw.iter_mut().enumerate() {
            *dw += lanes[4 * r + c];
        }
    }
    *db += lanes[BLOCK_3X3_ONE];
}

/// Pixels of [`weight_grads_from_maxima`], each `(g, at, start)`: its lane class += `g` times
/// the 3x3 block at `start` in the padded image (`width` wide), and g. The class is the
/// pixel's index `at` in the output's own width where the dense kernels unfold the image
/// (`OWN_WIDTH`), else its index `start` in the padded width.
#[inline(always)]
fn add_blocks<S: Simd, const OWN_WIDTH: bool>(
    simd: S,
    classes: &mut [S::V; MAXIMA_LANES],
    width: usize,
    padded: &[f32],
    pixels: impl Iterator<Item = (f32, u32, u32)>,
) {
    for (g, at, start) in pixels {
        let pixel = if OWN_WIDTH { at } else { start };
        let class = &mut classes[pixel as usize % MAXIMA_LANES];
        let start = start as usize;
        if let Some(block) = simd.block_3x3(&padded[start..start + 2 * width + 3], width) {
            *class = simd.mul_add(simd.splat(g), block, *class);
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
