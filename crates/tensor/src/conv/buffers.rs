//! The buffers a convolution reuses from batch to batch: one type per algorithm, holding only
//! what that algorithm needs, behind [`Conv2dBuffers`].

use ndarray::{Array1, Array2, Array3, Array4};

use super::{Conv2dDims, ConvAlgorithm};

/// At most this many chunks per batch: enough to keep two to eight threads busy, few enough
/// that each chunk's GEMM is wide and adding up the partial gradients costs little.
const MAX_CHUNKS: usize = 8;

/// Images per chunk: a function of N alone, never of the thread count, so the summation order
/// of the gradients (and so their bits) never depends on scheduling.
///
/// Every algorithm splits the batch into chunks of this many images, one task each; a chunk's
/// weight and bias gradients are summed into its own partial sums, added up in chunk order.
pub fn images_per_chunk(batch: usize) -> usize {
    batch.div_ceil(MAX_CHUNKS).max(1)
}

/// The buffers one convolution reuses from batch to batch: what the forward pass keeps for the
/// backward pass, and per-chunk scratch. They are resized only when shapes change.
///
/// [`Conv2dBuffers::new`] fixes the [`ConvAlgorithm`]; [`Conv2dBuffers::default`] takes
/// [`Conv2dDims::algorithm`] of each call's dimensions.
#[derive(Clone, Debug, Default)]
pub struct Conv2dBuffers {
    /// The algorithm the caller chose, if any.
    chosen: Option<ConvAlgorithm>,
    /// The dimensions of the last forward pass that kept what backward needs.
    pub(super) dims: Option<Conv2dDims>,
    /// `[chunks, O, C*KH*KW]`: each chunk's weight-gradient sum.
    pub(super) partial_dw: Array3<f32>,
    /// `[chunks, O]`: each chunk's bias-gradient sum.
    pub(super) partial_db: Array2<f32>,
    /// `[chunks, O, PH, PW]`: one image's argmax, overwritten by each, when the caller keeps none.
    pub(super) argmax_scratch: Array4<u32>,
    /// The algorithm's own buffers.
    pub(super) algorithm: AlgorithmBuffers,
}

impl Conv2dBuffers {
    /// Buffers for convolutions computed by `algorithm` (which must
    /// [support](ConvAlgorithm::supports) their dimensions).
    pub fn new(algorithm: ConvAlgorithm) -> Self {
        Conv2dBuffers {
            chosen: Some(algorithm),
            ..Default::default()
        }
    }

    /// The algorithm for these dimensions: the chosen one, or the default for them.
    pub fn algorithm_for(&self, dims: &Conv2dDims) -> ConvAlgorithm {
        self.chosen.unwrap_or_else(|| dims.algorithm())
    }
}

/// The buffers of the algorithm that ran last.
#[derive(Clone, Debug, Default)]
pub(super) enum AlgorithmBuffers {
    /// None ran yet.
    #[default]
    Empty,
    /// [`ConvAlgorithm::Direct`].
    Direct(DirectBuffers),
    /// [`ConvAlgorithm::Im2colGemm`].
    Im2col(Im2colBuffers),
    /// [`ConvAlgorithm::ImplicitGemm`].
    Implicit(ImplicitBuffers),
}

impl AlgorithmBuffers {
    /// The direct convolution's buffers, taken out (empty ones if another algorithm's were
    /// here); a pass puts them back when done.
    pub(super) fn take_direct(&mut self) -> DirectBuffers {
        match std::mem::take(self) {
            AlgorithmBuffers::Direct(buffers) => buffers,
            _ => DirectBuffers::default(),
        }
    }

    /// im2col + GEMM's buffers, taken out as [`Self::take_direct`].
    pub(super) fn take_im2col(&mut self) -> Im2colBuffers {
        match std::mem::take(self) {
            AlgorithmBuffers::Im2col(buffers) => buffers,
            _ => Im2colBuffers::default(),
        }
    }

    /// The implicit GEMM's buffers, taken out as [`Self::take_direct`].
    pub(super) fn take_implicit(&mut self) -> ImplicitBuffers {
        match std::mem::take(self) {
            AlgorithmBuffers::Implicit(buffers) => buffers,
            _ => ImplicitBuffers::default(),
        }
    }
}

/// What [`ConvAlgorithm::Direct`] keeps and uses.
#[derive(Clone, Debug, Default)]
pub(super) struct DirectBuffers {
    /// `[chunks, B * image_len]` (see `direct::PaddedLayout`): the forward pass's input,
    /// zero-padded, kept for backward (one image per chunk in inference).
    pub(super) padded: Array2<f32>,
    /// `[chunks, PaddedLayout::scratch_len]`: output planes in the padded width and other
    /// scratch, the same size for both passes.
    pub(super) wide: Array2<f32>,
    /// `[chunks, image_len]`: one image's input gradient in the padded layout, when an input
    /// gradient is wanted; empty otherwise.
    pub(super) padded_dx: Array2<f32>,
    /// `[chunks, O, OH*OW]`: one image's output before a pooling other than 2x2 / 2; empty
    /// otherwise.
    pub(super) staged: Array3<f32>,
    /// `[chunks, maxima_scratch_len]`: one plane's 2x2 pooling maxima in pixel order,
    /// for a first layer's weight gradient; empty otherwise.
    pub(super) maxima: Array2<u32>,
}

