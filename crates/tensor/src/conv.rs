//! 2-D convolution over NCHW f32: forward as im2col + GEMM; backward for the input (GEMM +
//! col2im), the weights and the bias. Forward and backward stand side by side.
//!
//! Shapes: input `x [N, C, H, W]`, weight `[O, C, KH, KW]`, bias `[O]`, output `y [N, O, OH, OW]`.
//! The unfolded input of image n is `cols[n] [C*KH*KW, OH*OW]`, kept from forward for backward.
//!
//! Parallel over the batch. The weight and bias gradients sum over images in a fixed partition
//! (chunks of the batch that depend on N only) and add the chunks' partial sums in chunk order, so
//! the bits are the same whatever the number of threads.

use ndarray::{
    Array1, Array2, Array3, ArrayView1, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut1,
    ArrayViewMut2, ArrayViewMut3, ArrayViewMut4, Axis, Zip, s,
};

use ndarray::parallel::prelude::*;

mod direct;
mod implicit;
mod scatter;

use crate::error::{TensorError, expect_shape};
use crate::gemm::sgemm_unchecked;
use crate::pool::{Pool2dDims, max_pool_plane};
use crate::simd::dispatched;
use std::borrow::Cow;

/// How much zero padding surrounds the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// None: the output shrinks by the kernel size minus one (Keras' `valid`).
    Valid,
    /// Enough that the output is `ceil(input / stride)`, split with the extra row or column at
    /// the bottom or right (Keras' and TensorFlow's `same`).
    Same,
    /// Explicit zero rows and columns on each side.
    Explicit {
        /// Rows above.
        top: usize,
        /// Rows below.
        bottom: usize,
        /// Columns to the left.
        left: usize,
        /// Columns to the right.
        right: usize,
    },
}

/// Every size of one convolution: the one source of truth for output-size arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dDims {
    /// N.
    pub batch: usize,
    /// C.
    pub in_channels: usize,
    /// H.
    pub in_h: usize,
    /// W.
    pub in_w: usize,
    /// O.
    pub out_channels: usize,
    /// KH.
    pub kernel_h: usize,
    /// KW.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Zero rows above the input.
    pub pad_top: usize,
    /// Zero rows below the input.
    pub pad_bottom: usize,
    /// Zero columns left of the input.
    pub pad_left: usize,
    /// Zero columns right of the input.
    pub pad_right: usize,
}

impl Conv2dDims {
    /// Dimensions for an input `[N, C, H, W]`, `out_channels` filters of `kernel` `[KH, KW]`,
    /// `stride` `[vertical, horizontal]` and `padding`.
    pub fn new(
        input: [usize; 4],
        out_channels: usize,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: Padding,
    ) -> Result<Self, TensorError> {
        let [batch, in_channels, in_h, in_w] = input;
        let [kernel_h, kernel_w] = kernel;
        let [stride_h, stride_w] = stride;
        let config = |detail: String| TensorError::Config {
            op: "conv2d",
            detail,
        };
        if kernel_h == 0 || kernel_w == 0 || stride_h == 0 || stride_w == 0 {
            return Err(config(format!(
                "kernel {kernel:?} and stride {stride:?} must be at least 1"
            )));
        }
        if in_channels == 0 || out_channels == 0 {
            return Err(config(format!(
                "{in_channels} input and {out_channels} output channels: both must be at least 1"
            )));
        }
        // Sizes come from untrusted specs: every sum and product is checked, so a padding or
        // stride near usize::MAX is an error here rather than a wrapped size later.
        let overflow = || {
            config(format!(
                "input {in_h}x{in_w}, kernel {kernel:?}, stride {stride:?}, padding {padding:?}: \
                 the padded size overflows"
            ))
        };
        let same = |size: usize, k: usize, s: usize| {
            let out = size.div_ceil(s);
            let total = ((out.max(1) - 1).checked_mul(s)?.checked_add(k)?).saturating_sub(size);
            Some((total / 2, total - total / 2))
        };
        let (pad_top, pad_bottom, pad_left, pad_right) = match padding {
            Padding::Valid => (0, 0, 0, 0),
            Padding::Same => {
                let (top, bottom) = same(in_h, kernel_h, stride_h).ok_or_else(overflow)?;
                let (left, right) = same(in_w, kernel_w, stride_w).ok_or_else(overflow)?;
                (top, bottom, left, right)
            }
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            } => (top, bottom, left, right),
        };
        let padded_h = in_h
            .checked_add(pad_top)
            .and_then(|h| h.checked_add(pad_bottom))
            .ok_or_else(overflow)?;
        let padded_w = in_w
            .checked_add(pad_left)
            .and_then(|w| w.checked_add(pad_right))
            .ok_or_else(overflow)?;
        if padded_h < kernel_h || padded_w < kernel_w {
            return Err(config(format!(
                "kernel {kernel_h}x{kernel_w} is larger than the padded input {padded_h}x{padded_w}"
            )));
        }
        Ok(Conv2dDims {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride_h,
            stride_w,
            pad_top,
            pad_bottom,
            pad_left,
            pad_right,
        })
    }

    /// HP = H + pad_top + pad_bottom: the height of the zero-padded input.
    pub fn padded_h(&self) -> usize {
        self.in_h + self.pad_top + self.pad_bottom
    }

    /// WP = W + pad_left + pad_right: the width of the zero-padded input.
    pub fn padded_w(&self) -> usize {
        self.in_w + self.pad_left + self.pad_right
    }

    /// OH = (HP - KH) / stride_h + 1.
    pub fn out_h(&self) -> usize {
        (self.padded_h() - self.kernel_h) / self.stride_h + 1
    }

    /// OW = (WP - KW) / stride_w + 1.
    pub fn out_w(&self) -> usize {
        (self.padded_w() - self.kernel_w) / self.stride_w + 1
    }

    /// `[N, C, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.in_h, self.in_w]
    }

    /// `[O, C, KH, KW]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels,
            self.kernel_h,
            self.kernel_w,
        ]
    }

    /// `[N, O, OH, OW]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h(), self.out_w()]
    }

    /// C*KH*KW: the length of one receptive field, the rows of an unfolded image.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }

    /// The input channel and kernel tap `(c, kh, kw)` of row `r` of an unfolded image.
    pub fn tap_of_row(&self, r: usize) -> (usize, usize, usize) {
        let taps = self.kernel_h * self.kernel_w;
        let tap = r % taps;
        (r / taps, tap / self.kernel_w, tap % self.kernel_w)
    }

    /// OH*OW: the output pixels per channel, the columns of an unfolded image.
    pub fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Whether the convolution is computed directly (stride 1 and a receptive field of at most
    /// 32 values, where im2col + GEMM is slow) rather than by im2col + GEMM.
    pub fn computed_directly(&self) -> bool {
        direct::applies(self)
    }

    /// Floating-point operations of the forward pass, 2*N*O*OH*OW*C*KH*KW (multiply and add).
    pub fn forward_flops(&self) -> u64 {
        2 * (self.batch * self.out_channels * self.out_pixels() * self.patch_len()) as u64
    }
}

