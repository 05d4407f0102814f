//! im2col + GEMM: each image is unfolded ([`im2col`]) into the matrix whose product with the
//! weight is the convolution, forward; backward, the weight gradient is the product the other
//! way round and the input gradient is folded back ([`col2im`]). The implicit GEMM's backward
//! pass is this one too (see [`DenseProducts`]); a sparse gradient is scattered instead
//! (`scatter`).

use ndarray::parallel::prelude::*;
use ndarray::{
    Array2, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis, Zip, s,
};

use super::buffers::{GemmBackwardBuffers, Im2colBuffers, resize};
use super::chunks::{ChunkGrad, ChunkOutput, image_matrix};
use super::fused::max_pool_image;
use super::layout::{self, ALIGN_SLACK, aligned, aligned_mut};
use super::{
    Conv2dDims, ForwardPass, Partials, col2im, contiguous, contiguous_mut, im2col,
    images_per_chunk, implicit, into_contiguous, into_contiguous_mut, scatter, transposed,
};
use crate::gemm::sgemm_unchecked;

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

/// The forward pass by im2col + GEMM, into one `outputs` entry per chunk of the batch.
pub(super) fn forward(
    pass: &ForwardPass<'_, '_>,
    own: &mut Im2colBuffers,
    outputs: Vec<ChunkOutput<'_>>,
) {
    let ForwardPass {
        dims,
        x,
        weight,
        bias,
        keep,
    } = *pass;
    let pooled = matches!(outputs.first(), Some(ChunkOutput::MaxPool(..)));
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
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
    let keep_cols = keep && !pooled;
    own.cols_kept = keep_cols;
    let kept_images = if keep_cols { per_chunk } else { group };
    resize(&mut own.cols, (chunks, patch, kept_images * pixels));
    let (out_rows, out_len) = if gather || pooled {
        (o, group * pixels)
    } else {
        (0, 0)
    };
    resize(&mut own.gathered_out, (chunks, out_rows, out_len));
    // For a backward pass that scatters a sparse output gradient, the input channels last.
    let channels_last_len = if keep {
        per_chunk * layout::image_len(dims) + ALIGN_SLACK
    } else {
        0
    };
    resize(&mut own.channels_last, (chunks, channels_last_len));

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
    let Im2colBuffers {
        cols,
        gathered_out,
        channels_last,
        ..
    } = own;
    cols.outer_iter_mut()
        .into_par_iter()
        .zip(gathered_out.outer_iter_mut())
        .zip(channels_last.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(
            |((((mut cols, mut out), mut channels_last), x), mut output)| {
                if keep {
                    let images = aligned_mut(contiguous_mut(&mut channels_last));
                    let len = layout::image_len(dims);
                    for (x, image) in x.outer_iter().zip(images.chunks_exact_mut(len)) {
                        layout::to_channels_last(dims, x, image);
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
                        ChunkOutput::MaxPool(pool, before, y, argmax) => {
                            let mut y = y.slice_mut(here);
                            for (j, y) in y.outer_iter_mut().enumerate() {
                                let argmax = argmax.image(g * group + j);
                                max_pool_image(pool, *before, image(j), y, argmax);
                            }
                        }
                    }
                }
            },
        );
}

/// The backward pass of a convolution computed by im2col + GEMM, into `partials` and onto
/// `dx_chunks`.
pub(super) fn backward(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    own: &mut Im2colBuffers,
    partials: Partials<'_>,
    dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>>,
) {
    let kept = KeptInput {
        columns: own.cols_kept.then(|| own.cols.view()),
        channels_last: own.channels_last.view(),
    };
    let dense = DenseProducts::Gemm;
    let grads = (chunk_grads, dx_chunks);
    backward_gemm(
        dims,
        weight,
        grads,
        kept,
        &mut own.backward,
        partials,
        dense,
    );
}

/// How [`backward_gemm`] multiplies a dense output gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DenseProducts {
    /// `dW += dy * cols^T` from the kept columns (or the input unfolded again), and
    /// `dcols = W^T * dy`, folded onto dx by [`col2im`].
    Gemm,
    /// From the kept channels-last images: `dW^T += cols * dy^T` by the implicit GEMM
    /// (`implicit::weight_grad`), and dx by `implicit::input_grad_channels_last`.
    ChannelsLast,
}

/// What a GEMM algorithm's forward pass kept of its input.
pub(super) struct KeptInput<'a> {
    /// `[chunks, C*KH*KW, B*OH*OW]`: the unfolded input, when it was kept whole.
    pub(super) columns: Option<ArrayView3<'a, f32>>,
    /// `[chunks, B * layout::image_len + ALIGN_SLACK]`: the input, zero-padded and channels
    /// last.
    pub(super) channels_last: ArrayView2<'a, f32>,
}

