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

use ndarray::{ArrayView3, ArrayViewMut3};

use super::{Conv2dDims, copy_short};
use crate::pool::replaces_max;
use crate::simd::{MulAdd, dispatched, dot, tree_sum};

/// The longest receptive field (C*KH*KW) convolved directly: at 27 (three channels, 3x3) GEMM is
/// still starved; conv 6->16 5x5 (150) runs faster as im2col + GEMM.
pub(crate) const MAX_PATCH: usize = 32;

/// A multiple of every strip of outputs computed at once (four vector registers: 32 or 64).
const STRIP: usize = 64;

/// Values a plane of [`PaddedLayout::wide_len`] needs after it for [`forward_image`]'s pooling,
/// whose last vector of windows may read past the plane.
pub(crate) const POOL_SLACK: usize = 32;

/// Whether [`Conv2dDims`] describes a convolution computed directly rather than by im2col.
pub(crate) fn applies(dims: &Conv2dDims) -> bool {
    dims.stride_h == 1 && dims.stride_w == 1 && dims.patch_len() <= MAX_PATCH
}

/// Sizes of the padded layout of one image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PaddedLayout {
    /// WP = W + pad_left + pad_right.
    width: usize,
    /// HP * WP.
    plane: usize,
    /// `OH * WP` rounded up to whole strips: the length of one output plane in padded width.
    pub(crate) wide_len: usize,
    /// `C * HP * WP` and enough zeros after it that every shifted read of a strip is in bounds.
    pub(crate) image_len: usize,
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
        }
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

/// Where [`forward_image`] puts its output.
pub(crate) enum Output<'a> {
    /// The convolution, `[O, OH*OW]`.
    Plain(&'a mut [f32]),
    /// ReLU and 2x2 max pooling (stride 2) of it, and the argmax of each window, `[O, PH*PW]`
    /// each: the comparisons of `max_pool_plane` in the same order, so the same bits.
    ReluMaxPool2x2(&'a mut [f32], &'a mut [u32]),
}

