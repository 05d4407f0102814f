//! The layers, one per file, each with its forward and backward pass side by side.
//!
//! Every layer with hyper-parameters is built one way: its config struct's `init` (and
//! `with_weights` for stored weights), which refuses impossible settings with
//! [`NnError::Config`](crate::NnError::Config). Layers without any are built by `new(kind)`
//! ([`Activation`]) or `default()` ([`Flatten`], [`Softmax`]).

mod activation;
mod batchnorm;
mod conv2d;
mod dense;
mod dropout;
mod flatten;
mod pool2d;
mod softmax;
mod weights;

pub use activation::{Activation, ActivationKind};
pub use batchnorm::{BatchNorm, BatchNormConfig};
pub use conv2d::{Conv2d, Conv2dConfig};
pub use dense::{Dense, DenseConfig};
pub use dropout::{Dropout, DropoutConfig};
pub use flatten::Flatten;
pub use pool2d::{Pool2d, Pool2dConfig, PoolKind};
pub use softmax::Softmax;

use ndarray::{ArrayD, Dimension};

use crate::error::NnError;

/// `x` as a fixed-dimension array, or a shape error naming the layer.
pub(crate) fn expect_dim<D: Dimension>(
    x: ArrayD<f32>,
    kind: &'static str,
    expected: &str,
) -> Result<ndarray::Array<f32, D>, NnError> {
    let shape = x.shape().to_vec();
    x.into_dimensionality::<D>().map_err(|_| NnError::Input {
        kind,
        detail: format!("expected a {expected} input, got shape {shape:?}"),
    })
}
