//! `mnist train`: the command line made into a run configuration (a new run, a resumed or
//! extended one, fine-tuning from a saved model), checked before anything is loaded or
//! written, then run by [`cli::train`] with progress drawn by [`ProgressObserver`].

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cli::{RunDir, RunPlace, TrainConfig, check_settings};
use nn::{Schedule, load_model};

use crate::args::{OptimizerName, TrainArgs};
use crate::progress::ProgressObserver;
use crate::{all_cores, load_dataset, on_a_worker, resolve_spec, start_threads};

/// Runs `mnist train`; `given` holds the ids of the flags given on the command line or through
/// the environment (a resume compares those with the run's own settings).
pub fn train(args: &TrainArgs, given: &HashSet<String>) -> Result<()> {
    let args = &with_recipe(args, given)?;
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
    let place = match (resuming, run_dir) {
        (true, Some(dir)) => RunPlace::Resume(dir),
        (_, dir) => RunPlace::New {
            dir,
            overwrite: args.overwrite,
        },
    };
    let data = load_dataset(&config.data_dir)?;
    let mut progress = ProgressObserver::new(args.quiet, args.json);
    let outcome = on_a_worker(|| cli::train(&config, place, &data, &mut progress))?;
    if args.json {
        let summary = serde_json::json!({
            "test_loss": outcome.test.loss,
            "test_accuracy": outcome.test.accuracy,
            "model": outcome.final_model,
        });
        println!("{summary}");
    } else if !args.quiet {
        println!("{}", outcome.summary);
    }
    Ok(())
}

/// `args` with its recipe's settings in place of every flag not given.
fn with_recipe(args: &TrainArgs, given: &HashSet<String>) -> Result<TrainArgs> {
    let mut args = args.clone();
    let Some(name) = &args.recipe else {
        return Ok(args);
    };
    let recipe = cli::recipe(name).with_context(|| format!("no recipe {name:?}"))?;
    let not_given = |id: &str| !given.contains(id);
    if not_given("model") && not_given("arch") {
        args.model.model = Some(recipe.model.to_string());
    }
    if not_given("epochs") {
        args.epochs = recipe.epochs;
    }
    if not_given("batch_size") {
        args.batch_size = recipe.batch_size;
    }
    if not_given("optimizer") {
        args.optimizer = OptimizerName::Adam;
    }
    if not_given("lr") {
        args.lr = Some(recipe.learning_rate);
    }
    if not_given("schedule") {
        args.schedule = recipe.schedule;
    }
    if not_given("label_smoothing") {
        args.label_smoothing = recipe.label_smoothing;
    }
    if not_given("val_split") {
        args.val_split = 0.0;
    }
    if not_given("augment") {
        args.augment = recipe.augment;
    }
    Ok(args)
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
