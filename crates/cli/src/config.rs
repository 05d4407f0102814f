//! The full configuration of a training run, saved as `config.json`: enough to run it again.

use std::path::PathBuf;

use nn::{ModelSpec, Rule, Schedule};
use serde::{Deserialize, Serialize};

/// Keras' ReduceLROnPlateau settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceLrConfig {
    /// Epochs without improvement of the monitored loss before reducing.
    pub patience: usize,
    /// Factor per reduction.
    pub factor: f32,
    /// Floor of the learning rate.
    pub min_lr: f32,
    /// An epoch improves only if its loss is below the best by more than this (Keras' 1e-4).
    #[serde(default = "keras_reduce_lr_min_delta")]
    pub min_delta: f32,
}

fn keras_reduce_lr_min_delta() -> f32 {
    1e-4
}

/// Random transforms of the training images (see `mnist_data::Augmentation`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Rotation range in degrees.
    pub degrees: f32,
    /// Zoom range (scale in [1 - zoom, 1 + zoom]).
    pub zoom: f32,
    /// Shift range in pixels.
    pub shift: f32,
    /// Elastic distortion `(alpha, sigma)` in pixels, if any.
    #[serde(default)]
    pub elastic: Option<(f32, f32)>,
}

/// Everything that determines a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The architecture (a preset's or a file's spec, resolved).
    pub model: ModelSpec,
    /// Where the dataset was read (absolute, so a resume works from any directory).
    pub data_dir: PathBuf,
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Update rule.
    pub optimizer: Rule,
    /// Base learning rate.
    pub learning_rate: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Label smoothing of the cross-entropy targets.
    pub label_smoothing: f32,
    /// Share of the training set held out for validation (the last examples, as Keras).
    pub val_split: f64,
    /// Seed of initialization, dropout and batch order.
    pub seed: u64,
    /// Worker threads (results are identical for any count).
    pub threads: usize,
    /// Early-stopping patience in epochs, if enabled.
    pub early_stopping: Option<usize>,
    /// Early stopping's smallest improvement (Keras' `min_delta`, default 0).
    #[serde(default)]
    pub early_stopping_min_delta: f32,
    /// Reduce-on-plateau settings, if enabled.
    pub reduce_lr: Option<ReduceLrConfig>,
    /// Data augmentation, if enabled.
    pub augment: Option<AugmentConfig>,
    /// Where TensorBoard event files go, if anywhere.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// The model file whose weights and normalization the run started from, if any.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Leading layers kept fixed (Keras' `trainable = False`).
    #[serde(default)]
    pub freeze: usize,
}
