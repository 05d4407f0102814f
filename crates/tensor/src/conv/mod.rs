//! 2-D convolution over NCHW f32, forward and backward, by one of three algorithms.
//!
//! Shapes: input `x [N, C, H, W]`, weight `[O, C, KH, KW]`, bias `[O]`, output `y [N, O, OH, OW]`;
//! the backward pass gives `dW`, `db` (accumulated) and `dx` (overwritten).
//!
//! Where things are:
//! - `dims.rs`: [`Conv2dDims`], every size and the output-size arithmetic.
//! - `algorithm.rs`: [`ConvAlgorithm`], which algorithm computes a shape.
//! - `buffers.rs`: [`Conv2dBuffers`], one buffer type per algorithm; the chunking of the batch.
//! - `im2col.rs`: im2col + GEMM, forward beside backward (the backward pass the implicit GEMM
//!   shares); `unfold.rs`: [`im2col`] and [`col2im`] themselves.
//! - `direct/`: the direct convolution for short receptive fields (drivers in `mod.rs`, kernels
//!   in `forward.rs` and `backward.rs`).
//! - `implicit.rs`: the implicit GEMM over channels-last images, forward and its products of
//!   the backward pass.
//! - `scatter.rs`: the backward pass over only the nonzeros of a sparse output gradient.
//! - `transposed.rs`: the input gradient of a dense output gradient as a convolution of it.
//! - `fused.rs`: convolution + ReLU + max pooling in one pass, and its backward pass.
//! - `chunks.rs`: what a chunk of the batch writes (forward) and reads (backward).
//! - `layout.rs`: channels-last copies of images and weights.
//!
//! Parallel over the batch: every algorithm splits it into chunks of [`images_per_chunk`]
//! images (a function of N only). The weight and bias gradients sum over each chunk's images,
//! then the chunks' partial sums are added in chunk order, so the bits are the same whatever
//! the number of threads.

use ndarray::{
    ArrayView1, ArrayView2, ArrayView4, ArrayViewMut1, ArrayViewMut2, ArrayViewMut4, Axis,
};

mod algorithm;
mod buffers;
mod chunks;
mod dims;
mod direct;
mod fused;
mod im2col;
mod implicit;
mod layout;
mod scatter;
mod transposed;
mod unfold;

pub use algorithm::ConvAlgorithm;
pub use buffers::{Conv2dBuffers, images_per_chunk};
pub use dims::{Conv2dDims, Padding};
pub use fused::{BeforePool, NO_GRADIENT, conv2d_max_pool_backward, conv2d_max_pool_forward};
pub(crate) use fused::{check_argmax, unpool_plane};
pub use unfold::{col2im, im2col};

use crate::error::{TensorError, expect_shape};
use crate::pool::Pool2dDims;
use buffers::{AlgorithmBuffers, resize};
use chunks::{ChunkGrad, ChunkOutput};

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

/// Whether a backward pass will follow a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backward {
    /// Training: keep what [`conv2d_backward`] needs (the input, padded, unfolded or channels
    /// last, depending on the algorithm).
    Needed,
    /// Inference: keep nothing; one image at a time goes through a small buffer.
    NotNeeded,
}

/// `y = conv(x, weight) + bias`; with [`Backward::Needed`], keeps in `buffers` what the
/// backward pass needs.
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

/// The forward pass of [`conv2d_forward`] and [`conv2d_max_pool_forward`], writing into
/// one `outputs` entry per chunk of the batch, by the algorithm `buffers` choose.
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
    let keep = backward == Backward::Needed;
    expect_shape(op, "input", x.shape(), &dims.input_shape())?;
    let weight = weight_matrix(op, dims, weight)?;
    if let Some(bias) = &bias {
        expect_shape(op, "bias", bias.shape(), &[dims.out_channels])?;
    }
    let algorithm = buffers.algorithm_for(dims);
    algorithm
        .supports(dims)
        .map_err(|detail| TensorError::Config { op, detail })?;
    buffers.dims = keep.then_some(*dims);
    let pass = ForwardPass {
        dims,
        x,
        weight,
        bias,
        keep,
    };
    buffers.algorithm = match algorithm {
        ConvAlgorithm::Direct => {
            let mut own = buffers.algorithm.take_direct();
            direct::forward(&pass, &mut own, outputs);
            AlgorithmBuffers::Direct(own)
        }
        ConvAlgorithm::ImplicitGemm => {
            let mut own = buffers.algorithm.take_implicit();
            implicit::forward(&pass, &mut own, outputs);
            AlgorithmBuffers::Implicit(own)
        }
        ConvAlgorithm::Im2colGemm => {
            let mut own = buffers.algorithm.take_im2col();
            im2col::forward(&pass, &mut own, outputs);
            AlgorithmBuffers::Im2col(own)
        }
    };
    Ok(())
}