/// The buffers one convolution reuses from batch to batch: the unfolded input that forward keeps
/// for backward, and per-chunk scratch. They are resized only when shapes change.
///
/// The batch is processed in chunks of B images (B fixed by N, see [`images_per_chunk`]); a
/// chunk's images are unfolded side by side, so the backward pass makes one wide GEMM per chunk
/// instead of B narrow ones, e.g. `dW += dy [O, B*OH*OW] x cols^T [B*OH*OW, C*KH*KW]`, whose
/// long inner dimension is what GEMM runs fastest on.
#[derive(Clone, Debug, Default)]
pub struct Conv2dBuffers {
    /// `[chunks, C*KH*KW, B*OH*OW]`: the forward pass's unfolded input, image j of a chunk in
    /// columns `j*OH*OW..(j+1)*OH*OW`.
    cols: Array3<f32>,
    /// `[chunks, O, B*OH*OW]`: a chunk's output gradient, in the same column order as `cols`,
    /// for images small enough to gather; empty otherwise.
    wide: Array3<f32>,
    /// `[chunks, O, G*OH*OW]`: the forward pass's output for a group of G gathered images,
    /// before it is copied into NCHW order; empty when images are not gathered.
    gathered_out: Array3<f32>,
    /// `[chunks, O, C*KH*KW]`: each chunk's weight-gradient sum.
    partial_dw: Array3<f32>,
    /// `[chunks, O]`: each chunk's bias-gradient sum.
    partial_db: Array2<f32>,
    /// `[chunks, C*KH*KW, B*OH*OW]` (or one image's `OH*OW` columns when images are not
    /// gathered): the unfolded input gradient; empty when no input gradient is wanted.
    dcols: Array3<f32>,
    /// `[chunks, B * HP*WP*C]`: the forward pass's input, zero-padded and channels last, for a
    /// backward pass that scatters a sparse output gradient (im2col convolutions only).
    /// (Each of these channels-last buffers holds `scatter::ALIGN_SLACK` extra values, to be
    /// used from a 64-byte boundary.)
    channels_last: Array2<f32>,
    /// `[O * KH*KW*C]`: the weight channels last, for the same.
    weight_channels_last: Array1<f32>,
    /// `[chunks, O * KH*KW*C]`: each chunk's scattered weight-gradient sum, channels last.
    partial_dw_channels_last: Array2<f32>,
    /// `[chunks, HP*WP*C]`: one image's scattered input gradient, channels last.
    dx_channels_last: Array2<f32>,
    /// `[chunks, OH*OW]`: where the nonzero gradients of one output channel are (as receptive
    /// field corners in a channels-last image), scratch for the scatter.
    scatter_corners: Array2<usize>,
    /// `[chunks, O*OH*OW]`: their values, scratch for the scatter.
    scatter_values: Array2<f32>,
    /// `[chunks, scatter::lists_len]`: where the nonzero gradients are, scratch for the
    /// scatter.
    scatter_lists: Array2<u32>,
    /// `[chunks, O*PH*PW]`: one image's argmax, overwritten by each, when the caller keeps none.
    argmax_scratch: Array2<u32>,
    /// `[chunks, B * padded image]`: for convolutions computed directly (stride 1, short
    /// receptive fields), the forward pass's zero-padded input, kept for backward instead of
    /// `cols`; empty otherwise.
    padded: Array2<f32>,
    /// `[chunks, OH*WP]` (rounded up): one output or output-gradient plane in the padded width,
    /// scratch for the direct convolution.
    padded_plane: Array2<f32>,
    /// `[chunks, padded image]`: one image's input gradient in the padded layout, scratch for
    /// the direct convolution when an input gradient is wanted.
    padded_dx: Array2<f32>,
    /// `[KH*KW*C * O]`: the weight packed for the implicit-GEMM forward pass.
    weight_by_tap: Array1<f32>,
    /// What `weight_by_tap` was packed from: (C, KH, KW, O) and the weight `[O, C*KH*KW]`.
    packed_for: Option<(PackingKey, Vec<f32>)>,
    /// `[chunks, OH*OW * O]`: one image's output channels last, from the implicit-GEMM
    /// forward pass, before it is transposed.
    out_channels_last: Array2<f32>,
    /// `[chunks, B*OH*OW * O]` (or one image's when images are not gathered): a chunk's dense
    /// output gradient channels last, for `implicit::weight_grad`; empty otherwise.
    grads_channels_last: Array2<f32>,
    /// Whether `cols` holds the whole batch's unfolded input (else only the last group's).
    cols_kept: bool,
    /// The dimensions `cols` (or `padded`) was made for, so backward can tell it matches.
    dims: Option<Conv2dDims>,
}

/// (C, KH, KW, O): the shapes that order a packed weight.
type PackingKey = (usize, usize, usize, usize);

/// Where the backward pass writes: weight and bias gradients are accumulated (`+=`, zeroing is
/// the optimizer's separate step); the input gradient is overwritten (`=`).
#[derive(Debug)]
pub struct Conv2dGrads<'a> {
    /// `dW [O, C, KH, KW] += ...`.
    pub weight: ArrayViewMut4<'a, f32>,
    /// `db [O] += ...`, when the convolution has a bias.
    pub bias: Option<ArrayViewMut1<'a, f32>>,
    /// `dx [N, C, H, W] = ...`, unless nothing upstream needs it (the first layer).
    pub input: Option<ArrayViewMut4<'a, f32>>,
}

/// At most this many chunks per batch: enough to keep two to eight threads busy, few enough
/// that each chunk's GEMM is wide and adding up the partial gradients costs little.
const MAX_CHUNKS: usize = 8;

/// Below this many output pixels per image, the backward pass gathers a chunk's output
/// gradients side by side for one long-K weight-gradient GEMM (measured: conv 32->64 on 13x13,
/// 121 pixels, 142 -> 161 GFLOP/s); above it, the gather's extra pass over memory costs more
/// than it gains (conv 1->32 on 28x28, 676 pixels, 47 -> 25 GFLOP/s).
const WIDE_GEMM_MAX_PIXELS: usize = 256;

/// At most this many bytes of gathered columns go into one forward GEMM, so that they and
/// GEMM's packed copy of them stay in a 2 MB L2: 4 images of conv 32->64 on 13x13 (0.55 MB;
/// 8 images, 1.1 MB, made forward 2.4-2.5 ms instead of 2.0-2.2 with the cold caches of a
/// model), 10 of conv 6->16 on 14x14. A whole chunk of a 1000-image evaluation batch (125
/// images) would need 17 MB.
const GATHER_MAX_BYTES: usize = 640 << 10;

/// Images per chunk: a function of N alone, never of the thread count, so the summation order
/// of the gradients (and so their bits) never depends on scheduling.
pub fn images_per_chunk(batch: usize) -> usize {
    batch.div_ceil(MAX_CHUNKS).max(1)
}

/// Whether a backward pass will follow a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// Training: keep the whole batch's unfolded input for [`conv2d_backward`].
    Needed,
    /// Inference: unfold one image at a time into a small buffer and keep nothing.
    NotNeeded,
}

/// `y = conv(x, weight) + bias`; with [`Backward::Needed`], keeps the unfolded input in
/// `buffers` for the backward pass.
pub fn conv2d_forward(
    dims: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    weight: ArrayView4<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    backward: Backward,
    y: ArrayViewMut4<'_, f32>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_forward";
    expect_shape(OP, "output", y.shape(), &dims.output_shape())?;
    let mut y = standard_layout(OP, "output", y)?;
    let per_chunk = images_per_chunk(dims.batch);
    let outputs = y
        .axis_chunks_iter_mut(Axis(0), per_chunk)
        .map(ChunkOutput::Conv)
        .collect();
    forward(OP, dims, x, weight, bias, buffers, backward, outputs)
}

/// `y = max_pool(relu(conv(x, weight) + bias))` in one pass: each image's convolution output
/// is activated and pooled while it is still in cache, and never written out whole. The same
/// bits as [`conv2d_forward`], [`crate::relu`] and [`crate::max_pool2d_forward`] in turn.
///
/// `pool` describes the pooling of the `[N, O, OH, OW]` convolution output; `y` and `argmax`
/// are `[N, O, PH, PW]`. `argmax` is where each maximum came from in its convolution output
/// plane, or [`NO_GRADIENT`] where the pooled value is 0 (ReLU passes no gradient there); the
/// backward pass needs it. Without one (inference), none is written out.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_relu_max_pool_forward(
    dims: &Conv2dDims,
    pool: &Pool2dDims,
    x: ArrayView4<'_, f32>,
    weight: ArrayView4<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    backward: Backward,
    y: ArrayViewMut4<'_, f32>,
    argmax: Option<ArrayViewMut4<'_, u32>>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_relu_max_pool_forward";
    check_pool_of(OP, dims, pool)?;
    expect_shape(OP, "output", y.shape(), &pool.output_shape())?;
    if let Some(argmax) = &argmax {
        expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
    }
    let mut y = standard_layout(OP, "output", y)?;
    let per_chunk = images_per_chunk(dims.batch);
    let y_chunks = y.axis_chunks_iter_mut(Axis(0), per_chunk);
    match argmax {
        Some(argmax) => {
            let mut argmax = standard_layout(OP, "argmax", argmax)?;
            let outputs = y_chunks
                .zip(argmax.axis_chunks_iter_mut(Axis(0), per_chunk))
                .map(|(y, argmax)| ChunkOutput::ReluMaxPool(*pool, y, ArgmaxOut::Kept(argmax)))
                .collect();
            forward(OP, dims, x, weight, bias, buffers, backward, outputs)
        }
        None => {
            // Written only to one image's scratch per chunk: inference needs no argmax, and
            // writing all of it doubled the pooled output's memory traffic. (Taken out of
            // `buffers` for the call, which borrows the rest of them.)
            let [_, o, ph, pw] = pool.output_shape();
            let mut scratch = std::mem::take(&mut buffers.argmax_scratch);
            resize(&mut scratch, (y_chunks.len(), o * ph * pw));
            let outputs = y_chunks
                .zip(scratch.outer_iter_mut())
                .map(|(y, scratch)| {
                    let scratch = scratch
                        .into_shape_with_order((o, ph, pw))
                        .unwrap_or_else(|_| unreachable!("sized for [O, PH, PW] above"));
                    ChunkOutput::ReluMaxPool(*pool, y, ArgmaxOut::Dropped(scratch))
                })
                .collect();
            let result = forward(OP, dims, x, weight, bias, buffers, backward, outputs);
            buffers.argmax_scratch = scratch;
            result
        }
    }
}

