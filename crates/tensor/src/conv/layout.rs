//! Channels-last copies of images and weights, `[HP, WP, C]` and `[O, KH, KW, C]`: the layout
//! in which a receptive field's kernel row is one run of `KW*C` values, which the implicit
//! GEMM and the scatter read in place.

use ndarray::{ArrayView2, ArrayView3, ArrayViewMut3, s};

use super::Conv2dDims;
use crate::simd::dispatched;
use crate::vector::Simd;

/// Extra values a buffer holds so that a slice of it can start on a 64-byte boundary.
pub(crate) const ALIGN_SLACK: usize = 16;

/// `buffer` from its first 64-byte boundary: the channels-last kernels' vector loads and stores are whole
/// 64-byte lines then (image rows and weight rows are multiples of 16 values for C = 32), and
/// a load or store split over two lines costs two.
pub(crate) fn aligned(buffer: &[f32]) -> &[f32] {
    &buffer[buffer.as_ptr().align_offset(64).min(buffer.len())..]
}

/// [`aligned`] for a mutable buffer.
pub(crate) fn aligned_mut(buffer: &mut [f32]) -> &mut [f32] {
    let skip = buffer.as_ptr().align_offset(64).min(buffer.len());
    &mut buffer[skip..]
}

/// Values in one zero-padded channels-last image `[HP, WP, C]`.
pub(crate) fn image_len(dims: &Conv2dDims) -> usize {
    dims.padded_h() * dims.padded_w() * dims.in_channels
}

/// Where input pixel (h, w) of `x [C, H, W]` starts in the padded channels-last image.
fn pixel_start(dims: &Conv2dDims, h: usize, w: usize) -> usize {
    ((h + dims.pad_top) * dims.padded_w() + w + dims.pad_left) * dims.in_channels
}

dispatched! {
    /// Writes the transpose of `src [rows, cols]` (row r at `src[r * src_stride..]`) into
    /// `dst [cols, rows]` (row c at `dst[c * dst_stride..]`).
    fn transpose(
        src: &[f32],
        src_stride: usize,
        rows: usize,
        cols: usize,
        dst: &mut [f32],
        dst_stride: usize,
    ) => transpose_body;
}

#[inline(always)]
fn transpose_body<S: Simd, const LANES: usize>(
    simd: S,
    src: &[f32],
    src_stride: usize,
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    // Blocks of 8x8 in registers (value by value, the channels-last copies of the implicit
    // GEMM's images and outputs took a quarter of a conv 64->64's forward pass), the edges a
    // value at a time.
    const BLOCK: usize = 8;
    let (block_rows, block_cols) = (rows / BLOCK * BLOCK, cols / BLOCK * BLOCK);
    for r in (0..block_rows).step_by(BLOCK) {
        for c in (0..block_cols).step_by(BLOCK) {
            simd.transpose_8x8(
                &src[r * src_stride + c..],
                src_stride,
                &mut dst[c * dst_stride + r..],
                dst_stride,
            );
        }
    }
    for r in 0..rows {
        let first_col = if r < block_rows { block_cols } else { 0 };
        for c in first_col..cols {
            dst[c * dst_stride + r] = src[r * src_stride + c];
        }
    }
}

/// Writes `x [C, H, W]` into `out` (`image_len` values) as a zero-padded `[HP, WP, C]` image.
pub(crate) fn to_channels_last(dims: &Conv2dDims, x: ArrayView3<'_, f32>, out: &mut [f32]) {
    out.fill(0.0);
    let c_count = dims.in_channels;
    if let Some(x) = x.as_slice() {
        // Each row of the image: [C, W] (channels H*W apart) into [W, C].
        let plane = dims.in_h * dims.in_w;
        for h in 0..dims.in_h {
            let start = pixel_start(dims, h, 0);
            let row = &x[h * dims.in_w..];
            transpose(row, plane, c_count, dims.in_w, &mut out[start..], c_count);
        }
        return;
    }
    for (c, channel) in x.outer_iter().enumerate() {
        for (h, row) in channel.outer_iter().enumerate() {
            let start = pixel_start(dims, h, 0) + c;
            for (o, &v) in out[start..].iter_mut().step_by(c_count).zip(row.iter()) {
                *o = v;
            }
        }
    }
}

/// A padded channels-last image's interior as `x [C, H, W]` (a strided view).
pub(crate) fn image_view<'a>(dims: &Conv2dDims, image: &'a [f32]) -> ArrayView3<'a, f32> {
    use ndarray::ShapeBuilder;
    let shape = (dims.in_channels, dims.in_h, dims.in_w);
    let strides = (1, dims.padded_w() * dims.in_channels, dims.in_channels);
    ArrayView3::from_shape(shape.strides(strides), &image[pixel_start(dims, 0, 0)..])
        .unwrap_or_else(|e| unreachable!("the interior lies inside the padded image: {e}"))
}

