//! A whole training run, as `mnist train` does it once its settings are known: the settings
//! checked against the data, the model built (or loaded and frozen), the run directory made
//! or continued from its checkpoint, [`fit`] with the run directory kept current after every
//! epoch, the test set evaluated once at the end and the final model saved.

use std::path::{Path, PathBuf};

use mnist_data::{
    Augmentation, Dataset, Elastic, LabeledImages, LoadOptions, Normalization, ValidationSplit,
};
use nn::{
    InputNormalization, ModelInfo, NnError, Optimizer, ReduceOnPlateau, Schedule, Sequential,
    load_model,
};

use crate::{
    EarlyStopping, EpochRecord, Evaluation, FitData, FitOptions, FitOutcome, FitState, Observer,
    Resume, RunDir, TensorBoard, TrainConfig, TrainError, evaluate, fit, snapshot,
};

/// Which run directory a training run writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunPlace {
    /// A new one: at this path (which must not hold another run unless `overwrite`), or a
    /// fresh one under `runs/`.
    New {
        /// Where; `None` for `runs/<model>-<timestamp>`.
        dir: Option<PathBuf>,
        /// Whether an existing run there may be replaced.
        overwrite: bool,
    },
    /// The run in this directory, continued from its last checkpoint.
    Resume(PathBuf),
}

/// What a training run tells whoever drives it, to show progress; every method has a no-op
/// default. (The run directory is kept by the run itself.)
pub trait Progress {
    /// A line worth showing: the run's header, a resume, a callback acting.
    fn note(&mut self, _line: &str) {}

    /// An epoch over `images` training images begins (`epoch` is 1-based, of `epochs`).
    fn epoch_started(&mut self, _epoch: usize, _epochs: usize, _images: usize) {}

    /// A batch finished, `seen` images into the epoch; the running means cover them.
    fn batch_finished(&mut self, _seen: usize, _running_loss: f32, _running_accuracy: f32) {}

    /// An epoch finished and was saved; `line` is its summary as the log has it.
    fn epoch_finished(&mut self, _record: &EpochRecord, _line: &str) {}
}

/// A [`Progress`] that shows nothing.
pub struct Silent;

impl Progress for Silent {}