/// Marks a window of [`conv2d_relu_max_pool_forward`] whose maximum was not positive: the
/// ReLU before the pooling passes no gradient back through it.
pub const NO_GRADIENT: u32 = u32::MAX;

/// Where the forward pass puts one chunk of images.
enum ChunkOutput<'a> {
    /// The convolution output `[B, O, OH, OW]`.
    Conv(ArrayViewMut4<'a, f32>),
    /// ReLU and max pooling of it, `[B, O, PH, PW]`, and the argmax of each window.
    ReluMaxPool(Pool2dDims, ArrayViewMut4<'a, f32>, ArgmaxOut<'a>),
}

/// Where a chunk's argmax goes.
enum ArgmaxOut<'a> {
    /// `[B, O, PH, PW]`, for a backward pass.
    Kept(ArrayViewMut4<'a, u32>),
    /// Nowhere: `[O, PH, PW]` of scratch that each image overwrites.
    Dropped(ArrayViewMut3<'a, u32>),
}

impl ArgmaxOut<'_> {
    /// Where image j's argmax `[O, PH*PW]` goes, for the fused 2x2 poolings, which compute none
    /// when it is dropped.
    fn image_2x2(&mut self, j: usize) -> Option<&mut [u32]> {
        match self {
            ArgmaxOut::Kept(argmax) => Some(
                argmax
                    .index_axis_mut(Axis(0), j)
                    .into_slice()
                    .unwrap_or_else(|| unreachable!("outputs were checked to be standard")),
            ),
            ArgmaxOut::Dropped(_) => None,
        }
    }

    /// Where image j's argmax `[O, PH, PW]` goes.
    fn image(&mut self, j: usize) -> ArrayViewMut3<'_, u32> {
        match self {
            ArgmaxOut::Kept(argmax) => argmax.index_axis_mut(Axis(0), j),
            ArgmaxOut::Dropped(scratch) => scratch.view_mut(),
        }
    }
}

/// The forward pass of [`conv2d_forward`] and [`conv2d_relu_max_pool_forward`], writing into
/// one `outputs` entry per chunk of the batch.
#[allow(clippy::too_many_arguments)]
fn forward(
    op: &'static str,
    dims: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    weight: ArrayView4<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    backward: Backward,
    outputs: Vec<ChunkOutput<'_>>,
) -> Result<(), TensorError> {
    let keep_columns = backward == Backward::Needed;
    expect_shape(op, "input", x.shape(), &dims.input_shape())?;
    let weight = weight_matrix(op, dims, weight)?;
    if let Some(bias) = &bias {
        expect_shape(op, "bias", bias.shape(), &[dims.out_channels])?;
    }
    buffers.dims = keep_columns.then_some(*dims);
    if dims.computed_directly() {
        forward_direct(dims, x, weight, bias, buffers, keep_columns, outputs);
        return Ok(());
    }
    let pooled = matches!(outputs.first(), Some(ChunkOutput::ReluMaxPool(..)));
    if implicit::applies(dims) {
        forward_implicit(dims, x, weight, bias, buffers, keep_columns, outputs);
        return Ok(());
    }
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    resize(&mut buffers.padded, (0, 0));
    // Small images are unfolded side by side, up to GATHER_MAX_BYTES at a time, and multiplied
    // in one wide GEMM into `gathered_out`; large ones get one GEMM per image. The plain
    // convolution of large images goes straight into y; everything else is copied or pooled
    // from `gathered_out`. Without a backward pass to come, only one group's columns are kept.
    let gather = pixels < WIDE_GEMM_MAX_PIXELS;
    let group = if gather {
        (GATHER_MAX_BYTES / (patch * pixels * size_of::<f32>())).clamp(1, per_chunk)
    } else {
        1
    };
    // A pooled output's gradient is sparse, and its backward pass scatters it from the
    // channels-last input (see `scatter`) instead of multiplying the unfolded input: then only
    // one group's columns are needed, and they stay in cache. (Should the gradient turn out
    // dense, the backward pass unfolds the input again.)
    let keep_cols = keep_columns && !pooled;
    buffers.cols_kept = keep_cols;
    let kept_images = if keep_cols { per_chunk } else { group };
    resize(&mut buffers.cols, (chunks, patch, kept_images * pixels));
    let (out_rows, out_len) = if gather || pooled {
        (o, group * pixels)
    } else {
        (0, 0)
    };
    resize(&mut buffers.gathered_out, (chunks, out_rows, out_len));
    // For a backward pass that scatters a sparse output gradient, the input channels last.
    let channels_last = if keep_columns {
        per_chunk * scatter::image_len(dims) + scatter::ALIGN_SLACK
    } else {
        0
    };
    resize(&mut buffers.channels_last, (chunks, channels_last));

    let fill_bias = |mut y: ArrayViewMut2<'_, f32>| match &bias {
        Some(bias) => {
            // Start from the bias and let GEMM add onto it: one pass over y.
            Zip::from(y.rows_mut())
                .and(bias)
                .for_each(|mut row, &b| row.fill(b));
            1.0
        }
        None => 0.0,
    };
    buffers
        .cols
        .outer_iter_mut()
        .into_par_iter()
        .zip(buffers.gathered_out.outer_iter_mut())
        .zip(buffers.channels_last.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(
            |((((mut cols, mut out), mut channels_last), x), mut output)| {
                if keep_columns {
                    let images = scatter::aligned_mut(contiguous_mut(&mut channels_last));
                    let len = scatter::image_len(dims);
                    for (x, image) in x.outer_iter().zip(images.chunks_exact_mut(len)) {
                        scatter::to_channels_last(dims, x, image);
                    }
                }
                for (g, x) in x.axis_chunks_iter(Axis(0), group).enumerate() {
                    let first = if keep_cols { g * group * pixels } else { 0 };
                    let images = x.len_of(Axis(0));
                    let used = images * pixels;
                    let mut cols = cols.slice_mut(s![.., first..first + used]);
                    for (j, x) in x.outer_iter().enumerate() {
                        im2col(
                            dims,
                            x,
                            cols.slice_mut(s![.., j * pixels..(j + 1) * pixels]),
                        );
                    }
                    let here = s![g * group..g * group + images, .., .., ..];
                    if let ChunkOutput::Conv(y) = &mut output
                        && !gather
                    {
                        // y[n] [O, OH*OW] = W [O, C*KH*KW] * cols [C*KH*KW, OH*OW] (+ bias).
                        let mut y = image_matrix(y.index_axis_mut(Axis(0), g), o, pixels);
                        let beta = fill_bias(y.view_mut());
                        sgemm_unchecked(1.0, &weight, &cols.view(), beta, y.view_mut());
                        continue;
                    }
                    // out [O, G*OH*OW] = W [O, C*KH*KW] * cols [C*KH*KW, G*OH*OW] (+ bias).
                    let mut out = out.slice_mut(s![.., ..used]);
                    let beta = fill_bias(out.view_mut());
                    sgemm_unchecked(1.0, &weight, &cols.view(), beta, out.view_mut());
                    let image = |j: usize| out.slice(s![.., j * pixels..(j + 1) * pixels]);
                    match &mut output {
                        ChunkOutput::Conv(y) => {
                            for (j, y) in y.slice_mut(here).outer_iter_mut().enumerate() {
                                image_matrix(y, o, pixels).assign(&image(j));
                            }
                        }
                        ChunkOutput::ReluMaxPool(pool, y, argmax) => {
                            let mut y = y.slice_mut(here);
                            for (j, y) in y.outer_iter_mut().enumerate() {
                                relu_max_pool_image(pool, image(j), y, argmax.image(g * group + j));
                            }
                        }
                    }
                }
            },
        );
    Ok(())
}

