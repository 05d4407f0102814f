//! `mnist train`: the settings checked before anything is loaded or written, a new run, a
//! resumed or extended run, and fine-tuning from a saved model with frozen layers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cli::{
    EarlyStopping, FitData, FitOptions, Resume, RunDir, TensorBoard, TrainConfig, evaluate, fit,
};
use mnist_data::{Augmentation, Elastic, LoadOptions, Normalization, ValidationSplit};
use nn::{
    InputNormalization, ModelInfo, Optimizer, ReduceOnPlateau, Schedule, Sequential, load_model,
};

use crate::args::{OptimizerName, TrainArgs};
use crate::progress::ProgressObserver;
use crate::{all_cores, load_dataset, on_a_worker, resolve_spec, start_threads};

/// Runs `mnist train`; `given` holds the ids of the flags given on the command line or through
/// the environment (a resume compares those with the run's own settings).
pub fn train(args: &TrainArgs, given: &HashSet<String>) -> Result<()> {
    let (config, run_dir, resuming) = match &args.resume {
        Some(dir) => (resumed_config(dir, args, given)?, Some(dir.clone()), true),
        None => {
            let config = config_from_args(args)?;
            if let Some(dir) = &args.run_dir {
                RunDir::check_new(dir, args.overwrite)?;
            }
            (config, args.run_dir.clone(), false)
        }
    };
    check_settings(&config)?;
    start_threads(config.threads)?;
    on_a_worker(|| train_with(args, config, run_dir, resuming))
}

/// The run configuration the command-line arguments describe, paths made absolute so that a
/// resume works from any directory.
fn config_from_args(args: &TrainArgs) -> Result<TrainConfig> {
    if args.nesterov && (args.optimizer != OptimizerName::Sgd || args.momentum == 0.0) {
        bail!("--nesterov needs --optimizer sgd and a --momentum above 0");
    }
    let absolute = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let (model, init_from) = match &args.init_from {
        Some(file) => {
            let (model, _) = load_model(file).context("cannot load the model to start from")?;
            let spec = model.spec().clone();
            if args.model.model.is_some() || args.model.arch.is_some() {
                let asked = resolve_spec(&args.model)?;
                if asked != spec {
                    bail!(
                        "--init-from {} holds a {} model, and --model/--arch describes another \
                         architecture; leave them out to train the file's own",
                        file.display(),
                        spec.name
                    );
                }
            }
            (spec, Some(absolute(file)?))
        }
        None => (resolve_spec(&args.model)?, None),
    };
    Ok(TrainConfig {
        model,
        data_dir: absolute(&args.data.data_dir)?,
        epochs: args.epochs,
        batch_size: args.batch_size,
        optimizer: args.rule(),
        learning_rate: args.learning_rate(),
        schedule: args.schedule,
        label_smoothing: args.label_smoothing,
        val_split: args.val_split,
        seed: args.seed,
        threads: args.threads.unwrap_or_else(all_cores),
        early_stopping: args.early_stopping,
        early_stopping_min_delta: args.early_stopping_min_delta,
        reduce_lr: args.reduce_lr(),
        augment: args.augment(),
        tensorboard: args.tensorboard.as_deref().map(absolute).transpose()?,
        init_from,
        freeze: args.freeze,
    })
}

/// Whether two configurations agree on one group of settings.
type SameSetting = fn(&TrainConfig, &TrainConfig) -> bool;

/// The flags (clap ids) that set each part of a configuration. A resume takes its settings from
/// the run; a flag among these that says otherwise is an error.
const SETTINGS: &[(&[&str], SameSetting)] = &[
    (&["model", "arch"], |a, b| a.model == b.model),
    (&["batch_size"], |a, b| a.batch_size == b.batch_size),
    (
        &["optimizer", "momentum", "nesterov", "weight_decay"],
        |a, b| a.optimizer == b.optimizer,
    ),
    (&["lr"], |a, b| a.learning_rate == b.learning_rate),
    (&["schedule"], |a, b| a.schedule == b.schedule),
    (&["label_smoothing"], |a, b| {
        a.label_smoothing == b.label_smoothing
    }),
    (&["val_split"], |a, b| a.val_split == b.val_split),
    (&["seed"], |a, b| a.seed == b.seed),
    (&["early_stopping", "early_stopping_min_delta"], |a, b| {
        a.early_stopping == b.early_stopping
            && a.early_stopping_min_delta == b.early_stopping_min_delta
    }),
    (
        &[
            "reduce_lr_on_plateau",
            "reduce_lr_factor",
            "min_lr",
            "reduce_lr_min_delta",
        ],
        |a, b| a.reduce_lr == b.reduce_lr,
    ),
    (
        &["augment", "rotation", "zoom", "shift", "elastic"],
        |a, b| a.augment == b.augment,
    ),
    (&["tensorboard"], |a, b| a.tensorboard == b.tensorboard),
    (&["init_from"], |a, b| a.init_from == b.init_from),
    (&["freeze"], |a, b| a.freeze == b.freeze),
];

