//! `mnist`: train, evaluate and run CNNs on MNIST-style digits from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mnist_data::{DataError, LoadOptions, Normalization, ValidationSplit, load_dir};

/// Train and run convolutional networks on MNIST-style digit images.
#[derive(Parser)]
#[command(name = "mnist", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on the dataset.
    Train(TrainArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Directory holding the dataset in MNIST's layout (train-images-idx3-ubyte[.gz], ...).
    #[arg(
        long,
        value_name = "DIR",
        env = "MNIST_DATA_DIR",
        default_value = "data/mnist"
    )]
    data_dir: PathBuf,
    /// Share of the training set held out for validation (Keras' validation_split).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1, value_parser = fraction_below_one)]
    val_split: f64,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Train(args) => train(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the cause chain, never a backtrace: this is a message for a person.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a share in `[0, 1)`, such as a validation fraction.
fn fraction_below_one(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        Ok(_) => Err("must be at least 0 and below 1 (0 for no validation set)".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn train(args: &TrainArgs) -> Result<()> {
    let start = Instant::now();
    let data = load_dir(&args.data_dir, &LoadOptions::default()).map_err(|e| match e {
        DataError::MissingFile { .. } => anyhow::Error::new(e).context(format!(
            "no dataset in {}: download MNIST into data/mnist with `cargo xtask fetch-data`, or \
             point --data-dir (or MNIST_DATA_DIR) at a directory in MNIST's layout",
            args.data_dir.display()
        )),
        other => anyhow::Error::new(other).context("cannot load the dataset"),
    })?;
    let (train, validation) = data
        .train
        .split(ValidationSplit::Last {
            fraction: args.val_split,
        })
        .context("cannot split off the validation set")?;
    let norm = Normalization::fit(&train);
    println!(
        "Loaded {} in {:.2} s",
        args.data_dir.display(),
        start.elapsed().as_secs_f64()
    );
    for (name, set) in [
        ("train", &train),
        ("validation", &validation),
        ("test", &data.test),
    ] {
        println!(
            "  {name:<10} {:>6} images [N, C, H, W] = [{}, 1, {}, {}], labels {:?}",
            set.len(),
            set.len(),
            set.rows(),
            set.cols(),
            set.label_histogram(10)
        );
    }
    println!(
        "  normalization (fit on the training split): mean {:.4}, std {:.4}",
        norm.mean, norm.std
    );
    println!("Model training is not available yet: this build loads and checks the data only.");
    Ok(())
}