/// The forward pass of a convolution [`Conv2dDims::computed_directly`]: each image is
/// zero-padded (and kept, for backward, when `keep_padded`) and convolved directly.
fn forward_direct(
    dims: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    keep_padded: bool,
    outputs: Vec<ChunkOutput<'_>>,
) {
    let layout = direct::PaddedLayout::new(dims);
    let (o, pixels) = (dims.out_channels, dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    let kept_images = if keep_padded { per_chunk } else { 1 };
    let pooled = matches!(outputs.first(), Some(ChunkOutput::ReluMaxPool(..)));
    let staged = if pooled { (o, pixels) } else { (0, 0) };
    resize(&mut buffers.cols, (0, 0, 0));
    resize(
        &mut buffers.padded,
        (chunks, kept_images * layout.image_len),
    );
    resize(&mut buffers.padded_plane, (chunks, layout.scratch_len()));
    resize(&mut buffers.gathered_out, (chunks, staged.0, staged.1));
    let weight = weight.as_standard_layout();
    let weight = contiguous(&weight);
    let bias = bias.map(|b| b.to_vec());
    buffers
        .padded
        .outer_iter_mut()
        .into_par_iter()
        .zip(buffers.padded_plane.outer_iter_mut())
        .zip(buffers.gathered_out.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(|((((mut padded, mut plane), mut staged), x), mut output)| {
            let padded = contiguous_mut(&mut padded);
            let plane = contiguous_mut(&mut plane);
            for (j, x) in x.outer_iter().enumerate() {
                let slot = if keep_padded { j } else { 0 };
                let padded = &mut padded[slot * layout.image_len..(slot + 1) * layout.image_len];
                direct::pad_image(dims, &layout, x, padded);
                let mut conv = |out: direct::Output<'_>| {
                    direct::forward_image(
                        dims,
                        &layout,
                        padded,
                        weight,
                        bias.as_deref(),
                        plane,
                        out,
                    )
                };
                match &mut output {
                    ChunkOutput::Conv(y) => conv(direct::Output::Plain(contiguous_mut(
                        &mut y.index_axis_mut(Axis(0), j),
                    ))),
                    ChunkOutput::ReluMaxPool(pool, y, argmax) if pool.is_2x2_stride_2() => {
                        conv(direct::Output::ReluMaxPool2x2(
                            contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                            argmax.image_2x2(j),
                        ));
                    }
                    ChunkOutput::ReluMaxPool(pool, y, argmax) => {
                        conv(direct::Output::Plain(contiguous_mut(&mut staged)));
                        relu_max_pool_image(
                            pool,
                            staged.view(),
                            y.index_axis_mut(Axis(0), j),
                            argmax.image(j),
                        );
                    }
                }
            }
        });
}

/// The forward pass of a convolution [`implicit::applies`] to: each image is copied channels
/// last (and kept, for the backward pass, when `keep_columns`), convolved by the implicit GEMM
/// and transposed into NCHW order.
fn forward_implicit(
    dims: &Conv2dDims,
    x: ArrayView4<'_, f32>,
    weight: ArrayView2<'_, f32>,
    bias: Option<ArrayView1<'_, f32>>,
    buffers: &mut Conv2dBuffers,
    keep_columns: bool,
    outputs: Vec<ChunkOutput<'_>>,
) {
    let (o, pixels) = (dims.out_channels, dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    let image_len = scatter::image_len(dims);
    let kept_images = if keep_columns { per_chunk } else { 1 };
    let pooled = matches!(outputs.first(), Some(ChunkOutput::ReluMaxPool(..)));
    let staged = if pooled { (o, pixels) } else { (0, 0) };
    // The backward pass reads the kept channels-last images (see `implicit::weight_grad`), or,
    // for kernel rows too short for it, unfolds them again: no columns are kept. (It zips
    // over the chunks of `cols`: an entry per chunk, empty.)
    buffers.cols_kept = false;
    resize(&mut buffers.cols, (chunks, dims.patch_len(), 0));
    resize(&mut buffers.padded, (0, 0));
    resize(
        &mut buffers.channels_last,
        (chunks, kept_images * image_len + scatter::ALIGN_SLACK),
    );
    resize(
        &mut buffers.out_channels_last,
        (chunks, pixels * o + scatter::ALIGN_SLACK),
    );
    resize(&mut buffers.gathered_out, (chunks, staged.0, staged.1));
    resize(
        &mut buffers.weight_by_tap,
        o * dims.patch_len() + scatter::ALIGN_SLACK,
    );
    let weight = weight.as_standard_layout();
    let weight = contiguous(&weight);
    // Inference calls again and again with the same weights: pack them only when they (or
    // the shapes that order them) changed since the last packing.
    let key = (dims.in_channels, dims.kernel_h, dims.kernel_w, o);
    let same_bits = |packed: &[f32]| {
        packed.len() == weight.len()
            && packed
                .iter()
                .zip(weight)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    };
    if buffers
        .packed_for
        .as_ref()
        .is_none_or(|(k, packed)| *k != key || !same_bits(packed))
    {
        implicit::pack_weight(
            dims,
            weight,
            scatter::aligned_mut(contiguous_mut(&mut buffers.weight_by_tap)),
        );
        // (Reusing the copy's allocation: training changes the weights every step.)
        let (packed_key, copy) = buffers.packed_for.get_or_insert_with(Default::default);
        *packed_key = key;
        copy.clear();
        copy.extend_from_slice(weight);
    }
    let weight = &scatter::aligned(contiguous(&buffers.weight_by_tap))[..o * dims.patch_len()];
    let bias = bias.map(|b| b.to_vec());
    buffers
        .channels_last
        .outer_iter_mut()
        .into_par_iter()
        .zip(buffers.out_channels_last.outer_iter_mut())
        .zip(buffers.gathered_out.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(
            |((((mut images, mut out_cl), mut staged), x), mut output)| {
                let images = scatter::aligned_mut(contiguous_mut(&mut images));
                let out_cl = &mut scatter::aligned_mut(contiguous_mut(&mut out_cl))[..pixels * o];
                for (j, x) in x.outer_iter().enumerate() {
                    let slot = if keep_columns { j } else { 0 };
                    let image = &mut images[slot * image_len..(slot + 1) * image_len];
                    scatter::to_channels_last(dims, x, image);
                    // A 2x2 pooling reads the output's first 2*PH rows and 2*PW columns only
                    // (conv 32->64 on 13x13: 100 of 121 pixels).
                    let covered = match &output {
                        ChunkOutput::ReluMaxPool(pool, ..) if pool.is_2x2_stride_2() => {
                            (dims.out_h() / 2 * 2, dims.out_w() / 2 * 2)
                        }
                        _ => (dims.out_h(), dims.out_w()),
                    };
                    let bias = bias.as_deref();
                    implicit::forward_image(dims, image, weight, bias, covered, out_cl);
                    match &mut output {
                        ChunkOutput::Conv(y) => implicit::transpose_into(
                            dims,
                            out_cl,
                            contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                        ),
                        ChunkOutput::ReluMaxPool(pool, y, argmax) if pool.is_2x2_stride_2() => {
                            implicit::relu_max_pool_2x2(
                                dims,
                                out_cl,
                                contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                                argmax.image_2x2(j),
                            );
                        }
                        ChunkOutput::ReluMaxPool(pool, y, argmax) => {
                            implicit::transpose_into(dims, out_cl, contiguous_mut(&mut staged));
                            relu_max_pool_image(
                                pool,
                                staged.view(),
                                y.index_axis_mut(Axis(0), j),
                                argmax.image(j),
                            );
                        }
                    }
                }
            },
        );
}

/// ReLU and max pooling of one image's convolution output `conv [O, OH*OW]` (a slice of
/// `gathered_out`, whose rows are contiguous) into `y` and `argmax` `[O, PH, PW]`, both in
/// standard layout.
fn relu_max_pool_image(
    pool: &Pool2dDims,
    conv: ArrayView2<'_, f32>,
    mut y: ArrayViewMut3<'_, f32>,
    mut argmax: ArrayViewMut3<'_, u32>,
) {
    let (y, argmax) = (
        y.as_slice_mut()
            .unwrap_or_else(|| unreachable!("outputs were checked to be standard")),
        argmax
            .as_slice_mut()
            .unwrap_or_else(|| unreachable!("outputs were checked to be standard")),
    );
    let out_len = pool.out_h() * pool.out_w();
    let planes = y
        .chunks_exact_mut(out_len)
        .zip(argmax.chunks_exact_mut(out_len));
    for (row, (y, argmax)) in conv.outer_iter().zip(planes) {
        let row = row
            .to_slice()
            .unwrap_or_else(|| unreachable!("rows of `gathered_out` are contiguous"));
        max_pool_plane(pool, row, y, argmax, |v| v.max(0.0));
        for (y, a) in y.iter().zip(argmax.iter_mut()) {
            // A select, not a branch: the loop vectorizes.
            *a = if *y <= 0.0 { NO_GRADIENT } else { *a };
        }
    }
}

/// Checks that `pool` pools this convolution's output.
fn check_pool_of(
    op: &'static str,
    dims: &Conv2dDims,
    pool: &Pool2dDims,
) -> Result<(), TensorError> {
    expect_shape(
        op,
        "pooling input",
        &pool.input_shape(),
        &dims.output_shape(),
    )
}

/// `a` itself when it is in standard layout, or a layout error naming it.
fn standard_layout<'a, T>(
    op: &'static str,
    operand: &'static str,
    a: ArrayViewMut4<'a, T>,
) -> Result<ArrayViewMut4<'a, T>, TensorError> {
    if a.is_standard_layout() {
        Ok(a)
    } else {
        Err(TensorError::Layout { op, operand })
    }
}

/// The gradients of [`conv2d_forward`] given `dy [N, O, OH, OW]`, using the unfolded input
/// that the forward pass left in `buffers`.
pub fn conv2d_backward(
    dims: &Conv2dDims,
    weight: ArrayView4<'_, f32>,
    dy: ArrayView4<'_, f32>,
    buffers: &mut Conv2dBuffers,
    grads: Conv2dGrads<'_>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_backward";
    expect_shape(OP, "output gradient", dy.shape(), &dims.output_shape())?;
    let dy = dy.as_standard_layout();
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dy
        .axis_chunks_iter(Axis(0), per_chunk)
        .map(ChunkGrad::Conv)
        .collect();
    backward(OP, dims, weight, chunks, buffers, grads)
}

/// The gradients of [`conv2d_relu_max_pool_forward`] given the gradient of its pooled output
/// `dy [N, O, PH, PW]` and the `argmax` it returned.
pub fn conv2d_relu_max_pool_backward(
    dims: &Conv2dDims,
    pool: &Pool2dDims,
    weight: ArrayView4<'_, f32>,
    dy: ArrayView4<'_, f32>,
    argmax: ArrayView4<'_, u32>,
    buffers: &mut Conv2dBuffers,
    grads: Conv2dGrads<'_>,
) -> Result<(), TensorError> {
    const OP: &str = "conv2d_relu_max_pool_backward";
    check_pool_of(OP, dims, pool)?;
    expect_shape(OP, "output gradient", dy.shape(), &pool.output_shape())?;
    expect_shape(OP, "argmax", argmax.shape(), &pool.output_shape())?;
    let pixels = dims.out_pixels();
    let (dy, argmax) = (dy.as_standard_layout(), argmax.as_standard_layout());
    let outside = |&a: &u32| a != NO_GRADIENT && a as usize >= pixels;
    // One flat pass without early exit, vectorized, to check (as "argmax + 1 > pixels", which
    // NO_GRADIENT + 1 = 0 passes), a second only to name the culprit. (The pass written with
    // `outside` compared in 64 bits on the baseline target: 7% of a fused training step.)
    let mut largest = 0;
    largest_plus_one(contiguous(&argmax), &mut largest);
    if largest as usize > pixels {
        let bad = argmax.iter().copied().find(outside).unwrap_or_default();
        return Err(TensorError::Shape {
            op: OP,
            detail: format!("argmax {bad} is outside the {pixels}-pixel output plane"),
        });
    }
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dy
        .axis_chunks_iter(Axis(0), per_chunk)
        .zip(argmax.axis_chunks_iter(Axis(0), per_chunk))
        .map(|(dy, argmax)| ChunkGrad::Pooled(dy, argmax))
        .collect();
    backward(OP, dims, weight, chunks, buffers, grads)
}

dispatched! {
    /// `largest = max(values[i] + 1)`, wrapping (so [`NO_GRADIENT`] counts as 0), 0 if empty.
    fn largest_plus_one(values: &[u32], largest: &mut u32) => largest_plus_one_body;
}

#[inline(always)]
#[allow(clippy::extra_unused_type_parameters)] // `dispatched!` passes the multiply-add kind
fn largest_plus_one_body<M, const LANES: usize>(values: &[u32], largest: &mut u32) {
    let mut lanes = [0u32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane).max(v.wrapping_add(1));
        }
    }
    let tail = tail.iter().map(|v| v.wrapping_add(1));
    *largest = lanes.into_iter().chain(tail).max().unwrap_or(0);
}