/// The configuration of the run in `dir`, continued: `--epochs` may raise its epoch count (as
/// Keras' `initial_epoch`), `--data-dir` and `--threads` may change; any other flag given must
/// agree with the run's settings.
fn resumed_config(dir: &Path, args: &TrainArgs, given: &HashSet<String>) -> Result<TrainConfig> {
    let path = dir.join("config.json");
    let json = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot resume {}: no {}", dir.display(), path.display()))?;
    let mut config: TrainConfig =
        serde_json::from_str(&json).with_context(|| format!("{}", path.display()))?;
    let asked = config_from_args(args)?;
    let differing: Vec<String> = SETTINGS
        .iter()
        .filter(|(ids, same)| ids.iter().any(|id| given.contains(*id)) && !same(&config, &asked))
        .flat_map(|(ids, _)| ids.iter().filter(|id| given.contains(**id)))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    if !differing.is_empty() {
        bail!(
            "--resume {} continues that run with its own settings (config.json there), and {} \
             would change them; only --epochs, --data-dir and --threads may be given",
            dir.display(),
            differing.join(", ")
        );
    }
    let extended = given.contains("epochs") && args.epochs > config.epochs;
    if dir.join("final.safetensors").exists() && !extended {
        bail!(
            "{} already finished (see final.safetensors there; it ran at most {} epochs); pass \
             --epochs with a larger count to train it further",
            dir.display(),
            config.epochs
        );
    }
    if given.contains("epochs") && args.epochs != config.epochs {
        if matches!(
            config.schedule,
            Schedule::Cosine { .. } | Schedule::OneCycle { .. }
        ) && !args.quiet
        {
            eprintln!(
                "note: a {} schedule spans the whole run, so the rate of every epoch depends on \
                 the epoch count: from {} to {} epochs, this run differs from one of {} epochs \
                 from the start",
                if matches!(config.schedule, Schedule::Cosine { .. }) {
                    "cosine"
                } else {
                    "one-cycle"
                },
                config.epochs,
                args.epochs,
                args.epochs
            );
        }
        config.epochs = args.epochs;
    }
    if given.contains("data_dir") {
        config.data_dir = asked.data_dir;
    }
    if given.contains("threads") {
        config.threads = asked.threads;
    }
    Ok(config)
}

/// Checks what can be checked without the data: a schedule that fits the rate, and a freeze
/// that leaves something to train.
fn check_settings(config: &TrainConfig) -> Result<()> {
    if let Schedule::Cosine { min_lr } = config.schedule
        && min_lr > config.learning_rate
    {
        bail!(
            "--schedule cosine:{min_lr} would raise the rate from --lr {} to {min_lr}; the \
             minimum must be at most the learning rate",
            config.learning_rate
        );
    }
    let plan = config.model.plan()?;
    if config.freeze >= config.model.layers.len() {
        bail!(
            "--freeze {} would freeze all {} layers of {}; at least the last must train",
            config.freeze,
            config.model.layers.len(),
            config.model.name
        );
    }
    if plan.counts_with_frozen(config.freeze).trainable == 0 {
        bail!(
            "--freeze {} leaves no layer with parameters to train in {}",
            config.freeze,
            config.model.name
        );
    }
    Ok(())
}

/// The model to train: from the file `--init-from` names, or initialized from the seed; and
/// the normalization that goes with it.
fn initial_model(
    config: &TrainConfig,
    train_set: &mnist_data::LabeledImages,
) -> Result<(Sequential, Normalization)> {
    let (mut model, normalization) = match &config.init_from {
        Some(file) => {
            let (model, normalization) = crate::open_model(file)?;
            (model, normalization)
        }
        None => (
            Sequential::new(config.model.clone(), config.seed).context("cannot build the model")?,
            Normalization::fit(train_set),
        ),
    };
    model.freeze(config.freeze)?;
    Ok((model, normalization))
}

/// Checks the architecture and the batch size against the data, before the run directory
/// exists: a mistake found later would leave a half-made run behind.
fn check_against_data(config: &TrainConfig, train_set: &mnist_data::LabeledImages) -> Result<()> {
    let spec = &config.model;
    let [c, h, w] = spec.input;
    let (rows, cols) = (train_set.rows(), train_set.cols());
    if [c, h, w] != [1, rows, cols] {
        bail!(
            "the model {} takes {c}x{h}x{w} inputs, but the dataset's images are 1x{rows}x{cols} \
             (grey); set its \"input\" to [1, {rows}, {cols}]",
            spec.name
        );
    }
    let classes = LoadOptions::default().classes;
    let outputs = spec.plan()?.classes();
    if outputs != classes {
        bail!(
            "the model {} ends in {outputs} scores, but the dataset has {classes} classes; give \
             its last Dense layer {classes} units",
            spec.name
        );
    }
    if config.batch_size > train_set.len() {
        bail!(
            "--batch-size {} is larger than the {} training images; at most {}",
            config.batch_size,
            train_set.len(),
            train_set.len()
        );
    }
    Ok(())
}

