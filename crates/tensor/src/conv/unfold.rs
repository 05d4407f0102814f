//! im2col and col2im: a convolution's input unfolded into the matrix a GEMM multiplies, and
//! that matrix's gradient folded back onto the input.

use std::borrow::Cow;

use ndarray::{Array3, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, ArrayViewMut3};

use super::{Conv2dDims, contiguous, contiguous_mut};

/// Unfolds one image `x [C, H, W]` into `cols [C*KH*KW, OH*OW]`: row `(c, kh, kw)` holds, for
/// every output pixel, the input value under kernel tap (kh, kw), or 0 in the padding.
pub fn im2col(dims: &Conv2dDims, x: ArrayView3<'_, f32>, mut cols: ArrayViewMut2<'_, f32>) {
    let x = x.as_standard_layout();
    let x = contiguous(&x);
    let plane_len = dims.in_h * dims.in_w;
    for (r, mut row) in cols.outer_iter_mut().enumerate() {
        let (c, kh, kw) = dims.tap_of_row(r);
        let plane = &x[c * plane_len..(c + 1) * plane_len];
        match row.as_slice_mut() {
            Some(out) => unfold_tap(dims, plane, kh, kw, out),
            None => {
                // A caller's strided view: unfold into a contiguous row first.
                let mut out = vec![0.0; row.len()];
                unfold_tap(dims, plane, kh, kw, &mut out);
                row.assign(&ArrayView1::from(&out));
            }
        }
    }
}

/// One row of [`im2col`]: for every output pixel, the value of `plane [H, W]` under kernel tap
/// (kh, kw), or 0 in the padding. Rows of the input are copied as runs, which is what makes
/// unfolding cheap next to the GEMM it feeds.
fn unfold_tap(dims: &Conv2dDims, plane: &[f32], kh: usize, kw: usize, out: &mut [f32]) {
    let ow_count = dims.out_w();
    let (lo, hi) = valid_outputs(kw, dims.pad_left, dims.stride_w, dims.in_w, ow_count);
    for (oh, out) in out.chunks_exact_mut(ow_count).enumerate() {
        let Some(ih) = input_row(dims, oh, kh) else {
            out.fill(0.0);
            continue;
        };
        out[..lo].fill(0.0);
        out[hi..].fill(0.0);
        if lo == hi {
            continue;
        }
        let input = &plane[ih * dims.in_w..(ih + 1) * dims.in_w];
        let first = lo * dims.stride_w + kw - dims.pad_left;
        if dims.stride_w == 1 {
            copy_short(&input[first..first + (hi - lo)], &mut out[lo..hi]);
        } else {
            let taken = input[first..].iter().step_by(dims.stride_w);
            for (o, &v) in out[lo..hi].iter_mut().zip(taken) {
                *o = v;
            }
        }
    }
}

/// Folds `dcols [C*KH*KW, OH*OW]` back onto `dx [C, H, W]` (overwriting it): each input pixel
/// receives the sum of the gradients of every output pixel whose receptive field covers it.
pub fn col2im(dims: &Conv2dDims, dcols: ArrayView2<'_, f32>, mut dx: ArrayViewMut3<'_, f32>) {
    match dx.as_slice_mut() {
        Some(dx) => fold_taps(dims, dcols, dx),
        None => {
            // A caller's strided view: fold into a contiguous image first.
            let mut folded = Array3::zeros(dx.raw_dim());
            fold_taps(dims, dcols, contiguous_mut(&mut folded));
            dx.assign(&folded);
        }
    }
}

/// [`col2im`] onto a contiguous `dx`, tap by tap in a fixed order.
fn fold_taps(dims: &Conv2dDims, dcols: ArrayView2<'_, f32>, dx: &mut [f32]) {
    dx.fill(0.0);
    let (plane_len, ow_count) = (dims.in_h * dims.in_w, dims.out_w());
    for (r, row) in dcols.outer_iter().enumerate() {
        let row = row
            .as_slice()
            .map_or_else(|| row.to_vec().into(), Cow::Borrowed);
        let (c, kh, kw) = dims.tap_of_row(r);
        let plane = &mut dx[c * plane_len..(c + 1) * plane_len];
        let (lo, hi) = valid_outputs(kw, dims.pad_left, dims.stride_w, dims.in_w, ow_count);
        for (oh, grad) in row.chunks_exact(ow_count).enumerate() {
            let Some(ih) = input_row(dims, oh, kh).filter(|_| lo < hi) else {
                continue;
            };
            let input = &mut plane[ih * dims.in_w..(ih + 1) * dims.in_w];
            let first = lo * dims.stride_w + kw - dims.pad_left;
            let grad = &grad[lo..hi];
            if dims.stride_w == 1 {
                // Two plain slices: the loop vectorizes.
                for (v, &g) in input[first..first + grad.len()].iter_mut().zip(grad) {
                    *v += g;
                }
            } else {
                let targets = input[first..].iter_mut().step_by(dims.stride_w);
                for (v, &g) in targets.zip(grad) {
                    *v += g;
                }
            }
        }
    }
}

/// Copies a short run (an image row) without a call to `memcpy`, which for rows of 11 or 26
/// values costs more than the copy: in copies of 8 values (one vector each), the last one
/// overlapping the one before rather than ending in a loop over single values.
#[inline(always)]
pub(super) fn copy_short<T: Copy>(from: &[T], to: &mut [T]) {
    let n = from.len().min(to.len());
    if n < 8 {
        to[..n].copy_from_slice(&from[..n]);
        return;
    }
    let mut i = 0;
    while i + 8 <= n {
        to[i..i + 8].copy_from_slice(&from[i..i + 8]);
        i += 8;
    }
    if i < n {
        to[n - 8..n].copy_from_slice(&from[n - 8..n]);
    }
}

/// The input row under kernel row `kh` of output row `oh`, or `None` in the top or bottom
/// padding.
fn input_row(dims: &Conv2dDims, oh: usize, kh: usize) -> Option<usize> {
    (oh * dims.stride_h + kh)
        .checked_sub(dims.pad_top)
        .filter(|&ih| ih < dims.in_h)
}

/// The output columns `ow_lo..ow_hi` whose kernel tap `kw` lands inside the input (not in the
/// left or right padding): `0 <= ow * stride + kw - pad < W`.
fn valid_outputs(
    kw: usize,
    pad: usize,
    stride: usize,
    width: usize,
    count: usize,
) -> (usize, usize) {
    let lo = pad.saturating_sub(kw).div_ceil(stride).min(count);
    // ow * stride < width + pad - kw
    let hi = match (width + pad).checked_sub(kw) {
        Some(limit) => limit.div_ceil(stride).min(count),
        None => 0,
    };
    (lo, hi.max(lo))
}