/// The checked operands of one forward pass, as every algorithm's driver takes them.
#[derive(Clone, Copy)]
struct ForwardPass<'a, 'd> {
    dims: &'d Conv2dDims,
    /// `[N, C, H, W]`.
    x: ArrayView4<'a, f32>,
    /// `[O, C*KH*KW]`.
    weight: ArrayView2<'a, f32>,
    /// `[O]`.
    bias: Option<ArrayView1<'a, f32>>,
    /// Whether to keep what a backward pass needs.
    keep: bool,
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

/// The backward pass of [`conv2d_backward`] and [`conv2d_max_pool_backward`], given one
/// output gradient per chunk of the batch, by the algorithm whose forward pass filled
/// `buffers`.
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
        input: mut dx,
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
    let dx_chunks: Vec<Option<ArrayViewMut4<'_, f32>>> = match dx.as_mut() {
        Some(dx) => dx
            .axis_chunks_iter_mut(Axis(0), per_chunk)
            .map(Some)
            .collect(),
        None => (0..chunks).map(|_| None).collect(),
    };
    let partials = Partials {
        dw: &mut buffers.partial_dw,
        db: &mut buffers.partial_db,
    };
    match &mut buffers.algorithm {
        AlgorithmBuffers::Direct(own) => {
            direct::backward(dims, weight, chunk_grads, own, partials, dx_chunks);
        }
        AlgorithmBuffers::Im2col(own) => {
            im2col::backward(dims, weight, chunk_grads, own, partials, dx_chunks);
        }
        AlgorithmBuffers::Implicit(own) => {
            implicit::backward(dims, weight, chunk_grads, own, partials, dx_chunks);
        }
        AlgorithmBuffers::Empty => {
            return Err(TensorError::Shape {
                op,
                detail: "the buffers hold no forward pass".into(),
            });
        }
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

/// Each chunk's weight- and bias-gradient sums, which every algorithm's backward pass writes
/// (overwrites) and [`backward`] adds up in chunk order.
struct Partials<'a> {
    /// `[chunks, O, C*KH*KW]`.
    dw: &'a mut ndarray::Array3<f32>,
    /// `[chunks, O]`.
    db: &'a mut ndarray::Array2<f32>,
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

/// The elements of a view in standard layout, which the caller checked or made, for as long
/// as the view's data lives.
fn into_contiguous<'a, T, D: ndarray::Dimension>(a: ndarray::ArrayView<'a, T, D>) -> &'a [T] {
    a.to_slice()
        .unwrap_or_else(|| unreachable!("standard layout was checked or made"))
}

/// [`into_contiguous`] for a mutable view.
fn into_contiguous_mut<'a, T, D: ndarray::Dimension>(
    a: ndarray::ArrayViewMut<'a, T, D>,
) -> &'a mut [T] {
    a.into_slice()
        .unwrap_or_else(|| unreachable!("standard layout was checked or made"))
}

/// `values` (`rows * columns` of them, which the caller sized) as a `[rows, columns]` matrix.
fn as_matrix(values: &[f32], rows: usize, columns: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, columns), &values[..rows * columns])
        .unwrap_or_else(|_| unreachable!("sliced to rows * columns values"))
}

/// [`as_matrix`] for mutable values.
fn as_matrix_mut(values: &mut [f32], rows: usize, columns: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, columns), &mut values[..rows * columns])
        .unwrap_or_else(|_| unreachable!("sliced to rows * columns values"))
}