/// The output gradient of one chunk of images.
enum ChunkGrad<'a> {
    /// Of the convolution output, `[B, O, OH, OW]`, standard layout.
    Conv(ArrayView4<'a, f32>),
    /// Of the pooled output, `[B, O, PH, PW]`, and its argmax, both standard layout.
    Pooled(ArrayView4<'a, f32>, ArrayView4<'a, u32>),
}

impl ChunkGrad<'_> {
    fn images(&self) -> usize {
        match self {
            ChunkGrad::Conv(dy) | ChunkGrad::Pooled(dy, _) => dy.len_of(Axis(0)),
        }
    }

    /// Image j's gradient with respect to the convolution output, `[O, OH*OW]`, when dy holds
    /// it as it is.
    fn conv_view(&self, j: usize, o: usize, pixels: usize) -> Option<ArrayView2<'_, f32>> {
        match self {
            ChunkGrad::Conv(dy) => Some(image_of(dy, j, o, pixels)),
            ChunkGrad::Pooled(..) => None,
        }
    }

    /// Writes image j's gradient with respect to the convolution output into `out [O, OH*OW]`
    /// (a slice of `wide`, whose rows are contiguous): a copy, or each window's gradient put
    /// back at its argmax.
    fn write_conv_grad(&self, j: usize, mut out: ArrayViewMut2<'_, f32>) {
        match self {
            ChunkGrad::Conv(dy) => {
                let (o, pixels) = out.dim();
                out.assign(&image_of(dy, j, o, pixels));
            }
            ChunkGrad::Pooled(dy, argmax) => {
                let (dy, argmax) = (dy.index_axis(Axis(0), j), argmax.index_axis(Axis(0), j));
                let (dy, argmax) = (
                    dy.to_slice()
                        .unwrap_or_else(|| unreachable!("standard layout")),
                    argmax
                        .to_slice()
                        .unwrap_or_else(|| unreachable!("standard layout")),
                );
                let pooled = dy.len() / out.nrows().max(1);
                let planes = dy.chunks_exact(pooled).zip(argmax.chunks_exact(pooled));
                for (mut row, (dy, argmax)) in out.rows_mut().into_iter().zip(planes) {
                    let row = row
                        .as_slice_mut()
                        .unwrap_or_else(|| unreachable!("rows of `wide` are contiguous"));
                    unpool_plane(dy, argmax, row);
                }
            }
        }
    }
}

/// Image j of a chunk's standard-layout array, as one slice.
fn image_slice<'a, T>(a: &'a ArrayView4<'_, T>, j: usize) -> &'a [T] {
    let len = a.len() / a.len_of(Axis(0)).max(1);
    &a.as_slice()
        .unwrap_or_else(|| unreachable!("chunks of a standard-layout array"))
        [j * len..(j + 1) * len]
}

/// Writes into the plane `out` each pooling window's gradient `dy` at its `argmax` (a pixel of
/// `out`, or [`NO_GRADIENT`]), zero elsewhere.
pub(crate) fn unpool_plane(dy: &[f32], argmax: &[u32], out: &mut [f32]) {
    out.fill(0.0);
    for (&g, &at) in dy.iter().zip(argmax) {
        // Without a branch, which would be mispredicted on about half of the windows: a
        // window without gradient adds 0 to pixel 0.
        let passes = at != NO_GRADIENT;
        out[if passes { at as usize } else { 0 }] += if passes { g } else { 0.0 };
    }
}

