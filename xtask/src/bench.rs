//! `cargo xtask bench`: each preset's training and inference speed in a release build, one
//! process per case (so peak memory is the case's own), optionally beside PyTorch and Keras
//! measured in the same run on the same data, printed as a Markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Arguments of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Presets to measure.
    #[arg(long = "model", value_name = "PRESET", default_values_t = ["two-conv".to_string(), "lenet5".to_string(), "one-conv".to_string(), "bn-cnn".to_string()])]
    models: Vec<String>,
    /// Training batches timed per case, after the warm-up.
    #[arg(long, default_value_t = 300)]
    batches: usize,
    /// Training batches run before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Worker threads for every framework.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Runs of each of our cases (one process each); the table gives the median and range.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
    /// Also run the same cases in PyTorch and in Keras (whichever is installed), with the
    /// Python in $BENCH_PYTHON.
    #[arg(long)]
    compare: bool,
    /// Write the table into docs/benchmarks.md (between its `cargo xtask bench` markers).
    #[arg(long)]
    write: bool,
    /// Also print where each preset's training step goes: time per layer, forward and
    /// backward, from the trainer's internal profiler.
    #[arg(long)]
    profile: bool,
    /// The dataset.
    #[arg(long, value_name = "DIR", default_value_os_t = workspace().join("data/mnist"))]
    data_dir: PathBuf,
}

/// Builds the release `mnist` binary (`target/release/mnist`).
pub(crate) fn build_mnist() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "-p", "cli"])
        .current_dir(workspace())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p cli failed");
    }
    Ok(())
}

/// The workspace's root directory.
pub(crate) fn workspace() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// The Python scripts that run the presets in other frameworks, in `xtask/`.
const PEER_SCRIPTS: [&str; 2] = ["bench_torch.py", "bench_keras.py"];

const BEGIN: &str = "<!-- cargo xtask bench: begin -->";
const END: &str = "<!-- cargo xtask bench: end -->";

