//! The trainer behind the `mnist` command, as a library: fit a model with validation and
//! callbacks, keep a run directory, evaluate a model. The binary only parses arguments and
//! draws progress.
//!
//! Architecture invariant: this crate joins `mnist-data` and `nn`; neither knows the other.

mod bench;
mod config;
mod error;
mod evaluate;
mod fit;
mod history;
mod plots;
mod run_dir;
mod tensorboard;

pub use bench::{
    BenchCase, BenchResult, ProfileRow, bench, bench_cases, peak_rss_mb, profile_table,
};
pub use config::{AugmentConfig, ReduceLrConfig, TrainConfig};
// Images of digits in MNIST's form live in `mnist-data`, shared with the server.
pub use error::TrainError;
pub use evaluate::{ClassMetrics, Evaluation, evaluate};
pub use fit::{
    EarlyStopping, EpochRecord, FitData, FitOptions, FitOutcome, FitState, Observer, Resume, fit,
    snapshot,
};
pub use history::history_csv;
pub use mnist_data::{
    MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, decode_digit, load_digit, to_mnist_form,
};
pub use plots::{confusion_heatmap, history_plots, mistakes_grid};
pub use run_dir::{RunDir, safe_file_name, utc_timestamp};
pub use tensorboard::{TensorBoard, crc32c, masked_crc32c};
