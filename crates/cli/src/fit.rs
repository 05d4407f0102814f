//! The training loop: seeded epochs of mini-batches, validation after each epoch, the callbacks
//! Keras users expect (early stopping with best-weight restore, reduce-LR-on-plateau, a
//! learning-rate schedule), and a stop with a clear error when the loss stops being finite.

use std::time::{Duration, Instant};

use mnist_data::{Augmentation, Batch, BatchOrder, Batches, LabeledImages, Normalization};
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
    /// Stop when the monitored loss has not improved for a while, restoring the best weights.
    pub early_stopping: Option<EarlyStopping>,
    /// Reduce the base learning rate when the monitored loss plateaus.
    pub reduce_lr: Option<ReduceOnPlateau>,
    /// Random transforms of the training images, drawn anew each epoch.
    pub augmentation: Option<Augmentation>,
}

/// Keras' `EarlyStopping(patience, min_delta, restore_best_weights=True)` on the monitored loss.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Epochs in a row without improvement after which training stops (Keras stops when its
    /// `wait` counter reaches `patience`).
    pub patience: usize,
    /// An epoch improves only if its loss is below the best by more than this.
    pub min_delta: f32,
}

impl EarlyStopping {
    /// Whether `loss` improves on `best` (Keras: `loss < best - min_delta`).
    pub fn improves(&self, loss: f32, best: Option<(f32, usize)>) -> bool {
        improves(loss, best, self.min_delta)
    }

    /// Whether to stop after 1-based `epoch`, the best so far being `best_epoch`: `patience`
    /// epochs in a row have not improved.
    pub fn stops(&self, epoch: usize, best_epoch: usize) -> bool {
        epoch > best_epoch && epoch - best_epoch >= self.patience
    }
}

fn improves(loss: f32, best: Option<(f32, usize)>, min_delta: f32) -> bool {
    best.is_none_or(|(best, _)| loss < best - min_delta)
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

    /// A callback acted (early stopping, a learning-rate reduction); `message` says how, as
    /// Keras prints it with the epoch.
    fn callback_fired(&mut self, _message: &str) {}

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
        let mut times = StepTimes::default();
        for (index, batch) in batches.enumerate() {
            let step = epoch * steps_per_epoch + index;
            let lr =
                options
                    .schedule
                    .learning_rate(state.base_lr, step, steps_per_epoch, total_steps);
            optimizer.set_learning_rate(lr)?;
            let n = batch.len();
            let step = training_step(
                model,
                optimizer,
                batch,
                options.label_smoothing,
                |loss| {
                    if loss.is_finite() {
                        return Ok(());
                    }
                    Err(TrainError::NonFinite {
                        epoch: epoch + 1,
                        batch: index + 1,
                        value: loss,
                        learning_rate: lr,
                    })
                },
                &mut times,
            )?;
            right += step.correct;
            loss_sum += f64::from(step.loss) * n as f64;
            seen += n;
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
        let monitor = if record.val_loss.is_some() {
            "val_loss"
        } else {
            "loss"
        };
        let improved = match options.early_stopping {
            Some(stopping) => stopping.improves(monitored, state.best),
            None => improves(monitored, state.best, 0.0),
        };
        if improved {
            state.best = Some((monitored, epoch + 1));
            if options.early_stopping.is_some() {
                best_weights = Some(snapshot(model));
            }
        }
        let mut fired = Vec::new();
        if let Some(reduce) = state.reduce_lr.as_mut()
            && let Some(reduced) = reduce.observe(monitored, state.base_lr)
        {
            fired.push(format!(
                "epoch {}: ReduceLROnPlateau reducing the learning rate to {reduced:.2e} \
                 ({monitor} {monitored:.4} has not improved for {} epoch(s))",
                epoch + 1,
                reduce.patience
            ));
            state.base_lr = reduced;
        }
        state.history.push(record);
        state.epochs_done = epoch + 1;
        if let Some(record) = state.history.last() {
            observer.epoch_finished(record, model, optimizer, &state, improved)?;
        }

        if let (Some(stopping), Some((best, best_epoch))) = (options.early_stopping, state.best)
            && stopping.stops(epoch + 1, best_epoch)
            && epoch + 1 < options.epochs
        {
            fired.push(format!(
                "epoch {}: early stopping: {monitor} has not improved on {best:.4} (epoch \
                 {best_epoch}) for {} epoch(s); restoring the weights of epoch {best_epoch}",
                epoch + 1,
                epoch + 1 - best_epoch
            ));
            stopped_early = true;
        }
        for message in &fired {
            observer.callback_fired(message);
        }
        if stopped_early {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-based epoch early stopping ends on, and the best epoch, for a history of
    /// monitored losses, deciding as `fit` does.
    fn stopping(losses: &[f32], patience: usize, min_delta: f32) -> (Option<usize>, usize) {
        let stopping = EarlyStopping {
            patience,
            min_delta,
        };
        let mut best = None;
        for (i, &loss) in losses.iter().enumerate() {
            if stopping.improves(loss, best) {
                best = Some((loss, i + 1));
            }
            let best_epoch = best.map_or(0, |(_, e)| e);
            if stopping.stops(i + 1, best_epoch) {
                return (Some(i + 1), best_epoch);
            }
        }
        (None, best.map_or(0, |(_, e)| e))
    }

    /// Hand-worked against Keras 3's EarlyStopping.on_epoch_end: `wait` counts epochs since the
    /// last improvement (`loss < best - min_delta`), and training stops once `wait >= patience`.
    #[test]
    fn early_stopping_counts_patience_as_keras() {
        let losses = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8];
        // Best at epoch 2; epochs 3 and 4 are flat: patience 2 stops after epoch 4 (it went on
        // to epoch 5 before this change).
        assert_eq!(stopping(&losses, 2, 0.0), (Some(4), 2));
        assert_eq!(stopping(&losses, 3, 0.0), (Some(5), 2));
        // Patience 0 stops at the first flat epoch.
        assert_eq!(stopping(&losses, 0, 0.0), (Some(3), 2));
        // Patience 4 never runs out: epoch 6 improves.
        assert_eq!(stopping(&losses, 4, 0.0), (None, 6));
        // min_delta 0.2: 0.9 is no improvement on 1.0, so the best stays at epoch 1.
        assert_eq!(stopping(&losses, 2, 0.2), (Some(3), 1));
    }
}

/// What one [`training_step`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// The batch's mean loss.
    pub loss: f32,
    /// How many of its images the model classified right (before the step).
    pub correct: usize,
}