/// Runs `bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let root = workspace();
    build_mnist()?;
    let python = if args.compare {
        Some(std::env::var("BENCH_PYTHON").context(
            "--compare needs BENCH_PYTHON=/path/to/python of an environment with torch and/or \
             tensorflow (pip install numpy torch tensorflow-cpu)",
        )?)
    } else {
        None
    };
    let data = args
        .data_dir
        .to_str()
        .context("the data directory is not valid UTF-8")?
        .to_string();
    let (threads, batches, warmup) = (
        args.threads.to_string(),
        args.batches.to_string(),
        args.warmup.to_string(),
    );
    let mut rows = Vec::new();
    for model in &args.models {
        eprintln!("measuring {model} ...");
        let mut runs = Vec::new();
        for _ in 0..args.repeat {
            runs.push(json_line(
                Command::new(root.join("target/release/mnist"))
                    .args([
                        "bench",
                        "--model",
                        model,
                        "--threads",
                        &threads,
                        "--batches",
                        &batches,
                    ])
                    .args(["--warmup", &warmup, "--data-dir", &data, "--json"])
                    .args(args.profile.then_some("--profile")),
            )?);
        }
        let ours = median_run(runs);
        let mut peers = Vec::new();
        if let Some(python) = &python {
            for script in PEER_SCRIPTS {
                let theirs = json_line(
                    Command::new(python)
                        .arg(root.join("xtask").join(script))
                        .args([&data, &threads, &batches, &warmup, model]),
                )?;
                match theirs["skipped"].as_str() {
                    Some(reason) => eprintln!("{script} skipped: {reason}"),
                    None => peers.push(theirs),
                }
            }
            if peers.is_empty() {
                bail!("--compare found neither torch nor tensorflow in BENCH_PYTHON ({python})");
            }
        }
        rows.push((model.clone(), ours, peers));
    }
    let mut table = table(&rows, &args);
    if args.profile {
        for (model, ours, _) in &rows {
            table += &format!("\nProfile of {model} (milliseconds per training batch):\n\n");
            table += ours["profile_table"].as_str().unwrap_or("(no profile)\n");
        }
    }
    println!("{table}");
    if args.write {
        let path = root.join("docs/benchmarks.md");
        let doc = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let section = format!("{BEGIN}\n{table}\n{END}");
        let updated = match (doc.find(BEGIN), doc.find(END)) {
            (Some(a), Some(b)) if a < b => {
                format!("{}{section}{}", &doc[..a], &doc[b + END.len()..])
            }
            _ => format!("{doc}\n## Whole models (`cargo xtask bench`)\n\n{section}\n"),
        };
        // Beside it first, then renamed over it: an interrupted write leaves the old file.
        let temporary = path.with_extension("md.tmp");
        std::fs::write(&temporary, updated)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The run with the median epoch time, given the range of every run's figures
/// (`<key>_range`: `[min, max]`) for the keys the table shows.
fn median_run(mut runs: Vec<Value>) -> Value {
    for run in &mut runs {
        run["inference_gflops"] = serde_json::json!(
            number(run, "inference_share_of_peak") * number(run, "fma_peak_gflops")
        );
    }
    runs.sort_by(|a, b| {
        number(a, "projected_epoch_seconds").total_cmp(&number(b, "projected_epoch_seconds"))
    });
    let ranges: Vec<(String, Value)> = [
        "projected_epoch_seconds",
        "inference_images_per_second",
        "inference_gflops",
        "fma_peak_gflops",
    ]
    .iter()
    .map(|key| {
        let values = runs.iter().map(|r| number(r, key));
        let (low, high) = values.fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
        (format!("{key}_range"), serde_json::json!([low, high]))
    })
    .collect();
    let runs_count = runs.len();
    let mut median = runs.swap_remove(runs_count / 2);
    for (key, range) in ranges {
        median[key] = range;
    }
    median["runs"] = serde_json::json!(runs_count);
    median
}

/// Runs a command and parses the last line of its standard output as JSON.
pub(crate) fn json_line(command: &mut Command) -> Result<Value> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

fn number(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn table(rows: &[(String, Value, Vec<Value>)], args: &BenchArgs) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let mut out = format!(
        "Measured by `cargo xtask {command}` ({} training batches after {} of warm-up per case, \
         {} threads, {cpu}, {} UTC); ours: median (range) of {} runs, one process each.\n\n",
        args.batches,
        args.warmup,
        args.threads,
        rows.first()
            .and_then(|r| r.1["date"].as_str())
            .unwrap_or("unknown date"),
        args.repeat,
    );
    // The machine's peak is the highest any run read: a probe that shared a core with a
    // stray process reads low, and the peak itself does not change between runs.
    let peak = rows
        .iter()
        .map(|(_, ours, _)| {
            ours["fma_peak_gflops_range"][1]
                .as_f64()
                .unwrap_or(f64::NAN)
        })
        .fold(f64::NAN, f64::max);
    out += &format!(
        "The bound: an epoch's training FLOP (docs/benchmarks.md's rule) at this machine's \
         fused multiply-add peak, {peak:.0} GFLOP/s on {} threads (the highest any run's probe \
         read); x bound = our epoch / that bound (1 would be the hardware limit). Inference: \
         forward FLOP/s at batch 1000 as a share of the peak.\n\n",
        args.threads
    );
    out +=
        "| model | epoch GFLOP | bound s | epoch s (ours) | x bound | inference share of peak |\n";
    out += "| --- | --- | --- | --- | --- | --- |\n";
    for (model, ours, _) in rows {
        let bound = number(ours, "epoch_gflop") / peak;
        let range = |key: &str, scale: f64| {
            let r = &ours[format!("{key}_range")];
            let (low, high) = (
                r[0].as_f64().unwrap_or(f64::NAN),
                r[1].as_f64().unwrap_or(f64::NAN),
            );
            format!(
                "{:.2} ({:.2}-{:.2})",
                number(ours, key) * scale,
                low * scale,
                high * scale
            )
        };
        out += &format!(
            "| {model} | {:.0} | {bound:.2} | {} | {} | {} |\n",
            number(ours, "epoch_gflop"),
            range("projected_epoch_seconds", 1.0),
            range("projected_epoch_seconds", 1.0 / bound),
            range("inference_gflops", 1.0 / peak),
        );
    }
    out += "\n";
    let compared = rows.iter().any(|r| !r.2.is_empty());
    if compared {
        out += "Time ratio: our epoch seconds / theirs (below 1: we train faster). Throughput \
                ratio: our inference images/s / theirs (above 1: we infer faster).\n\n";
        out += "| model | batch | against | epoch s (ours) | epoch s (theirs) | time ratio | inference img/s (ours) | inference img/s (theirs) | throughput ratio | latency ms (ours / theirs) | peak RSS MB (ours / theirs) |\n";
        out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    } else {
        out += "| model | batch | train img/s | epoch s | inference img/s | latency ms | peak RSS MB |\n";
        out += "| --- | --- | --- | --- | --- | --- | --- |\n";
    }
    for (model, ours, peers) in rows {
        let batch = ours["batch_size"].as_u64().unwrap_or(0);
        for theirs in peers {
            out += &format!(
                "| {model} | {batch} | {} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} | {:.0} / {:.0} |\n",
                theirs["framework"].as_str().unwrap_or("?"),
                number(ours, "projected_epoch_seconds"),
                number(theirs, "projected_epoch_seconds"),
                number(ours, "projected_epoch_seconds") / number(theirs, "projected_epoch_seconds"),
                number(ours, "inference_images_per_second"),
                number(theirs, "inference_images_per_second"),
                number(ours, "inference_images_per_second")
                    / number(theirs, "inference_images_per_second"),
                number(ours, "latency_ms"),
                number(theirs, "latency_ms"),
                number(ours, "peak_rss_mb"),
                number(theirs, "peak_rss_mb"),
            );
        }
        if peers.is_empty() {
            out += &format!(
                "| {model} | {batch} | {:.0} | {:.1} | {:.0} | {:.3} | {:.0} |\n",
                number(ours, "train_images_per_second"),
                number(ours, "projected_epoch_seconds"),
                number(ours, "inference_images_per_second"),
                number(ours, "latency_ms"),
                number(ours, "peak_rss_mb"),
            );
        }
    }
    out
}
