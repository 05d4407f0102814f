//! The fit loop's callbacks, through the library: early stopping restores the best epoch.

#![allow(clippy::unwrap_used)]

mod common;

use cli::{EarlyStopping, FitData, FitOptions, Observer, fit};
use mnist_data::{LoadOptions, Normalization, ValidationSplit, load_dir};
use nn::{Optimizer, Rule, Schedule, Sequential, preset};

struct Silent;
impl Observer for Silent {}

#[test]
fn early_stopping_restores_the_weights_of_the_best_epoch() {
    let dir = tempfile::tempdir().unwrap();
    common::synthetic_dataset(dir.path(), 400, 50);
    let data = load_dir(dir.path(), &LoadOptions::default()).unwrap();
    let (train, validation) = data
        .train
        .split(ValidationSplit::Last { fraction: 0.25 })
        .unwrap();
    let normalization = Normalization::fit(&train);
    let fit_data = FitData {
        train: &train,
        validation: Some(&validation),
        normalization,
    };
    // With this seed and rate the model learns, then diverges: early stopping with patience 1
    // must stop after the first epoch that does not improve, and bring back the best.
    let options = FitOptions {
        epochs: 6,
        batch_size: 32,
        seed: 3,
        label_smoothing: 0.0,
        learning_rate: 0.1,
        schedule: Schedule::Constant,
        early_stopping: Some(EarlyStopping {
            patience: 1,
            min_delta: 0.0,
        }),
        reduce_lr: None,
        augmentation: None,
    };
    let mut model = Sequential::new(preset("lenet5").unwrap(), 3).unwrap();
    let mut optimizer = Optimizer::new(Rule::sgd(0.9), options.learning_rate).unwrap();
    let outcome = fit(
        &mut model,
        &mut optimizer,
        &fit_data,
        &options,
        &mut Silent,
        None,
    )
    .unwrap();

    let losses: Vec<f32> = outcome
        .history
        .iter()
        .map(|r| r.val_loss.unwrap())
        .collect();
    let (best_index, best_loss) = losses
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    assert_eq!(outcome.best_epoch, best_index + 1, "{losses:?}");
    // Patience 1: stopped one epoch after the best (Keras' wait >= patience), before the last.
    assert!(outcome.stopped_early, "{losses:?}");
    assert_eq!(outcome.history.len(), outcome.best_epoch + 1, "{losses:?}");
    // The model holds the best epoch's weights: it scores exactly that epoch's validation loss.
    let loss = cli::evaluate(&mut model, &validation, &normalization)
        .unwrap()
        .loss;
    assert_eq!(loss, *best_loss, "{losses:?}");
}
