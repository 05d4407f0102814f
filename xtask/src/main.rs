//! Project automation as a plain Rust binary, run as `cargo xtask <command>` (see
//! `.cargo/config.toml`): no shell scripts to port, the same code on every platform.

mod bench;
mod fetch;
mod fuzz;
mod recipe;
mod serve_bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Project automation for the MNIST CNN workspace.
#[derive(Parser)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download MNIST into data/mnist and verify every file's SHA-256.
    FetchData(fetch::FetchArgs),
    /// Measure every preset's training and inference speed (release build), optionally beside
    /// PyTorch (--compare, with BENCH_PYTHON).
    Bench(bench::BenchArgs),
    /// Train a recipe of `mnist train` from several seeds: training time and test accuracy of
    /// each, optionally beside PyTorch (--compare, with BENCH_PYTHON).
    Recipe(recipe::RecipeArgs),
    /// Run thousands of mutated model files, specs, images and data directories through the
    /// release binary under memory and time limits; fail on any panic, signal or bad message.
    FuzzFiles(fuzz::FuzzArgs),
    /// Load `mnist serve` with oha (1, 16, 64 clients; JSON and PNG bodies), beside the
    /// FastAPI + PyTorch server when BENCH_PYTHON has torch, fastapi and uvicorn.
    ServeBench(serve_bench::ServeBenchArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::FetchData(args) => fetch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::FuzzFiles(args) => fuzz::run(args),
        Command::Recipe(args) => recipe::run(args),
        Command::ServeBench(args) => serve_bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain on one line, never a backtrace: this is a message for a person.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
