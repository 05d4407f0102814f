//! What every layer provides: forward and backward passes, its output shape, its parameters and
//! state, and the spec that rebuilds it.

use ndarray::ArrayD;
use rand_chacha::ChaCha8Rng;

use crate::error::NnError;
use crate::param::Param;
use crate::spec::LayerSpec;

/// Training or evaluation: decides Dropout's masking and BatchNorm's statistics, and whether a
/// layer keeps what its backward pass needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics, dropout on, backward caches kept.
    Train,
    /// Running statistics, dropout off, no caches.
    Eval,
}

/// A max pooling window `[KH, KW]` and its stride `[vertical, horizontal]`.
pub type PoolWindow = ([usize; 2], [usize; 2]);

/// Layers that follow a layer and that it may compute as part of its own passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// None: the layer runs alone.
    Alone,
    /// The ReLU after it.
    Relu,
    /// The ReLU and the max pooling (window and stride) after it.
    ReluMaxPool(PoolWindow),
    /// The max pooling (window and stride) right after it.
    MaxPool(PoolWindow),
}

/// One layer with hand-written forward and backward passes.
///
/// Shapes include the batch: `[N, C, H, W]` for images, `[N, F]` for features.
pub trait Layer: Send + std::fmt::Debug {
    /// The layer type as specs name it, e.g. "Conv2d" or "Dense".
    fn kind(&self) -> &'static str;

    /// How the layer is computed, when there is a choice (a convolution's algorithm).
    fn algorithm(&self) -> Option<&'static str> {
        None
    }

    /// The output shape for an input of `input` shape, or why the input does not fit.
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String>;

    /// Computes the output; in [`Mode::Train`] keeps what [`Layer::backward`] needs.
    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError>;

    /// Given the gradient of the loss with respect to the output, adds the parameter gradients
    /// to the parameters' `grad` and returns the gradient with respect to the input, when
    /// `input_grad` asks for it (the first layer's is never needed).
    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError>;

    /// Trainable parameters with their names within the layer ("weight", "bias"), in a fixed
    /// order.
    fn params(&self) -> Vec<(&'static str, &Param)> {
        Vec::new()
    }

    /// Trainable parameters, mutable, in the same order as [`Layer::params`].
    fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        Vec::new()
    }

    /// Non-trainable state saved with the model ("running_mean", ...), in a fixed order.
    fn buffers(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        Vec::new()
    }

    /// Non-trainable state, mutable, in the same order as [`Layer::buffers`].
    fn buffers_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        Vec::new()
    }

    /// The spec that builds this layer (without its weights).
    fn spec(&self) -> LayerSpec;

    /// Asks this layer to compute the layers that follow it as part of its own passes, or with
    /// [`Fusion::Alone`] to stop; returns whether it does (a refusal leaves it as it was). Its
    /// forward pass then returns the last fused layer's output, and its backward pass takes
    /// that output's gradient. The results are the same bits; only the time differs.
    fn fuse(&mut self, _following: Fusion) -> bool {
        false
    }

    /// Gives a layer that draws random numbers (Dropout) a fresh generator; the others ignore
    /// it. Reseeding at every epoch from the run's seed makes any epoch replayable.
    fn reseed(&mut self, _rng: ChaCha8Rng) {}
}