/// The backward pass of [`conv2d_backward`] and [`conv2d_relu_max_pool_backward`], given one
/// output gradient per chunk of the batch.
fn backward(
    op: &'static str,
    dims: &Conv2dDims,
    weight: ArrayView4<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    buffers: &mut Conv2dBuffers,
    grads: Conv2dGrads<'_>,
) -> Result<(), TensorError> {
    let weight = weight_matrix(op, dims, weight)?;
    if buffers.dims != Some(*dims) {
        return Err(TensorError::Shape {
            op,
            detail: format!(
                "the buffers hold no forward pass at these dimensions (forward pass missing?): \
                 they were last used for {:?}",
                buffers.dims
            ),
        });
    }
    let Conv2dGrads {
        weight: dw,
        bias: db,
        input: dx,
    } = grads;
    expect_shape(op, "weight gradient", dw.shape(), &dims.weight_shape())?;
    if let Some(db) = &db {
        expect_shape(op, "bias gradient", db.shape(), &[dims.out_channels])?;
    }
    if let Some(dx) = &dx {
        expect_shape(op, "input gradient", dx.shape(), &dims.input_shape())?;
    }
    let (o, patch) = (dims.out_channels, dims.patch_len());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    resize(&mut buffers.partial_dw, (chunks, o, patch));
    resize(&mut buffers.partial_db, (chunks, o));
    let mut dx = dx;
    let dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>> = match dx.as_mut() {
        Some(dx) => dx
            .axis_chunks_iter_mut(Axis(0), per_chunk)
            .map(Some)
            .collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    if dims.computed_directly() {
        backward_direct(dims, weight, chunk_grads, buffers, dx_chunks);
    } else {
        backward_by_im2col(dims, weight, chunk_grads, buffers, dx_chunks);
    }
    let mut dw = into_matrix_checked(op, "weight gradient", dw, o, patch)?;
    for pdw in buffers.partial_dw.outer_iter() {
        dw += &pdw;
    }
    if let Some(mut db) = db {
        for pdb in buffers.partial_db.outer_iter() {
            db += &pdb;
        }
    }
    Ok(())
}

/// The per-chunk gradients of a convolution [`Conv2dDims::computed_directly`], from the padded
/// input its forward pass kept: into `partial_dw` and `partial_db`, and onto `dx_chunks`.
fn backward_direct(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    buffers: &mut Conv2dBuffers,
    mut dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>>,
) {
    let layout = direct::PaddedLayout::new(dims);
    let (o, pixels) = (dims.out_channels, dims.out_pixels());
    let chunks = chunk_grads.len();
    let dx_len = if dx_chunks.iter().any(Option::is_some) {
        layout.image_len
    } else {
        0
    };
    // (A pooled gradient is unpooled two channels at a time, in `padded_plane`.)
    resize(&mut buffers.wide, (chunks, 0, 0));
    // The forward pass's size, so that neither pass reallocates it for the other.
    resize(&mut buffers.padded_plane, (chunks, layout.scratch_len()));
    resize(&mut buffers.padded_dx, (chunks, dx_len));
    let weight = weight.as_standard_layout();
    let weight = contiguous(&weight);
    let Conv2dBuffers {
        partial_dw,
        partial_db,
        padded,
        padded_plane,
        padded_dx,
        ..
    } = buffers;
    partial_dw
        .outer_iter_mut()
        .into_par_iter()
        .zip(partial_db.outer_iter_mut())
        .zip(padded.outer_iter())
        .zip(chunk_grads)
        .zip(dx_chunks.par_iter_mut())
        .zip(padded_plane.outer_iter_mut())
        .zip(padded_dx.outer_iter_mut())
        .for_each(
            |((((((mut pdw, mut pdb), padded), dy), dx), mut plane), mut padded_dx)| {
                pdw.fill(0.0);
                pdb.fill(0.0);
                let (pdw, pdb) = (contiguous_mut(&mut pdw), contiguous_mut(&mut pdb));
                let plane = contiguous_mut(&mut plane);
                let padded_dx = contiguous_mut(&mut padded_dx);
                let padded = contiguous(&padded);
                for j in 0..dy.images() {
                    let conv_grad = dy.conv_view(j, o, pixels);
                    let grad = match (&conv_grad, &dy) {
                        (Some(grad), _) => direct::ImageGrad::Conv(contiguous(grad)),
                        (None, ChunkGrad::Pooled(dy, argmax)) => {
                            direct::ImageGrad::Pooled(image_slice(dy, j), image_slice(argmax, j))
                        }
                        (None, ChunkGrad::Conv(_)) => unreachable!("a plain gradient has a view"),
                    };
                    let image = &padded[j * layout.image_len..(j + 1) * layout.image_len];
                    let dx = dx
                        .as_mut()
                        .map(|dx| (&mut *padded_dx, dx.index_axis_mut(Axis(0), j)));
                    direct::backward_image(dims, &layout, image, weight, grad, plane, pdw, pdb, dx);
                }
            },
        );
}

/// The per-chunk gradients of a convolution computed by im2col + GEMM, from the unfolded input
/// its forward pass kept: into `partial_dw` and `partial_db`, and onto `dx_chunks`.
fn backward_by_im2col(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    buffers: &mut Conv2dBuffers,
    mut dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>>,
) {
    let pooled = matches!(chunk_grads.first(), Some(ChunkGrad::Pooled(..)));
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = chunk_grads.len();
    // Images with few output pixels are gathered side by side into `wide` (see below); the
    // others are used one at a time and need only one image's worth of `dcols` (and of `wide`,
    // when their gradient must be unpooled first). A buffer the pass does not use is sized to
    // nothing.
    let gather = pixels < WIDE_GEMM_MAX_PIXELS;
    let images_at_once = if gather { per_chunk } else { 1 };
    let dcols_len = if dx_chunks.iter().any(Option::is_some) {
        images_at_once * pixels
    } else {
        0
    };
    let (wide_rows, wide_len) = match (gather, pooled) {
        (true, _) => (o, per_chunk * pixels),
        (false, true) => (o, pixels),
        (false, false) => (0, 0),
    };
    resize(&mut buffers.dcols, (chunks, patch, dcols_len));
    resize(&mut buffers.wide, (chunks, wide_rows, wide_len));
    let dx_cl_len = if dcols_len > 0 {
        scatter::image_len(dims) + scatter::ALIGN_SLACK
    } else {
        0
    };
    resize(
        &mut buffers.weight_channels_last,
        o * patch + scatter::ALIGN_SLACK,
    );
    resize(
        &mut buffers.partial_dw_channels_last,
        (chunks, o * patch + scatter::ALIGN_SLACK),
    );
    resize(&mut buffers.dx_channels_last, (chunks, dx_cl_len));
    // A dense gradient's weight gradient from the kept channels-last images, where the
    // forward pass kept no columns and the kernel covers the output channels.
    let implicit_grads = !buffers.cols_kept && implicit::weight_grad_applies(dims);
    let grads_cl_len = if implicit_grads {
        images_at_once * pixels * o
    } else {
        0
    };
    resize(&mut buffers.grads_channels_last, (chunks, grads_cl_len));
    resize(&mut buffers.scatter_corners, (chunks, pixels));
    resize(&mut buffers.scatter_values, (chunks, o * pixels));
    resize(
        &mut buffers.scatter_lists,
        (chunks, scatter::lists_len(dims)),
    );
    let weight_std = weight.as_standard_layout();
    scatter::weight_to_channels_last(
        dims,
        contiguous(&weight_std),
        scatter::aligned_mut(contiguous_mut(&mut buffers.weight_channels_last)),
    );
    let cols_kept = buffers.cols_kept;
    let Conv2dBuffers {
        cols,
        wide,
        partial_dw,
        partial_db,
        dcols,
        channels_last,
        weight_channels_last,
        partial_dw_channels_last,
        dx_channels_last,
        scatter_corners,
        scatter_values,
        scatter_lists,
        grads_channels_last,
        ..
    } = buffers;
    let weight_cl = &scatter::aligned(contiguous(weight_channels_last))[..o * patch];
    let scatters: Vec<scatter::ChunkScatter<'_>> = channels_last
        .outer_iter()
        .zip(partial_dw_channels_last.outer_iter_mut())
        .zip(dx_channels_last.outer_iter_mut())
        .zip(scatter_corners.outer_iter_mut())
        .zip(scatter_values.outer_iter_mut())
        .zip(scatter_lists.outer_iter_mut())
        .map(
            |(((((images, dw), dx), corners), values), lists)| scatter::ChunkScatter {
                images: scatter::aligned(
                    images
                        .to_slice()
                        .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
                ),
                dw: &mut scatter::aligned_mut(
                    dw.into_slice()
                        .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
                )[..o * patch],
                dx: scatter::aligned_mut(
                    dx.into_slice()
                        .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
                ),
                corners: corners
                    .into_slice()
                    .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
                values: values
                    .into_slice()
                    .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
                lists: lists
                    .into_slice()
                    .unwrap_or_else(|| unreachable!("rows of a new array are contiguous")),
            },
        )
        .collect();
    // Per chunk: dW_k [O, C*KH*KW] = dy * cols^T and db_k [O] = row sums of dy over the chunk's
    // images; dcols [C*KH*KW, OH*OW] = W^T * dy[n], folded back onto dx[n] by col2im.
    // Images with few output pixels are first gathered side by side into `wide`, so dW_k is one
    // GEMM with a long inner dimension (B*OH*OW); images with many are used one at a time,
    // which saves the gather's pass over memory. The choice depends on the shape alone.
    // A sparse gradient (behind ReLU and pooling) is scattered instead (see `scatter`), decided
    // for each gathered chunk or large image by its count of nonzeros: the data, never the
    // thread count, so the bits stay the same for the same data.
    partial_dw
        .outer_iter_mut()
        .into_par_iter()
        .zip(partial_db.outer_iter_mut())
        .zip(cols.outer_iter())
        .zip(wide.outer_iter_mut())
        .zip(chunk_grads)
        .zip(dx_chunks.par_iter_mut())
        .zip(dcols.outer_iter_mut())
        .zip(scatters)
        .zip(grads_channels_last.outer_iter_mut())
        .for_each(
            |(
                (((((((mut pdw, mut pdb), cols), mut wide), dy), dx), mut dcols), mut scatter),
                mut grads_cl,
            )| {
                let grads_cl = contiguous_mut(&mut grads_cl);
                // Adds the weight gradient of a dense `grad [O, count*OH*OW]` of `count` images
                // from image `first` of the chunk: grad * cols^T, onto `scatter.dw` (channels
                // last) from the kept images, or onto `pdw` from unfolded columns.
                let add_dense_weight_grad =
                    |grad: ArrayView2<'_, f32>,
                     first: usize,
                     count: usize,
                     scatter: &mut scatter::ChunkScatter<'_>,
                     pdw: ArrayViewMut2<'_, f32>,
                     grads_cl: &mut [f32]| {
                        if implicit_grads {
                            // (Left in `grads_cl` for the input gradient.)
                            let grads_cl = &mut grads_cl[..grad.len()];
                            into_channels_last(grad, grads_cl);
                            let images = &scatter.images[first * scatter::image_len(dims)..];
                            implicit::weight_grad(dims, images, count, grads_cl, scatter.dw);
                        } else {
                            let cols =
                                chunk_columns(dims, cols, cols_kept, scatter.images, first, count);
                            sgemm_unchecked(1.0, &grad, &cols.t(), 1.0, pdw);
                        }
                    };
                let images = dy.images();
                if gather {
                    for j in 0..images {
                        dy.write_conv_grad(j, wide.slice_mut(s![.., j * pixels..(j + 1) * pixels]));
                    }
                    let used = images * pixels;
                    let wide = wide.slice(s![.., ..used]);
                    Zip::from(&mut pdb)
                        .and(wide.rows())
                        .for_each(|b, row| *b = row.sum());
                    if scatter::pays(scatter::nonzeros(&wide), wide.len()) {
                        scatter.dw.fill(0.0);
                        for j in 0..images {
                            let grad = wide.slice(s![.., j * pixels..(j + 1) * pixels]);
                            let dx = dx.as_mut().map(|dx| dx.index_axis_mut(Axis(0), j));
                            scatter.image(dims, weight_cl, j, grad, dx);
                        }
                        pdw.fill(0.0);
                        scatter::add_from_channels_last(dims, scatter.dw, contiguous_mut(&mut pdw));
                        return;
                    }
                    scatter.dw.fill(0.0);
                    pdw.fill(0.0);
                    add_dense_weight_grad(wide, 0, images, &mut scatter, pdw.view_mut(), grads_cl);
                    scatter::add_from_channels_last(dims, scatter.dw, contiguous_mut(&mut pdw));
                    if let Some(dx) = dx.as_mut() {
                        if implicit_grads {
                            let grads_cl = &grads_cl[..used * o];
                            let dcols = contiguous_mut(&mut dcols);
                            let dx_cl = scatter.dx;
                            input_grad_channels_last(
                                dims,
                                weight_cl,
                                grads_cl,
                                dcols,
                                dx_cl,
                                dx.view_mut(),
                            );
                        } else {
                            let mut dcols = dcols.slice_mut(s![.., ..used]);
                            sgemm_unchecked(1.0, &weight.t(), &wide, 0.0, dcols.view_mut());
                            for (j, dx) in dx.outer_iter_mut().enumerate() {
                                col2im(dims, dcols.slice(s![.., j * pixels..(j + 1) * pixels]), dx);
                            }
                        }
                    }
                } else {
                    pdb.fill(0.0);
                    pdw.fill(0.0);
                    scatter.dw.fill(0.0);
                    for j in 0..images {
                        let grad = match dy.conv_view(j, o, pixels) {
                            Some(grad) => grad,
                            None => {
                                dy.write_conv_grad(j, wide.view_mut());
                                wide.view()
                            }
                        };
                        Zip::from(&mut pdb)
                            .and(grad.rows())
                            .for_each(|b, row| *b += row.sum());
                        let dx = dx.as_mut().map(|dx| dx.index_axis_mut(Axis(0), j));
                        if scatter::pays(scatter::nonzeros(&grad), grad.len()) {
                            scatter.image(dims, weight_cl, j, grad, dx);
                            continue;
                        }
                        let grad = grad.view();
                        add_dense_weight_grad(grad, j, 1, &mut scatter, pdw.view_mut(), grads_cl);
                        if let Some(dx) = dx {
                            if implicit_grads {
                                let grads_cl = &grads_cl[..pixels * o];
                                let dcols = contiguous_mut(&mut dcols);
                                let dx = dx.insert_axis(Axis(0));
                                input_grad_channels_last(
                                    dims, weight_cl, grads_cl, dcols, scatter.dx, dx,
                                );
                            } else {
                                sgemm_unchecked(1.0, &weight.t(), &grad, 0.0, dcols.view_mut());
                                col2im(dims, dcols.view(), dx);
                            }
                        }
                    }
                    scatter::add_from_channels_last(dims, scatter.dw, contiguous_mut(&mut pdw));
                }
            },
        );
}

/// `dx [N, C, H, W] = col2im(W^T * dy)` for N images whose output gradient is
/// `grads_cl [N*OH*OW, O]`, from the weight channels last, `weight_cl [O, KH*KW*C]`:
/// `dcols_cl [N*OH*OW, KH*KW*C]` is their unfolded gradient, folded onto `dx_cl` (one padded
/// channels-last image) an image at a time.
fn input_grad_channels_last(
    dims: &Conv2dDims,
    weight_cl: &[f32],
    grads_cl: &[f32],
    dcols: &mut [f32],
    dx_cl: &mut [f32],
    mut dx: ArrayViewMut4<'_, f32>,
) {
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let rows = grads_cl.len() / o;
    fn as_matrix(values: &[f32], columns: usize) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((values.len() / columns, columns), values)
            .unwrap_or_else(|_| unreachable!("whole rows"))
    }
    let mut dcols = ArrayViewMut2::from_shape((rows, patch), &mut dcols[..rows * patch])
        .unwrap_or_else(|_| unreachable!("dcols holds a row per output pixel"));
    let weight_cl = as_matrix(weight_cl, patch);
    sgemm_unchecked(
        1.0,
        &as_matrix(grads_cl, o),
        &weight_cl,
        0.0,
        dcols.view_mut(),
    );
    let dcols = contiguous(&dcols);
    let len = scatter::image_len(dims);
    let dx_cl = &mut dx_cl[..len];
    for (dcols, dx) in dcols.chunks_exact(pixels * patch).zip(dx.outer_iter_mut()) {
        dx_cl.fill(0.0);
        implicit::fold_input_grad(dims, dcols, dx_cl);
        scatter::from_channels_last(dims, dx_cl, dx);
    }
}

