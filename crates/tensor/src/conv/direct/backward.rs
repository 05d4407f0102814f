//! The direct convolution's backward kernels: the weight and bias gradients as sums of
//! shifted products, the input gradient as the forward pass's sums with the kernel flipped.

use ndarray::ArrayViewMut3;

use super::forward::unfold;
use super::{GRAD_CHANNELS_AT_ONCE, ImageGrad, PaddedLayout, STRIP, TAP_GROUP};
use crate::conv::fused::unpool_plane;
use crate::conv::unfold::copy_short;
use crate::conv::{Conv2dDims, NO_GRADIENT};
use crate::pool::Pool2dDims;
use crate::vector::{BLOCK_3X3_ONE, BLOCK_5X5_ONE, MaximaGrid, MaximaOut, Simd};

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
/// kernel and a bias fit in one register of 16, the 25 of a 5x5 kernel and a bias in two.
const MAXIMA_LANES: usize = 16;

/// The largest fraction (numerator, denominator) of an image's pooling windows passing
/// gradient for which [`maxima_body`] beats the dense kernels (measured
/// break-even near 0.8).
const MAXIMA_MOST_PASSING: (usize, usize) = (3, 4);

/// The scratch [`weight_grads_from_maxima`] needs for a plane of `windows` pooling windows.
pub(super) fn maxima_scratch_len(windows: usize) -> usize {
    3 * (windows + MAXIMA_LANES)
}

/// A 2x2-pooled gradient (stride 2) of one output plane, or of an image's planes one after
/// another.
#[derive(Clone, Copy)]
pub(crate) struct PooledGrad<'a> {
    /// The gradient of each window.
    pub(crate) dy: &'a [f32],
    /// Each window's maximum, a pixel of its convolution output plane, or NO_GRADIENT.
    pub(crate) argmax: &'a [u32],
    /// Windows to a pooled row.
    pub(crate) pool_w: usize,
}

/// Whether [`maxima_body`] takes a layer: a first layer (one input channel,
/// a 3x3 or 5x5 kernel, no input gradient) under 2x2 pooling with stride 2.
pub(super) fn takes_maxima(dims: &Conv2dDims, pool: &Pool2dDims, input_grad: bool) -> bool {
    !input_grad
        && dims.in_channels == 1
        && block_registers(dims).is_some()
        && pool.is_2x2_stride_2()
}

/// The registers a block of the kernel and a 1 fill in [`weight_grads_from_maxima`]: one for
/// a 3x3 kernel, two for a 5x5 one.
pub(super) fn block_registers(dims: &Conv2dDims) -> Option<usize> {
    match (dims.kernel_h, dims.kernel_w) {
        (3, 3) => Some(1),
        (5, 5) => Some(2),
        _ => None,
    }
}

/// The block of the padded image under a kernel of REGS registers ([`block_registers`]) whose
/// rows are `width` apart, from `rows[0]`, with a 1 ([`Simd::block_3x3`], [`Simd::block_5x5`]).
#[inline(always)]
fn block<S: Simd, const REGS: usize>(simd: S, rows: &[f32], width: usize) -> Option<[S::V; REGS]> {
    match REGS {
        1 => simd.block_3x3(rows, width).map(|b| [b; REGS]),
        2 => simd.block_5x5(rows, width).map(|[low, high]| {
            let mut both = [low; REGS];
            both[1] = high;
            both
        }),
        _ => None,
    }
}

