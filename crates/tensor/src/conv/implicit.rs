//! Implicit-GEMM forward convolution for many output channels: the GEMM `out = cols^T * W^T`
//! reads its rows of `cols` straight from a zero-padded channels-last image instead of an
//! unfolded copy of it.
//!
//! Why: im2col writes every input value KH*KW times (9 for 3x3) and the GEMM then packs that
//! copy once more; on conv 32->64 they were a seventh of a training step, bound by stores.
//! Channels last, kernel row kh of a receptive field is `KW*C` consecutive values, so an output
//! pixel's row of `cols` is KH runs of the image, read in place.
//!
//! The kernel keeps a tile of ROWS output pixels by up to 4 vector registers of output channels
//! in registers (6 x 64 on AVX-512: 24 of its 32 registers), and for each receptive-field value
//! loads 4 vectors of weights and broadcasts ROWS input values: 24 multiply-adds per 10 loads.
//! Fewer output channels (16 or 32) take taller tiles of fewer vectors. Its output is channels
//! last, `[OH*OW, O]`, and is transposed after.
//!
//! The weight gradient of a dense output gradient is the same product the other way round,
//! `dW^T = cols * dy^T`, read from the channels-last images the forward pass keeps: so the
//! forward pass of a plain convolution need not unfold (and keep) its input for the backward
//! pass, which cost conv 32->64 a third of its forward pass.

use ndarray::parallel::prelude::*;
use ndarray::{ArrayView2, ArrayViewMut4, Axis};

use super::buffers::{ImplicitBuffers, resize};
use super::chunks::{ChunkGrad, ChunkOutput};
use super::fused::{BeforePool, max_pool_image};
use super::im2col::{DenseProducts, KeptInput, backward_gemm};
use super::layout::{self, ALIGN_SLACK, aligned, aligned_mut};
use super::{
    Conv2dDims, ForwardPass, Partials, as_matrix, as_matrix_mut, contiguous, contiguous_mut,
    images_per_chunk,
};
use crate::gemm::sgemm_unchecked;
use crate::pool::replaces_max;
use crate::simd::{MulAdd, dispatched};
use crate::vector::Simd;

/// The output channels must be a multiple of this: one vector register of the widest
/// instruction set, two of AVX2's.
pub(super) const CHANNEL_BLOCK: usize = 16;

/// Writes `weight [O, C*KH*KW]` (rows in (c, kh, kw) order) into `out` as `[KH, KW, C, O]`:
/// the weights of one receptive-field value for every output channel, consecutive.
pub(crate) fn pack_weight(dims: &Conv2dDims, weight: &[f32], out: &mut [f32]) {
    let (o_count, patch) = (dims.out_channels, dims.patch_len());
    for (o, w) in weight.chunks_exact(patch).enumerate() {
        for (r, &v) in w.iter().enumerate() {
            let (c, kh, kw) = dims.tap_of_row(r);
            out[((kh * dims.kernel_w + kw) * dims.in_channels + c) * o_count + o] = v;
        }
    }
}

/// Writes `out_cl [OH*OW, O]` into `out [O, OH*OW]`.
pub(crate) fn transpose_into(dims: &Conv2dDims, out_cl: &[f32], out: &mut [f32]) {
    let (o_count, pixels) = (dims.out_channels, dims.out_pixels());
    layout::transpose(out_cl, o_count, pixels, o_count, out, pixels);
}