/// The backward pass both GEMM algorithms share: each chunk's gradient sums into `partials`,
/// and the input gradient onto the chunks of dx, given each chunk's output gradient and dx
/// (`grads`).
///
/// Per chunk: `dW_k [O, C*KH*KW] += dy [O, B*OH*OW] * cols^T [B*OH*OW, C*KH*KW]` and
/// `db_k [O]` = row sums of dy over the chunk's images; `dcols [C*KH*KW, OH*OW] = W^T [C*KH*KW,
/// O] * dy[n] [O, OH*OW]`, folded back onto dx[n] by [`col2im`]. Images with few output pixels
/// are first gathered side by side into `wide`, so that dW_k is one GEMM with a long inner
/// dimension (B*OH*OW); images with many are used one at a time, which saves the gather's pass
/// over memory. The choice depends on the shape alone. A sparse gradient (behind ReLU and
/// pooling) is scattered instead (see `scatter`), decided for each gathered chunk or large
/// image by its count of nonzeros: the data, never the thread count, so the bits stay the same
/// for the same data.
pub(super) fn backward_gemm(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    grads: (Vec<ChunkGrad<'_>>, Vec<Option<ArrayViewMut4<'_, f32>>>),
    kept: KeptInput<'_>,
    own: &mut GemmBackwardBuffers,
    partials: Partials<'_>,
    dense: DenseProducts,
) {
    let (chunk_grads, dx_chunks) = grads;
    let pooled = matches!(chunk_grads.first(), Some(ChunkGrad::Pooled(..)));
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = chunk_grads.len();
    // Images with few output pixels are gathered side by side into `wide`; the others are
    // used one at a time and need only one image's worth of `dcols` (and of `wide`, when their
    // gradient must be unpooled first). A buffer the pass does not use is sized to nothing.
    let gather = pixels < WIDE_GEMM_MAX_PIXELS;
    let images_at_once = if gather { per_chunk } else { 1 };
    let wants_dx = dx_chunks.iter().any(Option::is_some);
    // A dense gradient channels last gives the input gradient as a convolution of its own
    // where that applies (see `transposed`), without unfolding it.
    let grad_dims = (wants_dx && dense == DenseProducts::ChannelsLast && transposed::applies(dims))
        .then(|| transposed::gradient_dims(dims));
    let dcols_len = if wants_dx && grad_dims.is_none() {
        images_at_once * pixels
    } else {
        0
    };
    let (wide_rows, wide_len) = match (gather, pooled) {
        (true, _) => (o, per_chunk * pixels),
        (false, true) => (o, pixels),
        (false, false) => (0, 0),
    };
    resize(&mut own.dcols, (chunks, patch, dcols_len));
    resize(&mut own.wide, (chunks, wide_rows, wide_len));
    let dx_cl_len = if wants_dx {
        layout::image_len(dims) + ALIGN_SLACK
    } else {
        0
    };
    let (flipped_len, grads_padded_len) = match &grad_dims {
        Some(grad_dims) => (o * patch, layout::image_len(grad_dims) + ALIGN_SLACK),
        None => (0, 0),
    };
    resize(&mut own.weight_flipped, flipped_len + ALIGN_SLACK);
    resize(&mut own.grads_padded, (chunks, grads_padded_len));
    resize(&mut own.weight_channels_last, o * patch + ALIGN_SLACK);
    resize(
        &mut own.partial_dw_channels_last,
        (chunks, o * patch + ALIGN_SLACK),
    );
    resize(&mut own.dx_channels_last, (chunks, dx_cl_len));
    let grads_cl_len = match dense {
        DenseProducts::ChannelsLast => images_at_once * pixels * o,
        DenseProducts::Gemm => 0,
    };
    resize(&mut own.grads_channels_last, (chunks, grads_cl_len));
    let taps_len = match dense {
        DenseProducts::ChannelsLast => patch * o,
        DenseProducts::Gemm => 0,
    };
    resize(&mut own.partial_dw_taps, (chunks, taps_len));
    resize(&mut own.scatter_corners, (chunks, pixels));
    resize(&mut own.scatter_values, (chunks, pixels));
    resize(&mut own.scatter_lists, (chunks, scatter::lists_len(dims)));
    let weight_std = weight.as_standard_layout();
    layout::weight_to_channels_last(
        dims,
        contiguous(&weight_std),
        aligned_mut(contiguous_mut(&mut own.weight_channels_last)),
    );
    if grad_dims.is_some() {
        transposed::pack_flipped_weight(
            dims,
            contiguous(&weight_std),
            aligned_mut(contiguous_mut(&mut own.weight_flipped)),
        );
    }
    let GemmBackwardBuffers {
        wide,
        dcols,
        weight_channels_last,
        partial_dw_channels_last,
        dx_channels_last,
        scatter_corners,
        scatter_values,
        scatter_lists,
        grads_channels_last,
        weight_flipped,
        grads_padded,
        partial_dw_taps,
    } = own;
    let shared = Shared {
        dims,
        weight,
        weight_cl: &aligned(contiguous(weight_channels_last))[..o * patch],
        flipped: grad_dims.map(|grad_dims| {
            (
                grad_dims,
                &aligned(contiguous(weight_flipped))[..flipped_len],
            )
        }),
        dense,
        gather,
    };
    let columns: Vec<Option<ArrayView2<'_, f32>>> = (0..chunks)
        .map(|k| {
            kept.columns
                .map(|columns| columns.index_axis_move(Axis(0), k))
        })
        .collect();
    let scatters = kept
        .channels_last
        .outer_iter()
        .zip(partial_dw_channels_last.outer_iter_mut())
        .zip(dx_channels_last.outer_iter_mut())
        .zip(scatter_corners.outer_iter_mut())
        .zip(scatter_values.outer_iter_mut())
        .zip(scatter_lists.outer_iter_mut())
        .map(
            |(((((images, dw), dx), corners), values), lists)| scatter::ChunkScatter {
                images: aligned(into_contiguous(images)),
                dw: &mut aligned_mut(into_contiguous_mut(dw))[..o * patch],
                dx: aligned_mut(into_contiguous_mut(dx)),
                corners: into_contiguous_mut(corners),
                values: into_contiguous_mut(values),
                lists: into_contiguous_mut(lists),
            },
        );
    let work: Vec<ChunkBackward<'_>> = partials
        .dw
        .outer_iter_mut()
        .zip(partials.db.outer_iter_mut())
        .zip(columns)
        .zip(dcols.outer_iter_mut())
        .zip(grads_channels_last.outer_iter_mut())
        .zip(grads_padded.outer_iter_mut())
        .zip(partial_dw_taps.outer_iter_mut())
        .zip(scatters)
        .map(
            |(((((((pdw, pdb), cols), dcols), grads_cl), grads_padded), dw_taps), scatter)| {
                ChunkBackward {
                    pdw,
                    pdb,
                    cols,
                    dcols,
                    scatter,
                    grads_cl: into_contiguous_mut(grads_cl),
                    grads_padded: aligned_mut(into_contiguous_mut(grads_padded)),
                    dw_taps: into_contiguous_mut(dw_taps),
                }
            },
        )
        .collect();
    work.into_par_iter()
        .zip(wide.outer_iter_mut())
        .zip(chunk_grads)
        .zip(dx_chunks)
        .for_each(|(((work, wide), dy), dx)| work.run(&shared, wide, dy, dx));
}