/// [`train`] once the configuration is known.
fn train_with(
    args: &TrainArgs,
    config: TrainConfig,
    run_dir: Option<PathBuf>,
    resuming: bool,
) -> Result<()> {
    let data = load_dataset(&config.data_dir)?;
    let (train_set, validation) = data
        .train
        .split(ValidationSplit::Last {
            fraction: config.val_split,
        })
        .context("cannot split off the validation set")?;
    check_against_data(&config, &train_set)?;
    let (mut model, normalization) = initial_model(&config, &train_set)?;
    let spec = config.model.clone();
    let mut optimizer = Optimizer::new(config.optimizer, config.learning_rate)?;
    let quiet = args.quiet || args.json;
    if model.ends_in_softmax() && !quiet {
        eprintln!(
            "note: {} ends in Softmax; training uses the scores before it with the fused softmax \
             cross-entropy, as Keras does for a softmax output (predictions are the same)",
            spec.name
        );
    }
    let mut run = match (resuming, run_dir) {
        (true, Some(dir)) => RunDir::open(dir)?,
        (_, dir) => RunDir::create(dir, &spec.name, args.overwrite)?,
    };

    let resume = if resuming {
        let state = run
            .load_checkpoint(&mut model, &mut optimizer)
            .with_context(|| {
                format!(
                    "cannot resume {}: no usable checkpoint (one is written after every \
                     finished epoch; start the run again if none finished)",
                    run.path().display()
                )
            })?;
        if state.epochs_done >= config.epochs {
            bail!(
                "{} already finished after {} epoch(s) (see final.safetensors there); pass \
                 --epochs with a larger count to train it further",
                run.path().display(),
                state.epochs_done
            );
        }
        // Early stopping restores the best epoch's weights at the end: bring them back too.
        let best = run.path().join("best.safetensors");
        let best_weights = match config.early_stopping {
            Some(_) if best.exists() => Some(cli::snapshot(
                &load_model(&best).context("cannot load the best model")?.0,
            )),
            _ => None,
        };
        // The configuration may now say more epochs, another data directory or thread count.
        run.write_config(&config)?;
        let line = format!(
            "resuming after epoch {} of {}",
            state.epochs_done, config.epochs
        );
        run.log(&line)?;
        if !quiet {
            eprintln!("{line} ({})", run.path().display());
        }
        Some(Resume {
            state,
            best_weights,
        })
    } else {
        run.write_config(&config)?;
        None
    };
    let counts = model.param_counts();
    let frozen = if config.freeze > 0 {
        format!(
            " | first {} layers frozen: {} trainable, {} non-trainable parameters",
            config.freeze, counts.trainable, counts.non_trainable
        )
    } else {
        String::new()
    };
    let header = format!(
        "{} | {} train, {} validation, {} test images | {}, lr {}, batch {}, {} epoch(s), seed {}, {} thread(s){frozen}",
        spec,
        train_set.len(),
        validation.len(),
        data.test.len(),
        config.optimizer,
        config.learning_rate,
        config.batch_size,
        config.epochs,
        config.seed,
        config.threads
    );
    run.log(&header)?;
    if !quiet {
        eprintln!("{header}");
        eprintln!("run directory: {}", run.path().display());
    }
    let info = |training: serde_json::Value| ModelInfo {
        normalization: Some(InputNormalization {
            mean: normalization.mean,
            std: normalization.std,
        }),
        training,
    };
    let options = FitOptions {
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
    };
    let fit_data = FitData {
        train: &train_set,
        validation: (!validation.is_empty()).then_some(&validation),
        normalization,
    };
    // Into the run directory unless --tensorboard names another place.
    let tensorboard_dir = config
        .tensorboard
        .clone()
        .unwrap_or_else(|| run.path().join("tensorboard"));
    let tensorboard = Some(TensorBoard::create(&tensorboard_dir)?);
    let mut observer = ProgressObserver::new(
        &mut run,
        args.quiet,
        args.json,
        info(serde_json::Value::Null),
        tensorboard,
    );
    let outcome = match fit(
        &mut model,
        &mut optimizer,
        &fit_data,
        &options,
        &mut observer,
        resume,
    ) {
        Ok(outcome) => outcome,
        Err(e) => {
            let kept = run.path().join("last.safetensors");
            let note = if kept.exists() {
                format!("the last good model is {}", kept.display())
            } else {
                "no epoch finished, so no model was saved".to_string()
            };
            let _ = run.log(&format!("stopped: {e}; {note}"));
            return Err(anyhow::Error::new(e).context(note));
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
    let final_path = run.save_model("final", &model, &info(final_facts))?;
    let line = format!(
        "test loss {:.4}, test accuracy {:.4} ({} of {}); model: {}",
        test.loss,
        test.accuracy,
        (test.accuracy * data.test.len() as f32).round(),
        data.test.len(),
        final_path.display()
    );
    run.log(&line)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"test_loss": test.loss, "test_accuracy": test.accuracy, "model": final_path})
        );
    } else if !args.quiet {
        println!("{line}");
    }
    Ok(())
}
