//! The crate's one error type.

use std::path::PathBuf;

/// Why a model cannot be exported or written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model's spec or shapes were refused.
    #[error(transparent)]
    Model(#[from] nn::NnError),
    /// A convolution's sizes were refused.
    #[error(transparent)]
    Tensor(#[from] tensor::TensorError),
    /// The model file has no input normalization: the graph would not compute what the model
    /// computes on pixels, so it is refused rather than written without one.
    #[error(
        "the model has no input normalization, which the graph applies first; save the model \
         with one (train writes it)"
    )]
    NoNormalization,
    /// The file could not be written.
    #[error("{}: cannot write: {error}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}
