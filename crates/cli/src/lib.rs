//! The trainer behind the `mnist` command, as a library: a whole training run ([`train`]:
//! settings checked, run directory made or resumed, [`fit`] with validation and callbacks, the
//! test set evaluated, the model saved), evaluation and the benchmark. The binary only parses
//! arguments, starts a run and draws progress.
//!
//! Architecture invariant: this crate joins `mnist-data` and `nn`; neither knows the other.

mod bench;
mod config;
mod error;
mod evaluate;
mod fit;
mod history;
mod plots;
mod recipe;
mod run_dir;
mod tensorboard;
mod training;

pub use bench::{
    BenchCase, BenchResult, ProfileRow, bench, bench_cases, peak_rss_mb, profile_table,
};
pub use config::{AugmentConfig, ReduceLrConfig, TrainConfig};
// Images of digits in MNIST's form live in `mnist-data`, shared with the server.
pub use error::TrainError;
pub use evaluate::{ClassMetrics, Evaluation, evaluate, evaluate_ensemble};
pub use fit::{
    EarlyStopping, EpochRecord, FitData, FitOptions, FitOutcome, FitState, Observer, Resume,
    StepOutcome, StepTimes, fit, snapshot, training_step,
};
pub use history::history_csv;
pub use mnist_data::{
    MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, decode_digit, load_digit, to_mnist_form,
};
pub use plots::{confusion_heatmap, history_plots, mistakes_grid};
pub use recipe::{RECIPES, Recipe, recipe};
pub use run_dir::{RunDir, safe_file_name, utc_timestamp};
pub use tensorboard::{TensorBoard, crc32c, masked_crc32c};
pub use training::{
    Progress, RunPlace, Silent, TrainingOutcome, check_settings, fit_options, open_model, train,
};