/// What every chunk of [`backward_gemm`] reads.
struct Shared<'a> {
    dims: &'a Conv2dDims,
    /// `[O, C*KH*KW]`.
    weight: ArrayView2<'a, f32>,
    /// `[O, KH*KW*C]`: the weight channels last.
    weight_cl: &'a [f32],
    /// The convolution that gives the input gradient and its packed weight
    /// (`transposed::pack_flipped_weight`), where `transposed` applies.
    flipped: Option<(Conv2dDims, &'a [f32])>,
    dense: DenseProducts,
    /// Whether a chunk's images are gathered side by side.
    gather: bool,
}

/// One chunk's share of [`backward_gemm`]: where its sums go, what it reads, its scratch.
struct ChunkBackward<'a> {
    /// `[O, C*KH*KW]`: the chunk's weight-gradient sum (overwritten).
    pdw: ArrayViewMut2<'a, f32>,
    /// `[O]`: its bias-gradient sum (overwritten).
    pdb: ArrayViewMut1<'a, f32>,
    /// `[C*KH*KW, B*OH*OW]`: its unfolded input, if the forward pass kept it.
    cols: Option<ArrayView2<'a, f32>>,
    /// `[C*KH*KW, B*OH*OW]` or `[C*KH*KW, OH*OW]`: the unfolded input gradient.
    dcols: ArrayViewMut2<'a, f32>,
    /// Its channels-last images and the scatter's scratch.
    scatter: scatter::ChunkScatter<'a>,
    /// `[B*OH*OW, O]` or `[OH*OW, O]`: a dense gradient channels last, for
    /// [`DenseProducts::ChannelsLast`].
    grads_cl: &'a mut [f32],
    /// One image's output gradient, zero-padded channels last, as `transposed` reads it.
    grads_padded: &'a mut [f32],
    /// `[KH*KW*C, O]`: the weight-gradient sum of the chunk's dense gradients, for
    /// [`DenseProducts::ChannelsLast`].
    dw_taps: &'a mut [f32],
}