/// What [`ConvAlgorithm::Im2colGemm`] keeps and uses.
///
/// The batch is processed in chunks of B images (see [`images_per_chunk`]); small images of
/// a chunk are unfolded side by side, in groups of G, so that one wide GEMM does the work of
/// G narrow ones.
#[derive(Clone, Debug, Default)]
pub(super) struct Im2colBuffers {
    /// `[chunks, C*KH*KW, B*OH*OW]`: the unfolded input, image j of a chunk in columns
    /// `j*OH*OW..(j+1)*OH*OW`, kept for backward when `cols_kept`; else `[chunks, C*KH*KW,
    /// G*OH*OW]`, one group's.
    pub(super) cols: Array3<f32>,
    /// Whether `cols` holds the whole batch: not for inference, nor for a pooled output,
    /// whose sparse gradient the backward pass scatters from `channels_last` instead.
    pub(super) cols_kept: bool,
    /// `[chunks, O, G*OH*OW]`: the output of a group of G gathered images before it is copied
    /// into NCHW order or pooled; empty when images are not gathered and not pooled.
    pub(super) gathered_out: Array3<f32>,
    /// `[chunks, B * layout::image_len + ALIGN_SLACK]`: the input, zero-padded and channels
    /// last, for a backward pass that scatters a sparse gradient; empty in inference.
    pub(super) channels_last: Array2<f32>,
    /// The backward pass's scratch.
    pub(super) backward: GemmBackwardBuffers,
}

/// What [`ConvAlgorithm::ImplicitGemm`] keeps and uses.
#[derive(Clone, Debug, Default)]
pub(super) struct ImplicitBuffers {
    /// `[chunks, B * layout::image_len + ALIGN_SLACK]`: the input, zero-padded and channels
    /// last, kept for backward (one image per chunk in inference).
    pub(super) channels_last: Array2<f32>,
    /// `[chunks, OH*OW * O + ALIGN_SLACK]`: one image's output channels last, before it is
    /// transposed or pooled.
    pub(super) out_channels_last: Array2<f32>,
    /// `[chunks, O, OH*OW]`: one image's output before a pooling other than 2x2 / 2; empty
    /// otherwise.
    pub(super) staged: Array3<f32>,
    /// `[KH*KW*C * O + ALIGN_SLACK]`: the weight packed for the forward pass.
    pub(super) weight_by_tap: Array1<f32>,
    /// What `weight_by_tap` was packed from: (C, KH, KW, O) and the weight `[O, C*KH*KW]`.
    pub(super) packed_for: Option<(PackingKey, Vec<f32>)>,
    /// The backward pass's scratch.
    pub(super) backward: GemmBackwardBuffers,
}

/// (C, KH, KW, O): the shapes that order a packed weight.
pub(super) type PackingKey = (usize, usize, usize, usize);

/// The scratch of the backward pass the two GEMM algorithms share (`im2col::backward`).
#[derive(Clone, Debug, Default)]
pub(super) struct GemmBackwardBuffers {
    /// `[chunks, O, B*OH*OW]`: a chunk's output gradient, images side by side, when images
    /// are gathered; `[chunks, O, OH*OW]` for one unpooled image when they are not; empty
    /// otherwise.
    pub(super) wide: Array3<f32>,
    /// `[chunks, C*KH*KW, B*OH*OW]` (or one image's `OH*OW` columns when images are not
    /// gathered): the unfolded input gradient; empty when no input gradient is wanted.
    pub(super) dcols: Array3<f32>,
    /// `[O * KH*KW*C + ALIGN_SLACK]`: the weight channels last.
    pub(super) weight_channels_last: Array1<f32>,
    /// `[chunks, O * KH*KW*C + ALIGN_SLACK]`: each chunk's weight-gradient sum, channels last.
    pub(super) partial_dw_channels_last: Array2<f32>,
    /// `[chunks, layout::image_len + ALIGN_SLACK]`: one image's input gradient, channels last
    /// (padded, or `[H*W, C]` for `transposed`);
    /// empty when no input gradient is wanted.
    pub(super) dx_channels_last: Array2<f32>,
    /// `[chunks, OH*OW]`: where the nonzero gradients of one output channel are (receptive
    /// field corners in a channels-last image), scratch for the scatter.
    pub(super) scatter_corners: Array2<usize>,
    /// `[chunks, OH*OW]`: their values, scratch for the scatter.
    pub(super) scatter_values: Array2<f32>,
    /// `[chunks, scatter::lists_len]`: where the nonzero gradients are, for the scatter.
    pub(super) scatter_lists: Array2<u32>,
    /// `[chunks, B*OH*OW * O]` (or one image's when images are not gathered): a chunk's dense
    /// output gradient channels last, for `implicit::weight_grad`; empty otherwise.
    pub(super) grads_channels_last: Array2<f32>,
    /// `[chunks, KH*KW*C * O]`: each chunk's weight-gradient sum from dense output gradients,
    /// a receptive-field value's sums for every output channel consecutive (as
    /// `implicit::weight_grad` adds them); empty where that is not used.
    pub(super) partial_dw_taps: Array2<f32>,
    /// `[O * KH*KW*C + ALIGN_SLACK]`: the weight flipped for `transposed`, which computes the
    /// input gradient as a convolution; `[ALIGN_SLACK]` where that does not apply.
    pub(super) weight_flipped: Array1<f32>,
    /// `[chunks, image_len + ALIGN_SLACK]` of the gradient's convolution: one image's output
    /// gradient zero-padded channels last, for `transposed`; empty where it does not apply.
    pub(super) grads_padded: Array2<f32>,
}

