//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong building, running, training, saving or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A kernel refused its operands.
    #[error(transparent)]
    Tensor(#[from] tensor::TensorError),
    /// A layer of a model received an input of the wrong shape.
    #[error("layer {layer} ({kind}): {detail}")]
    Shape {
        /// Position in the model, as PyTorch's `Sequential` numbers it.
        layer: usize,
        /// The layer type, e.g. "Conv2d".
        kind: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A layer received an input (or holds a parameter) of the wrong shape; a model reports
    /// it as [`NnError::Shape`], with the layer's position.
    #[error("{kind}: {detail}")]
    Input {
        /// The layer type, e.g. "Conv2d".
        kind: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// An architecture spec that cannot be built.
    #[error("invalid model spec: {0}")]
    Spec(String),
    /// `backward` was called without the `forward` whose cache it needs.
    #[error("{0}: backward called without a preceding forward in training mode")]
    NoForwardCache(&'static str),
    /// An optimizer step found a parameter whose gradient was never computed.
    #[error("parameter {0} has no gradient: run backward before the optimizer step")]
    MissingGradient(String),
    /// A loss or target is unusable.
    #[error("loss: {0}")]
    Loss(String),
    /// An impossible hyper-parameter, such as a negative learning rate.
    #[error("invalid {what}: {detail}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// Why it is impossible.
        detail: String,
    },
    /// A model file that cannot be read, written, or matched to the model.
    #[error("{}: {problem}", path.display())]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}