/// How a training run ended.
#[derive(Clone, Debug)]
pub struct TrainingOutcome {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The final model file (the best epoch's weights when early stopping restored them).
    pub final_model: PathBuf,
    /// The test set's loss and accuracy under the final model, measured once.
    pub test: Evaluation,
    /// The epochs run.
    pub fit: FitOutcome,
    /// The last line of the log: the test result and where the model is.
    pub summary: String,
}

/// Checks what can be checked without the data: a schedule that fits the rate, and a freeze
/// that leaves something to train.
pub fn check_settings(config: &TrainConfig) -> Result<(), TrainError> {
    let refuse = |problem: String| Err(TrainError::Settings(problem));
    if let Schedule::Cosine { min_lr } = config.schedule
        && min_lr > config.learning_rate
    {
        return refuse(format!(
            "--schedule cosine:{min_lr} would raise the rate from --lr {} to {min_lr}; the \
             minimum must be at most the learning rate",
            config.learning_rate
        ));
    }
    let plan = config.model.plan()?;
    if config.freeze >= config.model.layers.len() {
        return refuse(format!(
            "--freeze {} would freeze all {} layers of {}; at least the last must train",
            config.freeze,
            config.model.layers.len(),
            config.model.name
        ));
    }
    if plan.counts_with_frozen(config.freeze).trainable == 0 {
        return refuse(format!(
            "--freeze {} leaves no layer with parameters to train in {}",
            config.freeze, config.model.name
        ));
    }
    Ok(())
}

/// Checks the architecture and the batch size against the data, before the run directory
/// exists: a mistake found later would leave a half-made run behind.
fn check_against_data(config: &TrainConfig, train_set: &LabeledImages) -> Result<(), TrainError> {
    let spec = &config.model;
    let [c, h, w] = spec.input;
    let (rows, cols) = (train_set.rows(), train_set.cols());
    let refuse = |problem: String| Err(TrainError::Settings(problem));
    if [c, h, w] != [1, rows, cols] {
        return refuse(format!(
            "the model {} takes {c}x{h}x{w} inputs, but the dataset's images are 1x{rows}x{cols} \
             (grey); set its \"input\" to [1, {rows}, {cols}]",
            spec.name
        ));
    }
    let classes = LoadOptions::default().classes;
    let outputs = spec.plan()?.classes();
    if outputs != classes {
        return refuse(format!(
            "the model {} ends in {outputs} scores, but the dataset has {classes} classes; give \
             its last Dense layer {classes} units",
            spec.name
        ));
    }
    if config.batch_size > train_set.len() {
        return refuse(format!(
            "--batch-size {} is larger than the {} training images; at most {}",
            config.batch_size,
            train_set.len(),
            train_set.len()
        ));
    }
    Ok(())
}

/// A model file and the normalization it was trained with (which it must hold: a model fed
/// inputs scaled otherwise than in training is quietly wrong).
pub fn open_model(path: &Path) -> Result<(Sequential, Normalization), TrainError> {
    let (model, info) = load_model(path)?;
    let n = info.normalization.ok_or_else(|| NnError::ModelFile {
        path: path.to_path_buf(),
        problem:
            "it has no input normalization in its metadata; save it with one (`normalization`, \
                  see docs/model-format.md)"
                .into(),
    })?;
    let normalization = Normalization {
        mean: n.mean,
        std: n.std,
    };
    Ok((model, normalization))
}

/// The model to train: from the file `init_from` names, or initialized from the seed; and the
/// normalization that goes with it.
fn initial_model(
    config: &TrainConfig,
    train_set: &LabeledImages,
) -> Result<(Sequential, Normalization), TrainError> {
    let (mut model, normalization) = match &config.init_from {
        Some(file) => open_model(file)?,
        None => (
            Sequential::new(config.model.clone(), config.seed)?,
            Normalization::fit(train_set),
        ),
    };
    model.freeze(config.freeze)?;
    Ok((model, normalization))
}

/// The options of [`fit`] that `config` sets.
pub fn fit_options(config: &TrainConfig) -> FitOptions {
    FitOptions {
        epochs: config.epochs,
        batch_size: config.batch_size,
        seed: config.seed,
        label_smoothing: config.label_smoothing,
        learning_rate: config.learning_rate,
        schedule: config.schedule,
        early_stopping: config.early_stopping.map(|patience| EarlyStopping {
            patience,
            min_delta: config.early_stopping_min_delta,
        }),
        reduce_lr: config.reduce_lr.map(|r| {
            ReduceOnPlateau::new(r.factor, r.patience, r.min_lr).with_min_delta(r.min_delta)
        }),
        augmentation: config.augment.map(|a| Augmentation {
            degrees: a.degrees,
            zoom: a.zoom,
            shift: a.shift,
            elastic: a.elastic.map(|(alpha, sigma)| Elastic { alpha, sigma }),
        }),
    }
}

/// Trains as `config` says on `data` (its training images split for validation as configured,
/// its test images evaluated once at the end), writing the run directory `place` names, and
/// telling `progress` as it goes. Runs on the calling thread's rayon pool.
pub fn train(
    config: &TrainConfig,
    place: RunPlace,
    data: &Dataset,
    progress: &mut dyn Progress,
) -> Result<TrainingOutcome, TrainError> {
    check_settings(config)?;
    let (train_set, validation) = data.train.split(ValidationSplit::Last {
        fraction: config.val_split,
    })?;
    check_against_data(config, &train_set)?;
    let (mut model, normalization) = initial_model(config, &train_set)?;
    let spec = config.model.clone();
    let mut optimizer = Optimizer::new(config.optimizer, config.learning_rate)?;
    if model.ends_in_softmax() {
        progress.note(&format!(
            "note: {} ends in Softmax; training uses the scores before it with the fused softmax \
             cross-entropy, as Keras does for a softmax output (predictions are the same)",
            spec.name
        ));
    }
    let (mut run, resuming) = match place {
        RunPlace::Resume(dir) => (RunDir::open(dir)?, true),
        RunPlace::New { dir, overwrite } => (RunDir::create(dir, &spec.name, overwrite)?, false),
    };
    let resume = if resuming {
        Some(resume_from_checkpoint(
            config,
            &mut run,
            &mut model,
            &mut optimizer,
            progress,
        )?)
    } else {
        run.write_config(config)?;
        None
    };
    let header = header(config, &model, &train_set, &validation, data);
    run.log(&header)?;
    progress.note(&header);
    progress.note(&format!("run directory: {}", run.path().display()));
    let info = |training: serde_json::Value| ModelInfo {
        normalization: Some(InputNormalization {
            mean: normalization.mean,
            std: normalization.std,
        }),
        training,
    };
    let fit_data = FitData {
        train: &train_set,
        validation: (!validation.is_empty()).then_some(&validation),
        normalization,
    };
    // Into the run directory unless the configuration names another place.
    let tensorboard_dir = config
        .tensorboard
        .clone()
        .unwrap_or_else(|| run.path().join("tensorboard"));
    let tensorboard = TensorBoard::create(&tensorboard_dir)?;
    let mut recorder = Recorder {
        run: &mut run,
        progress,
        info: info(serde_json::Value::Null),
        tensorboard,
        epochs: config.epochs,
    };
    let options = fit_options(config);
    let outcome = fit(
        &mut model,
        &mut optimizer,
        &fit_data,
        &options,
        &mut recorder,
        resume,
    );
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            let kept = run.path().join("last.safetensors");
            let note = if kept.exists() {
                format!("the last good model is {}", kept.display())
            } else {
                "no epoch finished, so no model was saved".to_string()
            };
            let _ = run.log(&format!("stopped: {error}; {note}"));
            return Err(TrainError::Stopped {
                error: Box::new(error),
                note,
            });
        }
    };

    let test = evaluate(&mut model, &data.test, &normalization)?;
    let final_facts = serde_json::json!({
        "epochs_run": outcome.history.len(),
        "best_epoch": outcome.best_epoch,
        "stopped_early": outcome.stopped_early,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "history": outcome.history,
        "config": config,
    });
    // With early stopping the model now holds the best epoch's weights; save what is evaluated.
    let final_model = run.save_model("final", &model, &info(final_facts))?;
    let summary = format!(
        "test loss {:.4}, test accuracy {:.4} ({} of {}); model: {}",
        test.loss,
        test.accuracy,
        (test.accuracy * data.test.len() as f32).round(),
        data.test.len(),
        final_model.display()
    );
    run.log(&summary)?;
    Ok(TrainingOutcome {
        run_dir: run.path().to_path_buf(),
        final_model,
        test,
        fit: outcome,
        summary,
    })
}