impl ChunkBackward<'_> {
    /// The chunk's gradients given its output gradient `dy`, with `wide` as scratch, onto
    /// `dx` `[B, C, H, W]` when given.
    fn run(
        mut self,
        shared: &Shared<'_>,
        wide: ArrayViewMut2<'_, f32>,
        dy: ChunkGrad<'_>,
        dx: Option<ArrayViewMut4<'_, f32>>,
    ) {
        if shared.gather {
            self.gathered(shared, wide, dy, dx);
        } else {
            self.image_by_image(shared, wide, dy, dx);
        }
    }

    /// The chunk's images side by side in `wide`: one product each for all of them.
    fn gathered(
        &mut self,
        shared: &Shared<'_>,
        mut wide: ArrayViewMut2<'_, f32>,
        dy: ChunkGrad<'_>,
        mut dx: Option<ArrayViewMut4<'_, f32>>,
    ) {
        let dims = shared.dims;
        let pixels = dims.out_pixels();
        let images = dy.images();
        for j in 0..images {
            dy.write_conv_grad(j, wide.slice_mut(s![.., j * pixels..(j + 1) * pixels]));
        }
        let used = images * pixels;
        let wide = wide.slice(s![.., ..used]);
        Zip::from(&mut self.pdb)
            .and(wide.rows())
            .for_each(|b, row| *b = row.sum());
        self.scatter.dw.fill(0.0);
        let bound = dy.nonzero_bound().map(|per_image| per_image * images);
        if scatter::pays(&wide, bound) {
            for j in 0..images {
                let grad = wide.slice(s![.., j * pixels..(j + 1) * pixels]);
                let dx = dx.as_mut().map(|dx| dx.index_axis_mut(Axis(0), j));
                self.scatter.image(dims, shared.weight_cl, j, grad, dx);
            }
            self.pdw.fill(0.0);
            layout::add_from_channels_last(dims, self.scatter.dw, contiguous_mut(&mut self.pdw));
            return;
        }
        self.pdw.fill(0.0);
        self.dw_taps.fill(0.0);
        self.add_dense_weight_grad(shared, wide, 0, images);
        self.add_dense_sums(shared);
        if let Some(dx) = dx {
            self.dense_input_grad(shared, wide, dx);
        }
    }

    /// The chunk's images one at a time, each gradient as it is (or unpooled into `wide`).
    fn image_by_image(
        &mut self,
        shared: &Shared<'_>,
        mut wide: ArrayViewMut2<'_, f32>,
        dy: ChunkGrad<'_>,
        mut dx: Option<ArrayViewMut4<'_, f32>>,
    ) {
        let dims = shared.dims;
        let (o, pixels) = (dims.out_channels, dims.out_pixels());
        self.pdb.fill(0.0);
        self.pdw.fill(0.0);
        self.scatter.dw.fill(0.0);
        self.dw_taps.fill(0.0);
        for j in 0..dy.images() {
            let grad = match dy.conv_view(j, o, pixels) {
                Some(grad) => grad,
                None => {
                    dy.write_conv_grad(j, wide.view_mut());
                    wide.view()
                }
            };
            Zip::from(&mut self.pdb)
                .and(grad.rows())
                .for_each(|b, row| *b += row.sum());
            let dx = dx.as_mut().map(|dx| dx.index_axis_mut(Axis(0), j));
            if scatter::pays(&grad, dy.nonzero_bound()) {
                self.scatter.image(dims, shared.weight_cl, j, grad, dx);
                continue;
            }
            self.add_dense_weight_grad(shared, grad.view(), j, 1);
            if let Some(dx) = dx {
                self.dense_input_grad(shared, grad, dx.insert_axis(Axis(0)));
            }
        }
        layout::add_from_channels_last(dims, self.scatter.dw, contiguous_mut(&mut self.pdw));
        self.add_dense_sums(shared);
    }

    /// Adds the weight-gradient sum [`Self::add_dense_weight_grad`] left in `dw_taps` (for
    /// [`DenseProducts::ChannelsLast`]) onto `pdw`.
    fn add_dense_sums(&mut self, shared: &Shared<'_>) {
        if shared.dense == DenseProducts::ChannelsLast {
            layout::add_from_taps(shared.dims, self.dw_taps, contiguous_mut(&mut self.pdw));
        }
    }

    /// `dx [count, C, H, W] =` the input gradient of a dense `grad [O, count*OH*OW]`, whose
    /// weight gradient [`Self::add_dense_weight_grad`] has just added (and, for
    /// [`DenseProducts::ChannelsLast`], left channels last in `grads_cl`).
    fn dense_input_grad(
        &mut self,
        shared: &Shared<'_>,
        grad: ArrayView2<'_, f32>,
        mut dx: ArrayViewMut4<'_, f32>,
    ) {
        let dims = shared.dims;
        let (used, pixels) = (grad.ncols(), dims.out_pixels());
        if let Some((grad_dims, flipped)) = &shared.flipped {
            let (o, c) = (dims.out_channels, dims.in_channels);
            let dx_cl = &mut self.scatter.dx[..dims.in_h * dims.in_w * c];
            for (grad_cl, dx) in self.grads_cl[..used * o]
                .chunks_exact(pixels * o)
                .zip(dx.outer_iter_mut())
            {
                transposed::input_grad_image(
                    grad_dims,
                    flipped,
                    grad_cl,
                    self.grads_padded,
                    dx_cl,
                    dx,
                );
            }
            return;
        }
        match shared.dense {
            DenseProducts::ChannelsLast => implicit::input_grad_channels_last(
                dims,
                shared.weight_cl,
                &self.grads_cl[..used * dims.out_channels],
                contiguous_mut(&mut self.dcols),
                self.scatter.dx,
                dx,
            ),
            DenseProducts::Gemm => {
                // dcols [C*KH*KW, count*OH*OW] = W^T [C*KH*KW, O] * dy [O, count*OH*OW].
                let mut dcols = self.dcols.slice_mut(s![.., ..used]);
                sgemm_unchecked(1.0, &shared.weight.t(), &grad, 0.0, dcols.view_mut());
                for (j, dx) in dx.outer_iter_mut().enumerate() {
                    col2im(dims, dcols.slice(s![.., j * pixels..(j + 1) * pixels]), dx);
                }
            }
        }
    }

    /// Adds the weight gradient of a dense `grad [O, count*OH*OW]` of `count` images from
    /// image `first` of the chunk: onto the sum `dw_taps` from the kept
    /// images (leaving the gradient channels last in `grads_cl` for the input gradient), or
    /// onto `pdw` from the unfolded columns.
    fn add_dense_weight_grad(
        &mut self,
        shared: &Shared<'_>,
        grad: ArrayView2<'_, f32>,
        first: usize,
        count: usize,
    ) {
        let dims = shared.dims;
        match shared.dense {
            DenseProducts::ChannelsLast => {
                let grads_cl = &mut self.grads_cl[..grad.len()];
                layout::into_channels_last(grad, grads_cl);
                let images = &self.scatter.images[first * layout::image_len(dims)..];
                implicit::weight_grad(dims, images, count, grads_cl, self.dw_taps);
            }
            DenseProducts::Gemm => {
                // dW [O, C*KH*KW] += dy [O, count*OH*OW] * cols^T [count*OH*OW, C*KH*KW].
                let cols = chunk_columns(dims, self.cols, self.scatter.images, first, count);
                sgemm_unchecked(1.0, &grad, &cols.t(), 1.0, self.pdw.view_mut());
            }
        }
    }
}

/// The unfolded input of `count` images of a chunk from its image `first`,
/// `[C*KH*KW, count*OH*OW]`: the columns the forward pass kept, or, when it kept only its
/// channels-last copy of the input (`images`), unfolded again from that.
fn chunk_columns<'a>(
    dims: &Conv2dDims,
    cols: Option<ArrayView2<'a, f32>>,
    images: &[f32],
    first: usize,
    count: usize,
) -> ndarray::CowArray<'a, f32, ndarray::Ix2> {
    let pixels = dims.out_pixels();
    if let Some(cols) = cols {
        return cols
            .slice_move(s![.., first * pixels..(first + count) * pixels])
            .into();
    }
    let len = layout::image_len(dims);
    let mut unfolded = Array2::zeros((dims.patch_len(), count * pixels));
    for j in 0..count {
        let image = &images[(first + j) * len..(first + j + 1) * len];
        im2col(
            dims,
            layout::image_view(dims, image),
            unfolded.slice_mut(s![.., j * pixels..(j + 1) * pixels]),
        );
    }
    unfolded.into()
}
