//! The fast kernels against slow, obviously correct references, on random shapes and layouts.

// Everything in this crate is test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

mod adam;
mod batch_norm;
mod conv;
mod determinism;
mod elementwise;
mod fused;
mod gemm;
mod pool;
mod reference;