/// Restores the model and optimizer of the run in `run` from its last checkpoint, and what
/// [`fit`] needs to continue.
fn resume_from_checkpoint(
    config: &TrainConfig,
    run: &mut RunDir,
    model: &mut Sequential,
    optimizer: &mut Optimizer,
    progress: &mut dyn Progress,
) -> Result<Resume, TrainError> {
    let no_checkpoint = |problem: String| TrainError::RunDir {
        path: run.path().to_path_buf(),
        problem,
    };
    let state = run.load_checkpoint(model, optimizer).map_err(|e| {
        no_checkpoint(format!(
            "cannot resume: no usable checkpoint (one is written after every finished epoch; \
             start the run again if none finished): {e}"
        ))
    })?;
    if state.epochs_done >= config.epochs {
        return Err(no_checkpoint(format!(
            "already finished after {} epoch(s) (see final.safetensors there); pass --epochs \
             with a larger count to train it further",
            state.epochs_done
        )));
    }
    // Early stopping restores the best epoch's weights at the end: bring them back too.
    let best = run.path().join("best.safetensors");
    let best_weights = match config.early_stopping {
        Some(_) if best.exists() => Some(snapshot(&load_model(&best)?.0)),
        _ => None,
    };
    // The configuration may now say more epochs, another data directory or thread count.
    run.write_config(config)?;
    let line = format!(
        "resuming after epoch {} of {}",
        state.epochs_done, config.epochs
    );
    run.log(&line)?;
    progress.note(&format!("{line} ({})", run.path().display()));
    Ok(Resume {
        state,
        best_weights,
    })
}

