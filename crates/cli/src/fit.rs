//! The training loop: seeded epochs of mini-batches, validation after each epoch, the callbacks
//! Keras users expect (early stopping with best-weight restore, reduce-LR-on-plateau, a
//! learning-rate schedule), and a stop with a clear error when the loss stops being finite.

use std::time::Instant;

use mnist_data::{Augmentation, BatchOrder, Batches, LabeledImages, Normalization};
use ndarray::ArrayD;
use nn::{
    Mode, Optimizer, ReduceOnPlateau, Schedule, Sequential, Targets, correct, softmax_cross_entropy,
};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::evaluate::evaluate;

/// The examples a run trains and validates on.
#[derive(Clone, Copy, Debug)]
pub struct FitData<'a> {
    /// Training examples.
    pub train: &'a LabeledImages,
    /// Validation examples; `None` to monitor the training loss instead.
    pub validation: Option<&'a LabeledImages>,
    /// Byte-to-input normalization (fit on the training split).
    pub normalization: Normalization,
}

/// How to train.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Seed of the batch order (each epoch its own permutation).
    pub seed: u64,
    /// Label smoothing of the cross-entropy targets.
    pub label_smoothing: f32,
    /// Base learning rate.
    pub learning_rate: f32,
    /// Learning rate over the run.
    pub schedule: Schedule,
    /// Stop after this many epochs without improvement, restoring the best weights.
    pub early_stopping: Option<usize>,
    /// Reduce the base learning rate when the monitored loss plateaus.
    pub reduce_lr: Option<ReduceOnPlateau>,
    /// Random transforms of the training images, drawn anew each epoch.
    pub augmentation: Option<Augmentation>,
}

/// What one epoch did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (weighted by batch size).
    pub train_loss: f32,
    /// Training accuracy over the epoch (while the weights were changing).
    pub train_accuracy: f32,
    /// Validation loss after the epoch.
    pub val_loss: Option<f32>,
    /// Validation accuracy after the epoch.
    pub val_accuracy: Option<f32>,
    /// Learning rate at the epoch's last batch.
    pub learning_rate: f32,
    /// Wall-clock seconds of the epoch's training (validation excluded).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

impl EpochRecord {
    /// The quantity the callbacks monitor: validation loss, or training loss without one.
    pub fn monitored_loss(&self) -> f32 {
        self.val_loss.unwrap_or(self.train_loss)
    }
}

/// Everything the loop carries from one epoch to the next, saved in each checkpoint so an
/// interrupted run can continue exactly where its last finished epoch left it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitState {
    /// Epochs finished.
    pub epochs_done: usize,
    /// The base learning rate after any plateau reductions.
    pub base_lr: f32,
    /// One record per finished epoch.
    pub history: Vec<EpochRecord>,
    /// The lowest monitored loss so far and its 1-based epoch.
    pub best: Option<(f32, usize)>,
    /// Reduce-on-plateau's counters.
    pub reduce_lr: Option<ReduceOnPlateau>,
}

/// Where to continue an interrupted run.
#[derive(Clone, Debug)]
pub struct Resume {
    /// The loop state of the last checkpoint.
    pub state: FitState,
    /// The weights of the best epoch so far, when early stopping will need them.
    pub best_weights: Option<Vec<ArrayD<f32>>>,
}

