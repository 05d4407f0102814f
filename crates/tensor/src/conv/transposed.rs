//! The input gradient of a stride-1 convolution as a convolution itself: the output gradient,
//! zero-padded, convolved with the kernel flipped and its channels swapped, by the implicit
//! GEMM's forward kernel.
//!
//! Why: the GEMM route computes the unfolded gradient `dcols = dy^T * W` (KH*KW values per input
//! value: 900 KB for one 28x28 image of a conv 32->32) and folds it back, so the product is
//! bound by stores and the fold by loads; matrixmultiply also packs both operands first. Here
//! every input-gradient value is summed in registers and written once.
//!
//! With stride 1, `y[h, w] = sum x[h + kh - top, w + kw - left] * W[kh, kw]` gives
//! `dx[h, w] = sum dy[h + kh' - (KH-1-top), w + kw' - (KW-1-left)] * W[KH-1-kh', KW-1-kw']`:
//! a convolution of `dy` with padding `KH-1-top` (and so on) and the flipped kernel, from O
//! channels to C.

use ndarray::ArrayViewMut3;

use super::Conv2dDims;
use super::implicit::{self, CHANNEL_BLOCK};
use super::layout;

/// Whether the input gradient of `dims` can be computed this way: stride 1, no padding wider
/// than the kernel less one (the flipped padding is then not negative), and input channels the
/// kernel's output blocks cover.
pub(super) fn applies(dims: &Conv2dDims) -> bool {
    dims.stride_h == 1
        && dims.stride_w == 1
        && dims.pad_top.max(dims.pad_bottom) < dims.kernel_h
        && dims.pad_left.max(dims.pad_right) < dims.kernel_w
        && dims.in_channels.is_multiple_of(CHANNEL_BLOCK)
}

/// The convolution whose output is the input gradient of `dims` (see the module comment), for
/// dimensions where [`applies`] holds.
pub(super) fn gradient_dims(dims: &Conv2dDims) -> Conv2dDims {
    Conv2dDims {
        batch: dims.batch,
        in_channels: dims.out_channels,
        in_h: dims.out_h(),
        in_w: dims.out_w(),
        out_channels: dims.in_channels,
        kernel_h: dims.kernel_h,
        kernel_w: dims.kernel_w,
        stride_h: 1,
        stride_w: 1,
        pad_top: dims.kernel_h - 1 - dims.pad_top,
        pad_bottom: dims.kernel_h - 1 - dims.pad_bottom,
        pad_left: dims.kernel_w - 1 - dims.pad_left,
        pad_right: dims.kernel_w - 1 - dims.pad_right,
    }
}

/// Writes `weight [O, C*KH*KW]` (rows in (c, kh, kw) order) into `out` as the packed weight of
/// the gradient convolution, `[KH, KW, O, C]` with the taps flipped: `out[kh', kw', o, c] =
/// W[o, c, KH-1-kh', KW-1-kw']`.
pub(super) fn pack_flipped_weight(dims: &Conv2dDims, weight: &[f32], out: &mut [f32]) {
    let (c_count, o_count) = (dims.in_channels, dims.out_channels);
    let (kh_count, kw_count) = (dims.kernel_h, dims.kernel_w);
    for (o, w) in weight.chunks_exact(dims.patch_len()).enumerate() {
        for (r, &v) in w.iter().enumerate() {
            let (c, kh, kw) = dims.tap_of_row(r);
            let tap = (kh_count - 1 - kh) * kw_count + (kw_count - 1 - kw);
            out[(tap * o_count + o) * c_count + c] = v;
        }
    }
}

/// Writes `dx [C, H, W]` of one image whose output gradient is `grad_cl [OH*OW, O]`, with `flipped`
/// packed by [`pack_flipped_weight`]: `padded` (`layout::image_len(gradient_dims)` values) and
/// `dx_cl` (`H*W*C` values) are scratch.
pub(super) fn input_grad_image(
    grad_dims: &Conv2dDims,
    flipped: &[f32],
    grad_cl: &[f32],
    padded: &mut [f32],
    dx_cl: &mut [f32],
    mut dx: ArrayViewMut3<'_, f32>,
) {
    pad_channels_last(grad_dims, grad_cl, padded);
    let covered = (grad_dims.out_h(), grad_dims.out_w());
    implicit::forward_image(grad_dims, padded, flipped, None, covered, dx_cl);
    match dx.as_slice_mut() {
        Some(dx) => implicit::transpose_into(grad_dims, dx_cl, dx),
        None => {
            let c_count = grad_dims.out_channels;
            for ((c, h, w), v) in dx.indexed_iter_mut() {
                *v = dx_cl[(h * grad_dims.out_w() + w) * c_count + c];
            }
        }
    }
}

/// Writes the channels-last image `image_cl [H*W, C]` into `padded`, zero-padded as `dims`
/// pads its input (`layout::image_len` values): whole rows of `W*C` values at a time.
fn pad_channels_last(dims: &Conv2dDims, image_cl: &[f32], padded: &mut [f32]) {
    let row = dims.in_w * dims.in_channels;
    let padded_row = dims.padded_w() * dims.in_channels;
    let left = dims.pad_left * dims.in_channels;
    let top = dims.pad_top * padded_row;
    let padded = &mut padded[..layout::image_len(dims)];
    padded[..top].fill(0.0);
    let (interior, bottom) = padded[top..].split_at_mut(dims.in_h * padded_row);
    bottom.fill(0.0);
    for (target, source) in interior
        .chunks_exact_mut(padded_row)
        .zip(image_cl.chunks_exact(row))
    {
        let (before, rest) = target.split_at_mut(left);
        let (values, after) = rest.split_at_mut(row);
        before.fill(0.0);
        values.copy_from_slice(source);
        after.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Padding;

    /// The padded copy of a channels-last image equals `layout::to_channels_last` of the same
    /// image in NCHW order.
    #[test]
    fn padding_matches_the_channels_last_copy() {
        let dims = Conv2dDims::new(
            [1, 3, 4, 5],
            16,
            [3, 3],
            [1, 1],
            Padding::Explicit {
                top: 2,
                bottom: 1,
                left: 0,
                right: 2,
            },
        )
        .unwrap();
        let nchw = ndarray::Array3::from_shape_fn((3, 4, 5), |(c, h, w)| {
            (c * 100 + h * 10 + w) as f32 + 1.0
        });
        let cl: Vec<f32> = (0..4 * 5)
            .flat_map(|p| (0..3).map(move |c| (c * 100 + (p / 5) * 10 + p % 5) as f32 + 1.0))
            .collect();
        let len = layout::image_len(&dims);
        let (mut expected, mut got) = (vec![0.0; len], vec![f32::NAN; len]);
        layout::to_channels_last(&dims, nchw.view(), &mut expected);
        pad_channels_last(&dims, &cl, &mut got);
        assert_eq!(expected, got);
    }
}