/// The run's first log line: the model, the data and the settings.
fn header(
    config: &TrainConfig,
    model: &Sequential,
    train_set: &LabeledImages,
    validation: &LabeledImages,
    data: &Dataset,
) -> String {
    let counts = model.param_counts();
    let frozen = if config.freeze > 0 {
        format!(
            " | first {} layers frozen: {} trainable, {} non-trainable parameters",
            config.freeze, counts.trainable, counts.non_trainable
        )
    } else {
        String::new()
    };
    format!(
        "{} | {} train, {} validation, {} test images | {}, lr {}, batch {}, {} epoch(s), seed {}, {} thread(s){frozen}",
        config.model,
        train_set.len(),
        validation.len(),
        data.test.len(),
        config.optimizer,
        config.learning_rate,
        config.batch_size,
        config.epochs,
        config.seed,
        config.threads
    )
}

/// Keeps the run directory current after every epoch (history, plots, TensorBoard events, the
/// last and best models, the checkpoint, the log) and passes progress on.
struct Recorder<'a> {
    run: &'a mut RunDir,
    progress: &'a mut dyn Progress,
    /// What the saved models' metadata holds besides the epoch.
    info: ModelInfo,
    tensorboard: TensorBoard,
    epochs: usize,
}

impl Observer for Recorder<'_> {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, images: usize) {
        self.progress.epoch_started(epoch, epochs, images);
    }

    fn batch_finished(&mut self, seen: usize, running_loss: f32, running_accuracy: f32) {
        self.progress
            .batch_finished(seen, running_loss, running_accuracy);
    }

    fn callback_fired(&mut self, message: &str) {
        // Logged for the record; a failed log write is not worth stopping the run for, and
        // the next epoch's write will report it.
        let _ = self.run.log(message);
        self.progress.note(message);
    }

    fn epoch_finished(
        &mut self,
        record: &EpochRecord,
        model: &Sequential,
        optimizer: &Optimizer,
        state: &FitState,
        improved: bool,
    ) -> Result<(), TrainError> {
        self.run.write_history(&state.history)?;
        crate::history_plots(self.run.path(), &state.history)?;
        self.tensorboard.epoch(record)?;
        let mut info = self.info.clone();
        info.training = serde_json::json!({"epoch": record.epoch, "record": record});
        self.run.save_model("last", model, &info)?;
        if improved {
            self.run.save_model("best", model, &info)?;
        }
        // Last, so that a crash before it resumes from the previous epoch, which is replayed
        // exactly: files written for the interrupted epoch are written again, identically.
        self.run.save_checkpoint(model, optimizer, &info, state)?;
        let validation = match (record.val_loss, record.val_accuracy) {
            (Some(l), Some(a)) => format!(" - val_loss {l:.4} - val_accuracy {a:.4}"),
            _ => String::new(),
        };
        let line = format!(
            "epoch {}/{} - {:.1}s ({:.0} images/s) - loss {:.4} - accuracy {:.4}{validation} - lr {:.2e}{}",
            record.epoch,
            self.epochs,
            record.seconds,
            record.images_per_second,
            record.train_loss,
            record.train_accuracy,
            record.learning_rate,
            if improved { " *" } else { "" }
        );
        self.run.log(&line)?;
        self.progress.epoch_finished(record, &line);
        Ok(())
    }
}