dispatched! {
    /// The convolution of one padded image: `out [O, OH*OW] = W [O, C*KH*KW] (*) padded
    /// (+ bias)`, or its pooling, using `wide` (`wide_len + POOL_SLACK` values) as scratch.
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
    /// values) as scratch. `grad` is `dy [O, OH*OW]`; `wide` (`wide_len` values) is scratch.
    fn backward_image(
        dims: &Conv2dDims,
        layout: &PaddedLayout,
        padded: &[f32],
        weight: &[f32],
        grad: &[f32],
        wide: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        dx: Option<(&mut [f32], ArrayViewMut3<'_, f32>)>,
    ) => backward_image_body;
}

#[inline(always)]
fn forward_image_body<M: MulAdd, const LANES: usize>(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    wide: &mut [f32],
    mut out: Output<'_>,
) {
    let patch = dims.patch_len();
    let (ow, pixels) = (dims.out_w(), dims.out_pixels());
    let pooled = (dims.out_h() / 2) * (ow / 2);
    let shifts = layout.shifts(dims);
    let shifts = &shifts[..patch];
    for (o, taps) in weight.chunks_exact(patch).enumerate() {
        let start = bias.map_or(0.0, |b| b[o]);
        // Four vector registers of outputs at a time, summed over every tap before they are
        // stored. (`wide_len` is a multiple of every strip length.)
        for (s, strip) in wide[..layout.wide_len]
            .chunks_exact_mut(4 * LANES)
            .enumerate()
        {
            let base = s * 4 * LANES;
            let mut acc = [[start; LANES]; 4];
            for (&w, &shift) in taps.iter().zip(shifts) {
                let x = &padded[base + shift..base + shift + 4 * LANES];
                for (acc, x) in acc.iter_mut().zip(x.chunks_exact(LANES)) {
                    for (a, &v) in acc.iter_mut().zip(x) {
                        *a = M::mul_add(w, v, *a);
                    }
                }
            }
            for (strip, acc) in strip.chunks_exact_mut(LANES).zip(&acc) {
                strip.copy_from_slice(acc);
            }
        }
        match &mut out {
            Output::Plain(out) => {
                let out = &mut out[o * pixels..(o + 1) * pixels];
                for (out, row) in out.chunks_exact_mut(ow).zip(wide.chunks(layout.width)) {
                    copy_short(&row[..ow], out);
                }
            }
            Output::ReluMaxPool2x2(y, argmax) => relu_max_pool_2x2::<LANES>(
                dims,
                layout,
                wide,
                &mut y[o * pooled..(o + 1) * pooled],
                &mut argmax[o * pooled..(o + 1) * pooled],
            ),
        }
    }
}

/// ReLU and 2x2 max pooling (stride 2) of one output plane in the padded width: LANES windows
/// of a row at a time, their four pixels gathered into vectors first (a row of 13 windows
/// would not vectorize), compared in `max_pool_plane`'s order.
#[inline(always)]
fn relu_max_pool_2x2<const LANES: usize>(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    wide: &[f32],
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let out_w = dims.out_w();
    let pooled_w = out_w / 2;
    let relu = |v: f32| v.max(0.0);
    let rows = y
        .chunks_exact_mut(pooled_w)
        .zip(argmax.chunks_exact_mut(pooled_w));
    for (window_h, (y, argmax)) in rows.enumerate() {
        let top = &wide[2 * window_h * layout.width..];
        let below = &top[layout.width..];
        for (first, (y, argmax)) in (0..)
            .step_by(LANES)
            .zip(y.chunks_mut(LANES).zip(argmax.chunks_mut(LANES)))
        {
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
                    *at = if wins { offset } else { *at };
                }
            }
            let corner = (2 * window_h * out_w + 2 * first) as u32;
            // Whole vectors first, then a short copy of the windows that are there: a loop over
            // 13 of them would run one by one.
            let found: [u32; LANES] = std::array::from_fn(|l| {
                if best[l] <= 0.0 {
                    super::NO_GRADIENT
                } else {
                    corner + 2 * l as u32 + at[l]
                }
            });
            let n = y.len();
            copy_short(&best[..n], y);
            copy_short(&found[..n], argmax);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_image_body<M: MulAdd, const LANES: usize>(
    dims: &Conv2dDims,
    layout: &PaddedLayout,
    padded: &[f32],
    weight: &[f32],
    grad: &[f32],
    wide: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    mut dx: Option<(&mut [f32], ArrayViewMut3<'_, f32>)>,
) {
    let patch = dims.patch_len();
    let (ow, pixels) = (dims.out_w(), dims.out_pixels());
    let shifts = layout.shifts(dims);
    let shifts = &shifts[..patch];
    if let Some((padded_dx, _)) = dx.as_mut() {
        padded_dx.fill(0.0);
    }
    wide.fill(0.0);
    for (o, ((grad, dw), db)) in grad
        .chunks_exact(pixels)
        .zip(dw.chunks_exact_mut(patch))
        .zip(db.iter_mut())
        .enumerate()
    {
        // dy in padded width; the extra columns stay zero, so they add nothing below.
        for (row, grad) in wide.chunks_mut(layout.width).zip(grad.chunks_exact(ow)) {
            copy_short(grad, &mut row[..ow]);
        }
        *db += lane_sum::<M, LANES>(wide);
        for (dw, &shift) in dw.iter_mut().zip(shifts) {
            *dw += dot::<M, LANES>(wide, &padded[shift..shift + layout.wide_len]);
        }
        if let Some((padded_dx, _)) = dx.as_mut() {
            let taps = &weight[o * patch..(o + 1) * patch];
            for (&w, &shift) in taps.iter().zip(shifts) {
                let target = &mut padded_dx[shift..shift + layout.wide_len];
                for (t, &g) in target.iter_mut().zip(wide.iter()) {
                    *t = M::mul_add(w, g, *t);
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

/// The sum of `values` (a multiple of LANES long) in LANES running sums, added up in a fixed
/// order at the end: a sequential sum cannot be vectorized.
#[inline(always)]
fn lane_sum<M: MulAdd, const LANES: usize>(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    for chunk in values.chunks_exact(LANES) {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    tree_sum(&acc)
}
