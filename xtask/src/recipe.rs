//! `cargo xtask recipe <name>`: trains a recipe of `mnist train` from several seeds (one
//! process each, on all 60,000 images) and prints each run's training time and test accuracy,
//! their mean, and with `--compare` the same runs repeated in PyTorch in the same session.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench::{build_mnist, json_line, workspace};

/// Arguments of `cargo xtask recipe`.
#[derive(clap::Args)]
pub struct RecipeArgs {
    /// The recipe (`mnist train --recipe`): fast or best.
    recipe: String,
    /// Seeds 1 to N.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    seeds: u64,
    /// Worker threads for every framework.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also repeat each run in PyTorch (xtask/recipe_torch.py) with the Python in $BENCH_PYTHON.
    #[arg(long)]
    compare: bool,
    /// Where the run directories go (each seed's model files, e.g. for an ensemble).
    #[arg(long, value_name = "DIR", default_value_os_t = workspace().join("runs/recipes"))]
    runs: PathBuf,
    /// The dataset.
    #[arg(long, value_name = "DIR", default_value_os_t = workspace().join("data/mnist"))]
    data_dir: PathBuf,
}

/// One training run: its seconds of training (the epochs' sum) and its test accuracy.
struct Outcome {
    seconds: f64,
    accuracy: f64,
}

/// Runs `recipe`.
pub fn run(args: RecipeArgs) -> Result<()> {
    let root = workspace();
    build_mnist()?;
    let python = match args.compare {
        true => Some(std::env::var("BENCH_PYTHON").context(
            "--compare needs BENCH_PYTHON=/path/to/python of an environment with torch",
        )?),
        false => None,
    };
    let data = args
        .data_dir
        .to_str()
        .context("the data directory is not valid UTF-8")?;
    let threads = args.threads.to_string();
    println!(
        "| seed | ours: training s | ours: test accuracy |{}",
        if python.is_some() {
            " PyTorch: training s | PyTorch: test accuracy | time ratio |"
        } else {
            ""
        }
    );
    println!(
        "| --- | --- | --- |{}",
        if python.is_some() {
            " --- | --- | --- |"
        } else {
            ""
        }
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for seed in 1..=args.seeds {
        let run_dir = args.runs.join(format!("{}-seed{seed}", args.recipe));
        let run_dir_text = run_dir
            .to_str()
            .context("the runs directory is not valid UTF-8")?;
        let output = Command::new(root.join("target/release/mnist"))
            .args([
                "train",
                "--recipe",
                &args.recipe,
                "--seed",
                &seed.to_string(),
            ])
            .args([
                "--threads",
                &threads,
                "--data-dir",
                data,
                "--run-dir",
                run_dir_text,
            ])
            .args(["--overwrite", "--json"])
            .output()
            .context("cannot run mnist train")?;
        if !output.status.success() {
            bail!(
                "mnist train --recipe {} --seed {seed} failed: {}",
                args.recipe,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let outcome = outcome_of(&String::from_utf8_lossy(&output.stdout))?;
        let mut row = format!(
            "| {seed} | {:.2} | {:.4} |",
            outcome.seconds, outcome.accuracy
        );
        if let Some(python) = &python {
            let torch = json_line(
                Command::new(python)
                    .arg(root.join("xtask/recipe_torch.py"))
                    .args([data, &threads])
                    .arg(run_dir.join("config.json")),
            )?;
            if let Some(reason) = torch["skipped"].as_str() {
                bail!("recipe_torch.py skipped: {reason}");
            }
            let peer = Outcome {
                seconds: number(&torch, "seconds")?,
                accuracy: number(&torch, "test_accuracy")?,
            };
            row += &format!(
                " {:.2} | {:.4} | {:.2} |",
                peer.seconds,
                peer.accuracy,
                outcome.seconds / peer.seconds
            );
            theirs.push(peer);
        }
        println!("{row}");
        ours.push(outcome);
    }
    let mean = |runs: &[Outcome], f: fn(&Outcome) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64
    };
    let mut row = format!(
        "| mean | {:.2} | {:.4} |",
        mean(&ours, |o| o.seconds),
        mean(&ours, |o| o.accuracy)
    );
    if !theirs.is_empty() {
        let (s, a) = (mean(&theirs, |o| o.seconds), mean(&theirs, |o| o.accuracy));
        row += &format!(" {s:.2} | {a:.4} | {:.2} |", mean(&ours, |o| o.seconds) / s);
    }
    println!("{row}");
    Ok(())
}

/// The training time and test accuracy of `mnist train --json`'s output.
fn outcome_of(stdout: &str) -> Result<Outcome> {
    let mut seconds = 0.0;
    let mut accuracy = None;
    for line in stdout.lines() {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        if value.get("epoch").is_some() {
            seconds += number(&value, "seconds")?;
        } else if value.get("test_accuracy").is_some() {
            accuracy = Some(number(&value, "test_accuracy")?);
        }
    }
    Ok(Outcome {
        seconds,
        accuracy: accuracy.context("mnist train printed no test accuracy")?,
    })
}

/// A number field of a JSON object.
fn number(value: &Value, field: &str) -> Result<f64> {
    value[field]
        .as_f64()
        .with_context(|| format!("no number {field:?} in {value}"))
}