/// The forward pass: each image is copied channels last (and kept, for the backward pass,
/// when `pass.keep`), convolved by the implicit GEMM and transposed into NCHW order (or
/// pooled), into one `outputs` entry per chunk of the batch.
pub(super) fn forward(
    pass: &ForwardPass<'_, '_>,
    own: &mut ImplicitBuffers,
    outputs: Vec<ChunkOutput<'_>>,
) {
    let ForwardPass {
        dims,
        x,
        weight,
        bias,
        keep: keep_columns,
    } = *pass;
    let (o, pixels) = (dims.out_channels, dims.out_pixels());
    let per_chunk = images_per_chunk(dims.batch);
    let chunks = dims.batch.div_ceil(per_chunk);
    let image_len = layout::image_len(dims);
    let kept_images = if keep_columns { per_chunk } else { 1 };
    let pooled = matches!(outputs.first(), Some(ChunkOutput::MaxPool(..)));
    let staged = if pooled { (o, pixels) } else { (0, 0) };
    // The backward pass reads the kept channels-last images (see `weight_grad`), or, for
    // kernel rows too short for it, unfolds them again: no columns are kept.
    resize(
        &mut own.channels_last,
        (chunks, kept_images * image_len + ALIGN_SLACK),
    );
    resize(
        &mut own.out_channels_last,
        (chunks, pixels * o + ALIGN_SLACK),
    );
    resize(&mut own.staged, (chunks, staged.0, staged.1));
    resize(&mut own.weight_by_tap, o * dims.patch_len() + ALIGN_SLACK);
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
    if own
        .packed_for
        .as_ref()
        .is_none_or(|(k, packed)| *k != key || !same_bits(packed))
    {
        pack_weight(
            dims,
            weight,
            aligned_mut(contiguous_mut(&mut own.weight_by_tap)),
        );
        // (Reusing the copy's allocation: training changes the weights every step.)
        let (packed_key, copy) = own.packed_for.get_or_insert_with(Default::default);
        *packed_key = key;
        copy.clear();
        copy.extend_from_slice(weight);
    }
    let weight = &aligned(contiguous(&own.weight_by_tap))[..o * dims.patch_len()];
    let bias = bias.map(|b| b.to_vec());
    let ImplicitBuffers {
        channels_last,
        out_channels_last,
        staged,
        ..
    } = own;
    channels_last
        .outer_iter_mut()
        .into_par_iter()
        .zip(out_channels_last.outer_iter_mut())
        .zip(staged.outer_iter_mut())
        .zip(x.axis_chunks_iter(Axis(0), per_chunk))
        .zip(outputs)
        .for_each(
            |((((mut images, mut out_cl), mut staged), x), mut output)| {
                let images = aligned_mut(contiguous_mut(&mut images));
                let out_cl = &mut aligned_mut(contiguous_mut(&mut out_cl))[..pixels * o];
                for (j, x) in x.outer_iter().enumerate() {
                    let slot = if keep_columns { j } else { 0 };
                    let image = &mut images[slot * image_len..(slot + 1) * image_len];
                    layout::to_channels_last(dims, x, image);
                    // A 2x2 pooling reads the output's first 2*PH rows and 2*PW columns only
                    // (conv 32->64 on 13x13: 100 of 121 pixels).
                    let covered = match &output {
                        ChunkOutput::MaxPool(pool, ..) if pool.is_2x2_stride_2() => {
                            (dims.out_h() / 2 * 2, dims.out_w() / 2 * 2)
                        }
                        _ => (dims.out_h(), dims.out_w()),
                    };
                    let bias = bias.as_deref();
                    forward_image(dims, image, weight, bias, covered, out_cl);
                    match &mut output {
                        ChunkOutput::Conv(y) => transpose_into(
                            dims,
                            out_cl,
                            contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                        ),
                        ChunkOutput::MaxPool(pool, before, y, argmax) if pool.is_2x2_stride_2() => {
                            max_pool_2x2(
                                dims,
                                *before,
                                out_cl,
                                contiguous_mut(&mut y.index_axis_mut(Axis(0), j)),
                                argmax.image_2x2(j),
                            );
                        }
                        ChunkOutput::MaxPool(pool, before, y, argmax) => {
                            transpose_into(dims, out_cl, contiguous_mut(&mut staged));
                            max_pool_image(
                                pool,
                                *before,
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

/// The backward pass: im2col + GEMM's (see `im2col::backward_gemm`), with the products of a
/// dense gradient computed from the kept channels-last images where the kernel rows are long
/// enough for [`weight_grad`], else from the input unfolded again.
pub(super) fn backward(
    dims: &Conv2dDims,
    weight: ArrayView2<'_, f32>,
    chunk_grads: Vec<ChunkGrad<'_>>,
    own: &mut ImplicitBuffers,
    partials: Partials<'_>,
    dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>>,
) {
    let kept = KeptInput {
        columns: None,
        channels_last: own.channels_last.view(),
    };
    let dense = if weight_grad_applies(dims) {
        DenseProducts::ChannelsLast
    } else {
        DenseProducts::Gemm
    };
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

/// `dx [N, C, H, W] = col2im(W^T * dy)` for N images whose output gradient is
/// `grads_cl [N*OH*OW, O]`, from the weight channels last, `weight_cl [O, KH*KW*C]`:
/// `dcols_cl [N*OH*OW, KH*KW*C]` is their unfolded gradient, folded onto `dx_cl` (one padded
/// channels-last image) an image at a time.
pub(super) fn input_grad_channels_last(
    dims: &Conv2dDims,
    weight_cl: &[f32],
    grads_cl: &[f32],
    dcols: &mut [f32],
    dx_cl: &mut [f32],
    mut dx: ArrayViewMut4<'_, f32>,
) {
    let (o, patch, pixels) = (dims.out_channels, dims.patch_len(), dims.out_pixels());
    let rows = grads_cl.len() / o;
    // dcols_cl [N*OH*OW, KH*KW*C] = grads_cl [N*OH*OW, O] * weight_cl [O, KH*KW*C].
    let mut dcols = as_matrix_mut(dcols, rows, patch);
    let weight_cl = as_matrix(weight_cl, o, patch);
    sgemm_unchecked(
        1.0,
        &as_matrix(grads_cl, rows, o),
        &weight_cl,
        0.0,
        dcols.view_mut(),
    );
    let dcols = contiguous(&dcols);
    let len = layout::image_len(dims);
    let dx_cl = &mut dx_cl[..len];
    for (dcols, dx) in dcols.chunks_exact(pixels * patch).zip(dx.outer_iter_mut()) {
        dx_cl.fill(0.0);
        fold_input_grad(dims, dcols, dx_cl);
        layout::from_channels_last(dims, dx_cl, dx);
    }
}

dispatched! {
    /// The convolution of one zero-padded channels-last image `[HP, WP, C]`:
    /// `out_cl [OH*OW, O] = cols^T * weight (+ bias)`, with `weight` packed by [`pack_weight`],
    /// at the output pixels of the first `covered` (rows, columns) (those a pooling reads; the
    /// others are left as they were).
    fn forward_image(
        dims: &Conv2dDims,
        image: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        covered: (usize, usize),
        out_cl: &mut [f32],
    ) => forward_image_body;
}

#[inline(always)]
fn forward_image_body<S: Simd, const LANES: usize>(
    _simd: S,
    dims: &Conv2dDims,
    image: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    covered: (usize, usize),
    out_cl: &mut [f32],
) {
    // VECTORS * ROWS accumulators, the weight vectors and a broadcast value must fit the
    // vector registers: 32 with AVX-512, 16 with AVX2 (where the weights can be read from
    // memory by the FMA). And the ROWS pointers into the image must fit the 16 general
    // registers: 24 rows of one vector ran 2.8x slower than 8 (conv 6->16, spilled pointers).
    // Eight accumulators are enough to cover the FMA's latency.
    let o_count = dims.out_channels;
    let wide = LANES >= 16;
    if o_count.is_multiple_of(4 * LANES) {
        if wide {
            tiles::<S::MulAdd, LANES, 6, 4>(dims, image, weight, bias, covered, out_cl);
        } else {
            tiles::<S::MulAdd, LANES, 3, 4>(dims, image, weight, bias, covered, out_cl);
        }
    } else if o_count.is_multiple_of(2 * LANES) {
        if wide {
            tiles::<S::MulAdd, LANES, 8, 2>(dims, image, weight, bias, covered, out_cl);
        } else {
            tiles::<S::MulAdd, LANES, 6, 2>(dims, image, weight, bias, covered, out_cl);
        }
    } else {
        tiles::<S::MulAdd, LANES, 8, 1>(dims, image, weight, bias, covered, out_cl);
    }
}

#[inline(always)]
fn tiles<M: MulAdd, const LANES: usize, const ROWS: usize, const VECTORS: usize>(
    dims: &Conv2dDims,
    image: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    (rows, columns): (usize, usize),
    out_cl: &mut [f32],
) {
    let o_count = dims.out_channels;
    let block = VECTORS * LANES;
    let run = dims.kernel_w * dims.in_channels;
    let row_step = dims.padded_w() * dims.in_channels;
    let (pixels, ow) = (rows * columns, dims.out_w());
    let weight_row = run * o_count;
    // The output pixel of each of the `pixels` computed.
    let pixel = |q: usize| (q / columns) * ow + q % columns;
    for first in (0..pixels).step_by(ROWS) {
        // Where each pixel's receptive field starts; a last, partial tile repeats its last
        // pixel (computed, not stored).
        let bases: [usize; ROWS] = std::array::from_fn(|r| {
            let p = pixel((first + r).min(pixels - 1));
            ((p / ow) * dims.stride_h * dims.padded_w() + (p % ow) * dims.stride_w)
                * dims.in_channels
        });
        for ob in (0..o_count).step_by(block) {
            let mut acc = [[[0.0f32; LANES]; VECTORS]; ROWS];
            if let Some(bias) = bias {
                let bias = &bias[ob..ob + block];
                for acc in &mut acc {
                    for (acc, b) in acc.iter_mut().zip(bias.chunks_exact(LANES)) {
                        acc.copy_from_slice(b);
                    }
                }
            }
            for kh in 0..dims.kernel_h {
                let weights = &weight[kh * weight_row..(kh + 1) * weight_row];
                let xs: [&[f32]; ROWS] =
                    std::array::from_fn(|r| &image[bases[r] + kh * row_step..][..run]);
                for (i, w) in (0..run).zip(weights.chunks_exact(o_count)) {
                    let w = &w[ob..][..block];
                    for (acc, x) in acc.iter_mut().zip(&xs) {
                        let v = x[i];
                        for (acc, w) in acc.iter_mut().zip(w.chunks_exact(LANES)) {
                            for (a, &w) in acc.iter_mut().zip(w) {
                                *a = M::mul_add(v, w, *a);
                            }
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(pixels - first) {
                let out = &mut out_cl[pixel(first + r) * o_count + ob..][..block];
                for (out, acc) in out.chunks_exact_mut(LANES).zip(acc) {
                    out.copy_from_slice(acc);
                }
            }
        }
    }
}

dispatched! {
    /// Adds the weight gradient of `count` zero-padded channels-last images (`images`, each
    /// `layout::image_len` values) with output gradients `grads_cl [count*OH*OW, O]` onto
    /// `dw_taps [KH*KW*C, O]` (taps in channels-last order (kh, kw, c)): `dw_taps += cols *
    /// grads_cl`, cols read in place.
    fn weight_grad(
        dims: &Conv2dDims,
        images: &[f32],
        count: usize,
        grads_cl: &[f32],
        dw_taps: &mut [f32],
    ) => weight_grad_body;
}

/// The most receptive-field values a tile of [`grad_tiles`] holds (see [`weight_grad_body`]).
const MAX_TILE_ROWS: usize = 8;

/// Whether [`weight_grad`] covers these dimensions: a kernel row (KW*C values, consecutive in a
/// channels-last image) at least as long as a tile, whose values are then loaded from one
/// pointer at constant offsets.
fn weight_grad_applies(dims: &Conv2dDims) -> bool {
    dims.kernel_w * dims.in_channels >= MAX_TILE_ROWS
}

#[inline(always)]
fn weight_grad_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    images: &[f32],
    count: usize,
    grads_cl: &[f32],
    dw_taps: &mut [f32],
) {
    // As the forward tiles, transposed: ROWS receptive-field values by VECTORS vectors of
    // output channels, summed over a block of pixels; the output gradients stay in registers for
    // all ROWS broadcast inputs. (AVX2's 16 registers: 6 x 2 sums, two gradients, an input.)
    let o_count = dims.out_channels;
    if S::LANES < 16 {
        grad_tiles::<S, 6, 2>(simd, dims, images, count, grads_cl, dw_taps);
    } else if o_count.is_multiple_of(4 * S::LANES) {
        grad_tiles::<S, 6, 4>(simd, dims, images, count, grads_cl, dw_taps);
    } else if o_count.is_multiple_of(2 * S::LANES) {
        grad_tiles::<S, 8, 2>(simd, dims, images, count, grads_cl, dw_taps);
    } else {
        grad_tiles::<S, 8, 1>(simd, dims, images, count, grads_cl, dw_taps);
    }
}

/// One tile of [`grad_tiles`] over one block of output rows: the sums over its pixels of
/// ROWS consecutive values of `image` from each pixel's receptive-field corner (`image` starts
/// at the block's first corner plus the tile's offset) times the gradients `grads [pixels, O]`
/// of output channels `ob..ob + VECTORS * LANES`.
#[inline(always)]
fn block_sums<S: Simd, const ROWS: usize, const VECTORS: usize>(
    simd: S,
    dims: &Conv2dDims,
    image: &[f32],
    grads: &[f32],
    ob: usize,
) -> [[S::V; VECTORS]; ROWS] {
    let (o_count, lanes) = (dims.out_channels, S::LANES);
    let row_step = dims.padded_w() * dims.in_channels;
    let mut acc = [[simd.splat(0.0); VECTORS]; ROWS];
    for (oh, row) in grads.chunks_exact(dims.out_w() * o_count).enumerate() {
        let row_corner = oh * dims.stride_h * row_step;
        for (ow, grad) in row.chunks_exact(o_count).enumerate() {
            let corner = row_corner + ow * dims.stride_w * dims.in_channels;
            let x = &image[corner..corner + ROWS];
            let grad = &grad[ob..ob + VECTORS * lanes];
            let g: [S::V; VECTORS] = std::array::from_fn(|v| simd.load(&grad[v * lanes..]));
            for (acc, &x) in acc.iter_mut().zip(x) {
                let x = simd.splat(x);
                for (acc, &g) in acc.iter_mut().zip(&g) {
                    *acc = simd.mul_add(x, g, *acc);
                }
            }
        }
    }
    acc
}

/// The output gradients one block of [`grad_tiles`] reads, in bytes: with the image rows under
/// them, a block stays in L1 while every tile of the kernel passes over it. (Passing over a
/// whole chunk's gradients, 1.6 MB for conv 64->64 at 14x14, read them from L3 96 times.)
const GRAD_BLOCK_BYTES: usize = 16 * 1024;

#[inline(always)]
fn grad_tiles<S: Simd, const ROWS: usize, const VECTORS: usize>(
    simd: S,
    dims: &Conv2dDims,
    images: &[f32],
    count: usize,
    grads_cl: &[f32],
    dw_taps: &mut [f32],
) {
    let (o_count, pixels) = (dims.out_channels, dims.out_pixels());
    let (lanes, block) = (S::LANES, VECTORS * S::LANES);
    debug_assert!(ROWS <= MAX_TILE_ROWS);
    let run = dims.kernel_w * dims.in_channels;
    let row_step = dims.padded_w() * dims.in_channels;
    let image_len = layout::image_len(dims);
    let grad_row = dims.out_w() * o_count;
    let rows_per_block = (GRAD_BLOCK_BYTES / (grad_row * size_of::<f32>())).max(1);
    for (image, grads) in images
        .chunks_exact(image_len)
        .zip(grads_cl.chunks_exact(pixels * o_count))
        .take(count)
    {
        for first_row in (0..dims.out_h()).step_by(rows_per_block) {
            let last_row = (first_row + rows_per_block).min(dims.out_h());
            let grads = &grads[first_row * grad_row..last_row * grad_row];
            let image = &image[first_row * dims.stride_h * row_step..];
            // Tiles of ROWS consecutive values of one kernel row (channels-last order (kw, c));
            // a row's last tile starts early enough to end with it, and adds only its new
            // values.
            for kh in 0..dims.kernel_h {
                for step in (0..run).step_by(ROWS) {
                    let start = step.min(run - ROWS);
                    let offset = kh * row_step + start;
                    for ob in (0..o_count).step_by(block) {
                        let acc =
                            block_sums::<S, ROWS, VECTORS>(simd, dims, &image[offset..], grads, ob);
                        for (r, acc) in acc.iter().enumerate().skip(step - start) {
                            let tap = kh * run + start + r;
                            let sums = &mut dw_taps[tap * o_count + ob..][..block];
                            for (sums, &acc) in sums.chunks_exact_mut(lanes).zip(acc) {
                                simd.store(simd.add(simd.load(sums), acc), sums);
                            }
                        }
                    }
                }
            }
        }
    }
}

dispatched! {
    /// Adds the unfolded input gradient of one image, `dcols_cl [OH*OW, KH*KW*C]` (columns in
    /// channels-last order (kh, kw, c)), onto its padded channels-last image `dx_cl`
    /// (`layout::image_len` values): col2im, a kernel row of KW*C consecutive values at a time.
    /// (Folding NCHW columns moved rows of OW values, 16% of a conv 32->64 training step.)
    fn fold_input_grad(dims: &Conv2dDims, dcols_cl: &[f32], dx_cl: &mut [f32]) => fold_body;
}

#[inline(always)]
fn fold_body<S: Simd, const LANES: usize>(
    simd: S,
    dims: &Conv2dDims,
    dcols_cl: &[f32],
    dx_cl: &mut [f32],
) {
    let (lanes, patch) = (S::LANES, dims.patch_len());
    let run = dims.kernel_w * dims.in_channels;
    let row_step = dims.padded_w() * dims.in_channels;
    let whole = run / lanes * lanes;
    let rows = dcols_cl.chunks_exact(dims.out_w() * patch);
    for (oh, row) in rows.take(dims.out_h()).enumerate() {
        for (ow, pixel) in row.chunks_exact(patch).enumerate() {
            let corner =
                (oh * dims.stride_h * dims.padded_w() + ow * dims.stride_w) * dims.in_channels;
            for (kh, grads) in pixel.chunks_exact(run).enumerate() {
                let target = &mut dx_cl[corner + kh * row_step..][..run];
                let (vectors, rest) = target.split_at_mut(whole);
                for (t, g) in vectors
                    .chunks_exact_mut(lanes)
                    .zip(grads.chunks_exact(lanes))
                {
                    simd.store(simd.add(simd.load(t), simd.load(g)), t);
                }
                for (t, &g) in rest.iter_mut().zip(&grads[whole..]) {
                    *t += g;
                }
            }
        }
    }
}

dispatched! {
    /// `before` and 2x2 max pooling (stride 2) of `out_cl [OH*OW, O]` into `y` and `argmax`
    /// `[O, PH*PW]`, a vector of channels at a time: the comparisons of `max_pool_image` in
    /// the same order, so the same bits, without transposing first. Without `argmax`,
    /// computes none.
    fn max_pool_2x2(
        dims: &Conv2dDims,
        before: BeforePool,
        out_cl: &[f32],
        y: &mut [f32],
        argmax: Option<&mut [u32]>,
    ) => max_pool_2x2_body;
}

#[inline(always)]
fn max_pool_2x2_body<S: Simd, const LANES: usize>(
    _simd: S,
    dims: &Conv2dDims,
    before: BeforePool,
    out_cl: &[f32],
    y: &mut [f32],
    argmax: Option<&mut [u32]>,
) {
    // The activation as a constant, as in the direct convolution's pooling.
    use max_pool_2x2_windows as windows;
    match (argmax, before) {
        (Some(a), BeforePool::Relu) => windows::<LANES, true, true>(dims, out_cl, y, a),
        (Some(a), BeforePool::Nothing) => windows::<LANES, true, false>(dims, out_cl, y, a),
        (None, BeforePool::Relu) => windows::<LANES, false, true>(dims, out_cl, y, &mut []),
        (None, BeforePool::Nothing) => windows::<LANES, false, false>(dims, out_cl, y, &mut []),
    }
}

/// [`max_pool_2x2`], with the argmax when ARGMAX (without it, evaluation's pooling ran the
/// comparisons that pick it and stored it to scratch).
#[inline(always)]
fn max_pool_2x2_windows<const LANES: usize, const ARGMAX: bool, const RELU: bool>(
    dims: &Conv2dDims,
    out_cl: &[f32],
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let before = BeforePool::relu_if(RELU);
    let (o_count, out_w) = (dims.out_channels, dims.out_w());
    let (pooled_h, pooled_w) = (dims.out_h() / 2, out_w / 2);
    let windows = pooled_h * pooled_w;
    let activate = |v: f32| before.apply(v);
    for window_h in 0..pooled_h {
        for window_w in 0..pooled_w {
            let w = window_h * pooled_w + window_w;
            let corner = 2 * window_h * out_w + 2 * window_w;
            let pixel = |p: usize| &out_cl[p * o_count..(p + 1) * o_count];
            let (top, below) = (corner, corner + out_w);
            let others = [
                (top + 1, 1),
                (below, out_w as u32),
                (below + 1, out_w as u32 + 1),
            ];
            for first in (0..o_count).step_by(LANES) {
                let mut best = [0.0f32; LANES];
                let mut at = [0u32; LANES];
                for (b, &v) in best.iter_mut().zip(&pixel(top)[first..first + LANES]) {
                    *b = activate(v);
                }
                for &(p, offset) in &others {
                    let values = &pixel(p)[first..first + LANES];
                    for ((b, a), &v) in best.iter_mut().zip(at.iter_mut()).zip(values) {
                        // In scan order, as every pooling loop (see `replaces_max`).
                        let v = activate(v);
                        let wins = replaces_max(v, *b);
                        *b = if wins { v } else { *b };
                        if ARGMAX {
                            *a = if wins { offset } else { *a };
                        }
                    }
                }
                for (l, (&b, &a)) in best.iter().zip(&at).enumerate() {
                    let o = first + l;
                    y[o * windows + w] = b;
                    if ARGMAX {
                        argmax[o * windows + w] = if before.blocks(b) {
                            super::NO_GRADIENT
                        } else {
                            corner as u32 + a
                        };
                    }
                }
            }
        }
    }
}