/// Hooks for progress display and persistence; every method has a no-op default.
pub trait Observer {
    /// An epoch over `images` training images begins (`epoch` is 1-based).
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _images: usize) {}

    /// A batch finished, `seen` images into the epoch; the running means cover them.
    fn batch_finished(&mut self, _seen: usize, _running_loss: f32, _running_accuracy: f32) {}

    /// An epoch finished; `improved` says whether the monitored loss is the best so far, and
    /// `state` is what a checkpoint must hold to continue from here.
    fn epoch_finished(
        &mut self,
        _record: &EpochRecord,
        _model: &Sequential,
        _optimizer: &Optimizer,
        _state: &FitState,
        _improved: bool,
    ) -> Result<(), TrainError> {
        Ok(())
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct FitOutcome {
    /// One record per epoch run.
    pub history: Vec<EpochRecord>,
    /// 1-based epoch with the lowest monitored loss.
    pub best_epoch: usize,
    /// Whether early stopping ended the run before its last epoch.
    pub stopped_early: bool,
}

/// Trains `model` with `optimizer` on `data`, reporting to `observer`; with `resume`, continues
/// a run whose model and optimizer were restored from its last checkpoint.
pub fn fit(
    model: &mut Sequential,
    optimizer: &mut Optimizer,
    data: &FitData<'_>,
    options: &FitOptions,
    observer: &mut dyn Observer,
    resume: Option<Resume>,
) -> Result<FitOutcome, TrainError> {
    let steps_per_epoch = data.train.len().div_ceil(options.batch_size.max(1));
    let total_steps = steps_per_epoch * options.epochs;
    // The loop's whole state lives here, updated in place and lent to each checkpoint.
    let (mut state, mut best_weights) = match resume {
        Some(r) => (r.state, r.best_weights),
        None => (
            FitState {
                epochs_done: 0,
                base_lr: options.learning_rate,
                history: Vec::new(),
                best: None,
                reduce_lr: options.reduce_lr.clone(),
            },
            None,
        ),
    };
    let mut stopped_early = false;

    for epoch in state.epochs_done..options.epochs {
        observer.epoch_started(epoch + 1, options.epochs, data.train.len());
        // Dropout's random stream depends on the seed and the epoch only: replayable.
        model.reseed(options.seed, epoch as u64);
        let order = BatchOrder::Shuffled {
            seed: options.seed,
            epoch: epoch as u64,
        };
        let mut batches = Batches::new(data.train, options.batch_size, order, &data.normalization)?;
        if let Some(augmentation) = options.augmentation {
            batches = batches.augmented(augmentation, options.seed, epoch as u64);
        }
        let start = Instant::now();
        let (mut loss_sum, mut right, mut seen) = (0.0f64, 0usize, 0usize);
        for (index, batch) in batches.enumerate() {
            let step = epoch * steps_per_epoch + index;
            let lr =
                options
                    .schedule
                    .learning_rate(state.base_lr, step, steps_per_epoch, total_steps);
            optimizer.set_learning_rate(lr)?;
            model.zero_grad();
            let n = batch.len();
            let logits = model.forward(batch.images, Mode::Train)?;
            let out = softmax_cross_entropy(
                logits.view(),
                Targets::Classes(batch.labels.view()),
                options.label_smoothing,
            )?;
            if !out.loss.is_finite() {
                return Err(TrainError::NonFinite {
                    epoch: epoch + 1,
                    batch: index + 1,
                    value: out.loss,
                    learning_rate: lr,
                });
            }
            right += correct(logits.view(), batch.labels.view());
            loss_sum += f64::from(out.loss) * n as f64;
            seen += n;
            model.backward(out.grad)?;
            optimizer.step(model)?;
            observer.batch_finished(
                seen,
                (loss_sum / seen as f64) as f32,
                right as f32 / seen as f32,
            );
        }
        let seconds = start.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = match data.validation {
            Some(v) if !v.is_empty() => {
                let validation = evaluate(model, v, &data.normalization)?;
                (Some(validation.loss), Some(validation.accuracy))
            }
            _ => (None, None),
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: (loss_sum / seen.max(1) as f64) as f32,
            train_accuracy: right as f32 / seen.max(1) as f32,
            val_loss,
            val_accuracy,
            learning_rate: optimizer.learning_rate(),
            seconds,
            images_per_second: seen as f64 / seconds.max(1e-9),
        };
        let monitored = record.monitored_loss();
        let improved = state.best.is_none_or(|(loss, _)| monitored < loss);
        if improved {
            state.best = Some((monitored, epoch + 1));
            if options.early_stopping.is_some() {
                best_weights = Some(snapshot(model));
            }
        }
        if let Some(reduce) = state.reduce_lr.as_mut()
            && let Some(reduced) = reduce.observe(monitored, state.base_lr)
        {
            state.base_lr = reduced;
        }
        state.history.push(record);
        state.epochs_done = epoch + 1;
        if let Some(record) = state.history.last() {
            observer.epoch_finished(record, model, optimizer, &state, improved)?;
        }

        let best_epoch = state.best.map_or(0, |(_, e)| e);
        if let Some(patience) = options.early_stopping
            && epoch + 1 - best_epoch > patience
            && epoch + 1 < options.epochs
        {
            stopped_early = true;
            break;
        }
    }
    if let (Some(_), Some(weights)) = (options.early_stopping, best_weights) {
        restore(model, weights)?;
    }
    Ok(FitOutcome {
        best_epoch: state.best.map_or(0, |(_, e)| e),
        history: state.history,
        stopped_early,
    })
}

/// Copies of every parameter and buffer, in visiting order.
pub fn snapshot(model: &Sequential) -> Vec<ArrayD<f32>> {
    let mut weights = Vec::new();
    model.visit_params(|_, p| weights.push(p.value.clone()));
    model.visit_buffers(|_, b| weights.push(b.clone()));
    weights
}

/// Puts a [`snapshot`] back.
fn restore(model: &mut Sequential, weights: Vec<ArrayD<f32>>) -> Result<(), TrainError> {
    let mut weights = weights.into_iter();
    model.visit_params_mut(|_, p| {
        if let Some(w) = weights.next() {
            p.value = w;
        }
        Ok(())
    })?;
    model.visit_buffers_mut(|_, b| {
        if let Some(w) = weights.next() {
            *b = w;
        }
        Ok(())
    })?;
    Ok(())
}