/// Writes `grad [O, P]` into `out [P, O]` (`O*P` values).
fn into_channels_last(grad: ArrayView2<'_, f32>, out: &mut [f32]) {
    // Sixteen pixels at a time, so that the 16 x O values written stay in L1 while each row's
    // sixteen are read in a run.
    const PIXELS_AT_ONCE: usize = 16;
    let (o, p) = grad.dim();
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

/// The unfolded input of `count` images of a chunk from its image `first`,
/// `[C*KH*KW, count*OH*OW]`: the columns the forward pass kept, or, when it kept only its
/// channels-last copy of the input (`images`), unfolded again from that.
fn chunk_columns<'a>(
    dims: &Conv2dDims,
    cols: ArrayView2<'a, f32>,
    kept: bool,
    images: &[f32],
    first: usize,
    count: usize,
) -> ndarray::CowArray<'a, f32, ndarray::Ix2> {
    let pixels = dims.out_pixels();
    if kept {
        return cols
            .slice_move(s![.., first * pixels..(first + count) * pixels])
            .into();
    }
    let len = scatter::image_len(dims);
    let mut unfolded = Array2::zeros((dims.patch_len(), count * pixels));
    for j in 0..count {
        let image = &images[(first + j) * len..(first + j + 1) * len];
        im2col(
            dims,
            scatter::image_view(dims, image),
            unfolded.slice_mut(s![.., j * pixels..(j + 1) * pixels]),
        );
    }
    unfolded.into()
}