/// The lane, counted across the REGS registers of [`block`], of tap (r, c) of the kernel, or
/// of its 1 for `None`.
fn block_lane<const REGS: usize>(tap: Option<(usize, usize)>) -> usize {
    match (REGS, tap) {
        (1, Some((r, c))) => 4 * r + c,
        (1, None) => BLOCK_3X3_ONE,
        (_, Some((r, c))) => 5 * r + c,
        (_, None) => BLOCK_5X5_ONE,
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn maxima_3x3_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    pooled: PooledGrad<'_>,
    maxima: &mut [u32],
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> bool {
    maxima_body::<S, 1>(simd, dims, layout, padded, pooled, maxima, wide, dw, db)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn maxima_5x5_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    pooled: PooledGrad<'_>,
    maxima: &mut [u32],
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> bool {
    maxima_body::<S, 2>(simd, dims, layout, padded, pooled, maxima, wide, dw, db)
}

/// What [`maxima_3x3_body`] (REGS = 1) and [`maxima_5x5_body`] (REGS = 2) run, each compiled
/// on its own: in one function together, the 3x3 loop kept more of its values on the stack
/// (one-conv's first layer backward 0.22 -> 0.25 ms).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn maxima_body<S: Simd, const REGS: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    PooledGrad { dy, argmax, pool_w }: PooledGrad<'_>,
    maxima: &mut [u32],
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) -> bool {
    let side = 2 * REGS + 1;
    if S::LANES != MAXIMA_LANES
        || (dims.kernel_h, dims.kernel_w) != (side, side)
        || block::<S, REGS>(simd, padded, layout.width).is_none()
    {
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
    for ((dw, db), (dy, argmax)) in dw.chunks_exact_mut(dims.patch_len()).zip(db).zip(planes) {
        let pooled = PooledGrad { dy, argmax, pool_w };
        let scratch = (&mut *maxima, &mut *unpooled);
        weight_grads_from_maxima::<S, REGS>(simd, dims, layout, padded, pooled, scratch, dw, db);
    }
    true
}

/// The weight and bias gradients of one output channel of a first layer (one input channel,
/// a 3x3 or 5x5 kernel, its block in REGS registers) from its 2x2-pooled gradient, without
/// unpooling it: each window's gradient times the block of the padded image at its maximum
/// ([`Simd::block_3x3`], [`Simd::block_5x5`]), the windows
/// taken in their maxima's pixel order ([`Simd::maxima_in_pixel_order`], with `maxima` as
/// scratch). Unpooling wrote a whole plane, three quarters zeros, and the weight
/// gradient then read it all back with the unfolded image: two thirds of the first layer's
/// backward pass, whose multiply-adds take a twentieth of it at the peak.
///
/// The same bits as unpooling and [`weight_grads_unfolded`] (or [`weight_grads`]): those sum
/// the pixels p of lane `p % 16` in pixel order and add the 16 lanes up as [`Simd::sum`] does.
/// Here each lane class has registers of its own, whose lanes hold its taps' sums and its
/// bias's; the maxima come in pixel order, the zeros between them add nothing, and the 16
/// classes are added up in the same tree. A plane with a maximum outside its window (a
/// caller's argmax) is unpooled into `unpooled` and read whole, in order.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn weight_grads_from_maxima<S: Simd, const REGS: usize>(
    simd: S,
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    pooled: PooledGrad<'_>,
    (maxima, unpooled): (&mut [u32], &mut [f32]),
    dw: &mut [f32],
    db: &mut f32,
) {
    let mut classes = [[simd.splat(0.0); REGS]; MAXIMA_LANES];
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
                add_blocks::<S, REGS, true>(simd, &mut classes, width, padded, maxima);
            } else {
                add_blocks::<S, REGS, false>(simd, &mut classes, width, padded, maxima);
            }
        }
        None => {
            unpool_plane(pooled.dy, pooled.argmax, unpooled);
            let pixels = unpooled.iter().enumerate().map(|(at, &g)| {
                let start = at / ow * width + at % ow;
                (g, at as u32, start as u32)
            });
            if layout.unfolds {
                add_blocks::<S, REGS, true>(simd, &mut classes, width, padded, pixels);
            } else {
                add_blocks::<S, REGS, false>(simd, &mut classes, width, padded, pixels);
            }
        }
    }
    // Lane i plus lane i + 8, then i + 4, i + 2, i + 1, as `Simd::sum` adds.
    let mut half = MAXIMA_LANES / 2;
    while half > 0 {
        for i in 0..half {
            let upper = classes[i + half];
            for (sums, upper) in classes[i].iter_mut().zip(upper) {
                *sums = simd.add(*sums, upper);
            }
        }
        half /= 2;
    }
    let mut lanes = [0.0f32; 2 * MAXIMA_LANES];
    for (k, &sums) in classes[0].iter().enumerate() {
        simd.store(sums, &mut lanes[k * MAXIMA_LANES..]);
    }
    for (r, dw) in dw.chunks_exact_mut(dims.kernel_w).enumerate() {
        for (c, dw) in dw.iter_mut().enumerate() {
            *dw += lanes[block_lane::<REGS>(Some((r, c)))];
        }
    }
    *db += lanes[block_lane::<REGS>(None)];
}

/// Pixels of [`weight_grads_from_maxima`], each `(g, at, start)`: its lane class += `g` times
/// the block at `start` in the padded image (`width` wide), and g. The class is the
/// pixel's index `at` in the output's own width where the dense kernels unfold the image
/// (`OWN_WIDTH`), else its index `start` in the padded width.
#[inline(always)]
fn add_blocks<S: Simd, const REGS: usize, const OWN_WIDTH: bool>(
    simd: S,
    classes: &mut [[S::V; REGS]; MAXIMA_LANES],
    width: usize,
    padded: &[f32],
    pixels: impl Iterator<Item = (f32, u32, u32)>,
) {
    // A block's rows: 3 of 3 values, or 5 of 5.
    let side = 2 * REGS + 1;
    for (g, at, start) in pixels {
        let pixel = if OWN_WIDTH { at } else { start };
        let class = &mut classes[pixel as usize % MAXIMA_LANES];
        let start = start as usize;
        let rows = &padded[start..start + (side - 1) * width + side];
        if let Some(block) = block::<S, REGS>(simd, rows, width) {
            let g = simd.splat(g);
            for (class, block) in class.iter_mut().zip(block) {
                *class = simd.mul_add(g, block, *class);
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