/// Gives `buffer` this shape, reallocating only when the shape changed.
pub(super) fn resize<T, D>(buffer: &mut ndarray::Array<T, D>, shape: D::Pattern)
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
    use crate::conv::{
        Backward, BeforePool, Conv2dGrads, Padding, conv2d_max_pool_backward,
        conv2d_max_pool_forward,
    };
    use crate::pool::Pool2dDims;
    use ndarray::Array1;

    impl GemmBackwardBuffers {
        fn data_addresses(&self) -> Vec<usize> {
            vec![
                self.wide.as_ptr() as usize,
                self.dcols.as_ptr() as usize,
                self.weight_channels_last.as_ptr() as usize,
                self.partial_dw_channels_last.as_ptr() as usize,
                self.dx_channels_last.as_ptr() as usize,
                self.scatter_corners.as_ptr() as usize,
                self.scatter_values.as_ptr() as usize,
                self.scatter_lists.as_ptr() as usize,
                self.grads_channels_last.as_ptr() as usize,
            ]
        }
    }

    impl Conv2dBuffers {
        /// Where each buffer's data is: a reallocation moves it.
        fn data_addresses(&self) -> Vec<usize> {
            let mut addresses = vec![
                self.partial_dw.as_ptr() as usize,
                self.partial_db.as_ptr() as usize,
                self.argmax_scratch.as_ptr() as usize,
            ];
            match &self.algorithm {
                AlgorithmBuffers::Empty => {}
                AlgorithmBuffers::Direct(own) => addresses.extend([
                    own.padded.as_ptr() as usize,
                    own.wide.as_ptr() as usize,
                    own.padded_dx.as_ptr() as usize,
                    own.staged.as_ptr() as usize,
                ]),
                AlgorithmBuffers::Im2col(own) => {
                    addresses.extend([
                        own.cols.as_ptr() as usize,
                        own.gathered_out.as_ptr() as usize,
                        own.channels_last.as_ptr() as usize,
                    ]);
                    addresses.extend(own.backward.data_addresses());
                }
                AlgorithmBuffers::Implicit(own) => {
                    addresses.extend([
                        own.channels_last.as_ptr() as usize,
                        own.out_channels_last.as_ptr() as usize,
                        own.staged.as_ptr() as usize,
                        own.weight_by_tap.as_ptr() as usize,
                        own.packed_for
                            .as_ref()
                            .map_or(0, |(_, copy)| copy.as_ptr() as usize),
                    ]);
                    addresses.extend(own.backward.data_addresses());
                }
            }
            addresses
        }
    }

    fn filled(shape: [usize; 4], seed: usize) -> Array4<f32> {
        Array4::from_shape_fn(shape, |(n, c, h, w)| {
            ((n * 7 + c * 5 + h * 3 + w + seed) % 13) as f32 / 6.0 - 1.0
        })
    }

    /// Once a shape has been seen, training steps (fused forward and backward) reuse every
    /// buffer: no reallocation per call, on each of the three convolution paths.
    #[test]
    fn training_steps_reuse_their_buffers() {
        // Direct (1 channel, 3x3), implicit GEMM (16 outputs), im2col + GEMM (3 outputs).
        let cases = [
            ([9, 1, 12, 12], 8, ConvAlgorithm::Direct),
            ([9, 8, 9, 9], 16, ConvAlgorithm::ImplicitGemm),
            ([9, 4, 9, 9], 3, ConvAlgorithm::Im2colGemm),
        ];
        for (input, out_channels, algorithm) in cases {
            let dims = Conv2dDims::new(input, out_channels, [3, 3], [1, 1], Padding::Valid)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(dims.algorithm(), algorithm);
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
                conv2d_max_pool_forward(
                    &dims,
                    &pool,
                    BeforePool::Relu,
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
                conv2d_max_pool_backward(
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
