//! The numeric core: f32 NCHW arrays on `ndarray`, GEMM on `matrixmultiply`, im2col
//! convolution, pooling and the elementwise kernels the layers need.
//!
//! Architecture invariant: `tensor` knows nothing about layers, losses or datasets.
