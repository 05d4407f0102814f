//! The trainer's errors.

use std::path::PathBuf;

/// What can stop a training run or an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset could not be loaded or batched.
    #[error(transparent)]
    Data(#[from] mnist_data::DataError),
    /// The model, loss or optimizer refused.
    #[error(transparent)]
    Nn(#[from] nn::NnError),
    /// A file of the run directory could not be written.
    // The cause is in the message, and so not also a `source`: printed with its chain, it
    // would appear twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        error: std::io::Error,
    },
    /// A run directory that cannot be used.
    #[error("{}: {problem}", path.display())]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why not.
        problem: String,
    },
    /// A figure could not be drawn.
    #[error("{}: {problem}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// Settings that cannot work together or with the data (an impossible argument).
    #[error("{0}")]
    Settings(String),
    /// A run that stopped part-way; `note` says what it left behind.
    // As `Io`: the cause is in the message, not also a `source`.
    #[error("{note}: {error}")]
    Stopped {
        /// Why it stopped.
        error: Box<TrainError>,
        /// What is left of it (the last good model, or that none was saved).
        note: String,
    },
    /// The loss stopped being a finite number.
    #[error(
        "the loss became {value} at epoch {epoch}, batch {batch} (learning rate {learning_rate}): \
         training diverged; try a lower learning rate (--lr)"
    )]
    NonFinite {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
        /// The loss value (NaN or infinite).
        value: f32,
        /// The rate in use.
        learning_rate: f32,
    },
}
