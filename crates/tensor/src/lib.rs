//! The numeric core: f32 NCHW arrays on `ndarray`, GEMM on `matrixmultiply`, im2col
//! convolution, pooling and the elementwise kernels the layers need.
//!
//! Every kernel takes ndarray views (any strides unless it says otherwise) and writes into a
//! caller-provided output, so a layer can reuse its buffers from batch to batch. Gradients of
//! parameters accumulate (`+=`); gradients of inputs are overwritten. Results are bit-identical
//! whatever the number of threads: parallel work is partitioned by shape alone and partial sums
//! are added in a fixed order.
//!
//! Architecture invariant: `tensor` knows nothing about layers, losses or datasets.
//!
//! Dimension letters used throughout: N (batch), C (channels), H, W (height, width),
//! O (output channels), KH, KW (kernel), OH, OW (output height, width).

mod activation;
mod adam;
mod batch_norm;
mod bias;
mod conv;
mod error;
mod gemm;
mod peak;
mod pool;
mod simd;
mod softmax;
mod vector;

pub use activation::{
    leaky_relu, leaky_relu_backward, relu, relu_backward, relu_backward_from_signs,
    relu_keeping_signs, sigmoid, sigmoid_backward, sign_words, tanh, tanh_backward,
};
pub use adam::{AdamStep, adam_update};
pub use batch_norm::{
    ChannelNormalization, batch_norm_backward, batch_norm_forward,
    batch_norm_relu_max_pool_backward, batch_norm_relu_max_pool_forward, channel_mean_var,
    scale_channels,
};
pub use bias::{add_channel_bias, add_row_bias, channel_bias_grad, row_bias_grad};
pub use conv::{
    Backward, BeforePool, Conv2dBuffers, Conv2dDims, Conv2dGrads, ConvAlgorithm, NO_GRADIENT,
    Padding, col2im, conv2d_backward, conv2d_forward, conv2d_max_pool_backward,
    conv2d_max_pool_forward, im2col,
};
pub use error::TensorError;
pub use gemm::{gemm, gemm_parallel};
pub use peak::fma_peak_flops;
pub use pool::{
    Pool2dDims, avg_pool2d_backward, avg_pool2d_forward, global_avg_pool_backward,
    global_avg_pool_forward, max_pool2d_backward, max_pool2d_forward,
};
pub use simd::{ISA_CAP_VARIABLE, instruction_set};
pub use softmax::{log_softmax, log_softmax_backward, softmax, softmax_backward};