/// Writes the interior of a padded channels-last image `[HP, WP, C]` into `x [C, H, W]`.
pub(crate) fn from_channels_last(dims: &Conv2dDims, image: &[f32], mut x: ArrayViewMut3<'_, f32>) {
    let c_count = dims.in_channels;
    if let Some(x) = x.as_slice_mut() {
        // Each row of the image: [W, C] into [C, W] (channels H*W apart).
        let plane = dims.in_h * dims.in_w;
        for h in 0..dims.in_h {
            let row = &image[pixel_start(dims, h, 0)..];
            transpose(
                row,
                c_count,
                dims.in_w,
                c_count,
                &mut x[h * dims.in_w..],
                plane,
            );
        }
        return;
    }
    for (c, mut channel) in x.outer_iter_mut().enumerate() {
        for (h, mut row) in channel.outer_iter_mut().enumerate() {
            let start = pixel_start(dims, h, 0) + c;
            for (v, &g) in row.iter_mut().zip(image[start..].iter().step_by(c_count)) {
                *v = g;
            }
        }
    }
}

/// Writes `weight [O, C*KH*KW]` (rows in (c, kh, kw) order) into `out` as `[O, KH, KW, C]`.
pub(crate) fn weight_to_channels_last(dims: &Conv2dDims, weight: &[f32], out: &mut [f32]) {
    let patch = dims.patch_len();
    for (w, out) in weight.chunks_exact(patch).zip(out.chunks_exact_mut(patch)) {
        for_each_tap(dims, |r, cl| out[cl] = w[r]);
    }
}

/// Adds `grad_cl [O, KH, KW, C]` onto `dw [O, C*KH*KW]`.
pub(crate) fn add_from_channels_last(dims: &Conv2dDims, grad_cl: &[f32], dw: &mut [f32]) {
    let patch = dims.patch_len();
    for (g, dw) in grad_cl.chunks_exact(patch).zip(dw.chunks_exact_mut(patch)) {
        for_each_tap(dims, |r, cl| dw[r] += g[cl]);
    }
}

/// Adds `taps [KH, KW, C, O]` (a receptive-field value's sums for every output channel,
/// consecutive) onto `dw [O, C*KH*KW]`.
pub(crate) fn add_from_taps(dims: &Conv2dDims, taps: &[f32], dw: &mut [f32]) {
    let (o_count, patch) = (dims.out_channels, dims.patch_len());
    for (o, dw) in dw.chunks_exact_mut(patch).enumerate() {
        for_each_tap(dims, |r, cl| dw[r] += taps[cl * o_count + o]);
    }
}

/// Calls `f(r, cl)` for each receptive-field value, `r` its index in (c, kh, kw) order and `cl`
/// in the channels-last order (kh, kw, c). (Nested loops: computing one index from the other
/// took three divisions per value, 3% of a conv 32->64 backward pass.)
#[inline(always)]
fn for_each_tap(dims: &Conv2dDims, mut f: impl FnMut(usize, usize)) {
    let (kh_count, kw_count, c_count) = (dims.kernel_h, dims.kernel_w, dims.in_channels);
    for c in 0..c_count {
        for kh in 0..kh_count {
            for kw in 0..kw_count {
                let r = (c * kh_count + kh) * kw_count + kw;
                f(r, (kh * kw_count + kw) * c_count + c);
            }
        }
    }
}

/// Writes `grad [O, P]` into `out [P, O]` (`O*P` values).
pub(crate) fn into_channels_last(grad: ArrayView2<'_, f32>, out: &mut [f32]) {
    let (o, p) = grad.dim();
    if let Some(grad) = grad.as_slice() {
        transpose(grad, p, o, p, out, o);
        return;
    }
    // Sixteen pixels at a time, so that the 16 x O values written stay in L1 while each row's
    // sixteen are read in a run.
    const PIXELS_AT_ONCE: usize = 16;
    for first in (0..p).step_by(PIXELS_AT_ONCE) {
        let n = PIXELS_AT_ONCE.min(p - first);
        let out = &mut out[first * o..(first + n) * o];
        for (c, row) in grad.rows().into_iter().enumerate() {
            for (i, &g) in row.slice_move(s![first..first + n]).iter().enumerate() {
                out[i * o + c] = g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// [`super::transpose`] against indexing, on random shapes and strides (whole 8x8
        /// blocks, edges, and matrices smaller than a block).
        #[test]
        fn transpose_moves_every_value(
            rows in 1usize..40,
            cols in 1usize..40,
            src_extra in 0usize..5,
            dst_extra in 0usize..5,
        ) {
            let (src_stride, dst_stride) = (cols + src_extra, rows + dst_extra);
            let src: Vec<f32> = (0..rows * src_stride).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; cols * dst_stride];
            super::transpose(&src, src_stride, rows, cols, &mut dst, dst_stride);
            for (i, &v) in dst.iter().enumerate() {
                let (c, r) = (i / dst_stride, i % dst_stride);
                if r < rows {
                    prop_assert_eq!(v, src[r * src_stride + c]);
                } else {
                    prop_assert!(v.is_nan(), "wrote outside the matrix at {}", i);
                }
            }
        }
    }
}
