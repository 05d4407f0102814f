//! `cargo xtask serve-bench`: predictions per second, median and 99th-percentile latency and
//! errors of `mnist serve` under `oha`, for 1, 16 and 64 keep-alive clients, with JSON pixels
//! and PNG bodies; beside it, where `BENCH_PYTHON` has torch, fastapi and uvicorn, the server a
//! PyTorch user would write (`xtask/serve_torch.py`), loaded the same way in the same run.
//! Client and server share this machine: the figures are for both together.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Arguments of `cargo xtask serve-bench`.
#[derive(clap::Args)]
pub struct ServeBenchArgs {
    /// The model file to serve (e.g. a run's final.safetensors).
    #[arg(long)]
    model_file: PathBuf,
    /// The dataset whose first test image is the request body.
    #[arg(long, default_value = "data/mnist")]
    data_dir: PathBuf,
    /// Seconds of load per case.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Write the table into docs/benchmarks.md (between its `cargo xtask serve-bench` markers).
    #[arg(long)]
    write: bool,
}

const BEGIN: &str = "<!-- cargo xtask serve-bench: begin -->";
const END: &str = "<!-- cargo xtask serve-bench: end -->";
const CLIENTS: [usize; 3] = [1, 16, 64];

/// A server process, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One load run's result.
struct Row {
    server: &'static str,
    body: &'static str,
    clients: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

pub fn run(args: ServeBenchArgs) -> Result<()> {
    if Command::new("oha").arg("--version").output().is_err() {
        bail!("oha is not installed: cargo install oha");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "cli"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p cli failed");
    }
    let scratch = tempfile::tempdir()?;
    let bodies = bodies(&args.data_dir, scratch.path())?;
    let mut rows = Vec::new();

    rows.extend(measure("mnist serve", &bodies, args.seconds, |port| {
        let mut command = Command::new("target/release/mnist");
        command
            .args(["serve", "--port", &port.to_string(), "--model-file"])
            .arg(&args.model_file);
        command
    })?);
    match python_with_torch() {
        Some(python) => rows.extend(measure(
            "FastAPI + PyTorch",
            &bodies,
            args.seconds,
            |port| {
                let mut command = Command::new(&python);
                command
                    .arg("xtask/serve_torch.py")
                    .arg(&args.model_file)
                    .arg(port.to_string());
                command
            },
        )?),
        None => eprintln!(
            "no BENCH_PYTHON with torch, fastapi and uvicorn: measuring mnist serve alone"
        ),
    }
    let table = table(&rows, &args);
    println!("{table}");
    if args.write {
        write_table(&table)?;
    }
    Ok(())
}

/// Starts the server `command` makes for a free port, loads it with every body and client
/// count, and stops it.
fn measure(
    server: &'static str,
    bodies: &[(&'static str, &'static str, PathBuf)],
    seconds: u64,
    command: impl FnOnce(u16) -> Command,
) -> Result<Vec<Row>> {
    let port = free_port()?;
    let _running = Server(
        command(port)
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {server}"))?,
    );
    wait_for(port)?;
    let mut rows = Vec::new();
    for (body, content_type, file) in bodies {
        for clients in CLIENTS {
            rows.push(load(
                server,
                body,
                content_type,
                file,
                clients,
                port,
                seconds,
            )?);
        }
    }
    Ok(rows)
}

/// The JSON and PNG request bodies of the first test image, as files for oha.
fn bodies(data_dir: &Path, dir: &Path) -> Result<Vec<(&'static str, &'static str, PathBuf)>> {
    let path = data_dir.join("t10k-images-idx3-ubyte.gz");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .read_to_end(&mut raw)
    .with_context(|| format!("cannot decompress {}", path.display()))?;
    let pixels = raw.get(16..16 + 784).context("no test image")?.to_vec();
    let json = dir.join("pixels.json");
    std::fs::write(&json, serde_json::json!({"pixels": pixels}).to_string())?;
    let image = image::GrayImage::from_raw(28, 28, pixels).context("28x28")?;
    let png = dir.join("digit.png");
    image.save(&png)?;
    Ok(vec![
        ("JSON pixels", "application/json", json),
        ("PNG", "image/png", png),
    ])
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until the server on `port` answers `/healthz`.
fn wait_for(port: u16) -> Result<()> {
    let started = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    while agent
        .get(&format!("http://127.0.0.1:{port}/healthz"))
        .call()
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the server on port {port} did not answer within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `seconds` of oha with `clients` keep-alive connections posting `file`.
fn load(
    server: &'static str,
    body: &'static str,
    content_type: &str,
    file: &Path,
    clients: usize,
    port: u16,
    seconds: u64,
) -> Result<Row> {
    let output = Command::new("oha")
        .args(["-z", &format!("{seconds}s"), "-c", &clients.to_string()])
        .args(["-m", "POST", "-T", content_type, "-D"])
        .arg(file)
        .args(["--no-tui", "--output-format", "json"])
        .arg(format!("http://127.0.0.1:{port}/api/predict"))
        .output()
        .context("cannot run oha")?;
    let report: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("oha: {}", String::from_utf8_lossy(&output.stderr)))?;
    let ok = report["statusCodeDistribution"]["200"]
        .as_u64()
        .unwrap_or(0);
    let statuses: u64 = report["statusCodeDistribution"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    // Requests cut off when the run's time is up are not the server's errors.
    let errors: u64 = report["errorDistribution"].as_object().map_or(0, |m| {
        m.iter()
            .filter(|(k, _)| !k.contains("deadline"))
            .filter_map(|(_, v)| v.as_u64())
            .sum()
    });
    let seconds_run = report["summary"]["total"].as_f64().unwrap_or(1.0);
    Ok(Row {
        server,
        body,
        clients,
        per_second: ok as f64 / seconds_run,
        p50_ms: report["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1e3,
        p99_ms: report["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1e3,
        errors: errors + (statuses - ok),
    })
}

fn python_with_torch() -> Option<String> {
    let python = std::env::var("BENCH_PYTHON").ok()?;
    Command::new(&python)
        .args(["-c", "import torch, fastapi, uvicorn, safetensors, PIL"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| python)
}

fn table(rows: &[Row], args: &ServeBenchArgs) -> String {
    let mut out = format!(
        "Measured by `cargo xtask serve-bench --model-file {} --seconds {}` on {} ({} cores; \
         oha and the server share them).\n\n\
         | server | body | clients | predictions/s | p50 ms | p99 ms | errors | vs FastAPI + PyTorch |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        args.model_file.display(),
        args.seconds,
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    for row in rows {
        let peer = rows
            .iter()
            .find(|r| r.server != row.server && r.body == row.body && r.clients == row.clients);
        let ratio = match peer {
            Some(peer) if row.server == "mnist serve" && peer.per_second > 0.0 => {
                format!("{:.1}x", row.per_second / peer.per_second)
            }
            _ => String::new(),
        };
        out += &format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {ratio} |\n",
            row.server, row.body, row.clients, row.per_second, row.p50_ms, row.p99_ms, row.errors
        );
    }
    out
}

fn write_table(table: &str) -> Result<()> {
    let path = Path::new("docs/benchmarks.md");
    let doc = std::fs::read_to_string(path).context("cannot read docs/benchmarks.md")?;
    let section = format!("{BEGIN}\n{table}{END}");
    let doc = match (doc.find(BEGIN), doc.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &doc[..a], &doc[b + END.len()..]),
        _ => format!("{doc}\n## Serving (`cargo xtask serve-bench`)\n\n{section}\n"),
    };
    std::fs::write(path, doc).context("cannot write docs/benchmarks.md")
}