/// Unfolds one image `x [C, H, W]` into `cols [C*KH*KW, OH*OW]`: row `(c, kh, kw)` holds, for
/// every output pixel, the input value under kernel tap (kh, kw), or 0 in the padding.
pub fn im2col(dims: &Conv2dDims, x: ArrayView3<'_, f32>, mut cols: ArrayViewMut2<'_, f32>) {
    let x = x.as_standard_layout();
    let x = x
        .as_slice()
        .unwrap_or_else(|| unreachable!("as_standard_layout gives a contiguous array"));
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
            let all = folded
                .as_slice_mut()
                .unwrap_or_else(|| unreachable!("a new array is contiguous"));
            fold_taps(dims, dcols, all);
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
fn copy_short<T: Copy>(from: &[T], to: &mut [T]) {
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

/// Image j of a standard-layout `[B, O, OH, OW]` array as `[O, OH*OW]`.
fn image_of<'a>(
    a: &'a ArrayView4<'_, f32>,
    j: usize,
    o: usize,
    pixels: usize,
) -> ArrayView2<'a, f32> {
    a.index_axis(Axis(0), j)
        .into_shape_with_order((o, pixels))
        .unwrap_or_else(|e| unreachable!("standard layout: {e}"))
}

/// One image of the output, `[O, OH, OW]` in standard layout, as `[O, OH*OW]`.
fn image_matrix(y: ArrayViewMut3<'_, f32>, o: usize, pixels: usize) -> ArrayViewMut2<'_, f32> {
    y.into_shape_with_order((o, pixels))
        .unwrap_or_else(|e| unreachable!("standard layout was checked: {e}"))
}

/// The weight `[O, C, KH, KW]` as the GEMM operand `[O, C*KH*KW]`.
fn weight_matrix<'a>(
    op: &'static str,
    dims: &Conv2dDims,
    weight: ArrayView4<'a, f32>,
) -> Result<ArrayView2<'a, f32>, TensorError> {
    expect_shape(op, "weight", weight.shape(), &dims.weight_shape())?;
    weight
        .into_shape_with_order((dims.out_channels, dims.patch_len()))
        .map_err(|_| TensorError::Layout {
            op,
            operand: "weight",
        })
}

/// A 4-D gradient as `[rows, cols]`, or a layout error naming it.
fn into_matrix_checked<'a>(
    op: &'static str,
    operand: &'static str,
    a: ArrayViewMut4<'a, f32>,
    rows: usize,
    cols: usize,
) -> Result<ArrayViewMut2<'a, f32>, TensorError> {
    a.into_shape_with_order((rows, cols))
        .map_err(|_| TensorError::Layout { op, operand })
}

/// The elements of an array in standard layout, which the caller checked or made.
fn contiguous<T, S, D>(a: &ndarray::ArrayBase<S, D>) -> &[T]
where
    S: ndarray::Data<Elem = T>,
    D: ndarray::Dimension,
{
    a.as_slice()
        .unwrap_or_else(|| unreachable!("standard layout was checked or made"))
}

/// The elements of a mutable array in standard layout, which the caller checked or made.
fn contiguous_mut<T, S, D>(a: &mut ndarray::ArrayBase<S, D>) -> &mut [T]
where
    S: ndarray::DataMut<Elem = T>,
    D: ndarray::Dimension,
{
    a.as_slice_mut()
        .unwrap_or_else(|| unreachable!("standard layout was checked or made"))
}

/// Gives `buffer` this shape, reallocating only when the shape changed.
fn resize<T, D>(buffer: &mut ndarray::Array<T, D>, shape: D::Pattern)
where
    T: Clone + Default,
    D: ndarray::Dimension,
    D::Pattern: ndarray::IntoDimension<Dim = D>,
{
    let dim = ndarray::IntoDimension::into_dimension(shape);
    if buffer.raw_dim() != dim {
        *buffer = ndarray::Array::from_elem(dim, T::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array4};

    impl Conv2dBuffers {
        /// Where each buffer's data is: a reallocation moves it.
        fn data_addresses(&self) -> Vec<usize> {
            vec![
                self.cols.as_ptr() as usize,
                self.wide.as_ptr() as usize,
                self.gathered_out.as_ptr() as usize,
                self.partial_dw.as_ptr() as usize,
                self.partial_db.as_ptr() as usize,
                self.dcols.as_ptr() as usize,
                self.channels_last.as_ptr() as usize,
                self.weight_channels_last.as_ptr() as usize,
                self.partial_dw_channels_last.as_ptr() as usize,
                self.dx_channels_last.as_ptr() as usize,
                self.scatter_corners.as_ptr() as usize,
                self.scatter_values.as_ptr() as usize,
                self.scatter_lists.as_ptr() as usize,
                self.padded.as_ptr() as usize,
                self.padded_plane.as_ptr() as usize,
                self.padded_dx.as_ptr() as usize,
                self.weight_by_tap.as_ptr() as usize,
                self.packed_for
                    .as_ref()
                    .map_or(0, |(_, copy)| copy.as_ptr() as usize),
                self.out_channels_last.as_ptr() as usize,
            ]
        }
    }

    fn filled(shape: [usize; 4], seed: usize) -> Array4<f32> {
        Array4::from_shape_fn(shape, |(n, c, h, w)| {
            ((n * 7 + c * 5 + h * 3 + w + seed) % 13) as f32 / 6.0 - 1.0
        })
    }

    #[test]
    fn largest_plus_one_sees_every_value_and_skips_no_gradient() {
        // Lengths around every vector width, the largest value in every position.
        for len in 0..70usize {
            for at in 0..len {
                let mut values: Vec<u32> = (0..len as u32).map(|i| (i * 7) % 13).collect();
                values[at] = 1000;
                if len > 1 {
                    values[(at + 1) % len] = NO_GRADIENT;
                }
                let mut largest = 0;
                largest_plus_one(&values, &mut largest);
                assert_eq!(largest, 1001, "length {len}, largest at {at}");
            }
            let mut largest = 7;
            largest_plus_one(&vec![NO_GRADIENT; len], &mut largest);
            assert_eq!(largest, 0, "length {len} of NO_GRADIENT");
        }
    }

    /// Once a shape has been seen, training steps (fused forward and backward) reuse every
    /// buffer: no reallocation per call, on each of the three convolution paths.
    #[test]
    fn training_steps_reuse_their_buffers() {
        // Direct (1 channel, 3x3), implicit GEMM (16 outputs), im2col + GEMM (3 outputs).
        for (input, out_channels) in [([9, 1, 12, 12], 8), ([9, 8, 9, 9], 16), ([9, 4, 9, 9], 3)] {
            let dims = Conv2dDims::new(input, out_channels, [3, 3], [1, 1], Padding::Valid)
                .unwrap_or_else(|e| panic!("{e}"));
            let pool = Pool2dDims::new(dims.output_shape(), [2, 2], [2, 2])
                .unwrap_or_else(|e| panic!("{e}"));
            let x = filled(dims.input_shape(), 1);
            let mut w = filled(dims.weight_shape(), 2);
            let b = Array1::from_elem(out_channels, 0.1f32);
            let dy = filled(pool.output_shape(), 3);
            let mut buffers = Conv2dBuffers::default();
            let mut addresses = Vec::new();
            for step in 0..3 {
                let mut y = Array4::zeros(pool.output_shape());
                let mut argmax = Array4::zeros(pool.output_shape());
                conv2d_relu_max_pool_forward(
                    &dims,
                    &pool,
                    x.view(),
                    w.view(),
                    Some(b.view()),
                    &mut buffers,
                    Backward::Needed,
                    y.view_mut(),
                    Some(argmax.view_mut()),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let mut dw = Array4::zeros(dims.weight_shape());
                let mut dx = Array4::zeros(dims.input_shape());
                let grads = Conv2dGrads {
                    weight: dw.view_mut(),
                    bias: None,
                    input: (input[1] > 1).then(|| dx.view_mut()),
                };
                conv2d_relu_max_pool_backward(
                    &dims,
                    &pool,
                    w.view(),
                    dy.view(),
                    argmax.view(),
                    &mut buffers,
                    grads,
                )
                .unwrap_or_else(|e| panic!("{e}"));
                // The weights change every step, as training changes them.
                w.scaled_add(-0.01, &dw);
                if step > 0 {
                    assert_eq!(buffers.data_addresses(), addresses, "{dims:?}, step {step}");
                }
                addresses = buffers.data_addresses();
            }
        }
    }
}