/// Time spent in each part of training steps, summed over steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Zeroing the gradients.
    pub zeroing: Duration,
    /// The model's forward pass.
    pub forward: Duration,
    /// The loss and its gradient.
    pub loss: Duration,
    /// The model's backward pass.
    pub backward: Duration,
    /// The optimizer's update.
    pub optimizer: Duration,
}

/// One training step on `batch`: gradients zeroed, forward pass, loss (with
/// `label_smoothing`), backward pass, optimizer step; each part's time added to `times`.
/// `check_loss` sees the loss before anything is updated and may stop the step (a loss that is
/// not finite must not reach the weights).
pub fn training_step(
    model: &mut Sequential,
    optimizer: &mut Optimizer,
    batch: Batch,
    label_smoothing: f32,
    check_loss: impl FnOnce(f32) -> Result<(), TrainError>,
    times: &mut StepTimes,
) -> Result<StepOutcome, TrainError> {
    let start = Instant::now();
    model.zero_grad();
    let zeroed = Instant::now();
    let logits = model.forward(batch.images, Mode::Train)?;
    let forward_done = Instant::now();
    let out = softmax_cross_entropy(
        logits.view(),
        Targets::Classes(batch.labels.view()),
        label_smoothing,
    )?;
    let loss_done = Instant::now();
    check_loss(out.loss)?;
    let right = correct(logits.view(), batch.labels.view());
    model.backward(out.grad)?;
    let backward_done = Instant::now();
    optimizer.step(model)?;
    times.zeroing += zeroed - start;
    times.forward += forward_done - zeroed;
    times.loss += loss_done - forward_done;
    times.backward += backward_done - loss_done;
    times.optimizer += backward_done.elapsed();
    Ok(StepOutcome {
        loss: out.loss,
        correct: right,
    })
}
