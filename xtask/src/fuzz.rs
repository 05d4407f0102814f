//! `cargo xtask fuzz-files`: thousands of mutated model files, specs, images and data
//! directories through the release `mnist` binary, each run under a memory limit and a time
//! limit. Every run must exit 0 (the mutation was harmless) or 1 with one line naming the input
//! and the problem: never a panic (101), an abort or another signal, a timeout, or a message of
//! several lines. Mutations are derived from `--seed` and the case number alone, so a failure
//! is reproduced by its case number.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde_json::Value;

/// Arguments of `cargo xtask fuzz-files`.
#[derive(clap::Args)]
pub struct FuzzArgs {
    /// A trained model file, the seed of the model-file mutations (e.g. a run's final.safetensors).
    #[arg(long)]
    model_file: PathBuf,
    /// The dataset whose test files seed the data-directory mutations.
    #[arg(long, default_value = "data/mnist")]
    data_dir: PathBuf,
    /// Mutated model files (each through `predict`; every 20th through `evaluate` too).
    #[arg(long, default_value_t = 10_000)]
    model_files: usize,
    /// Mutated architecture specs (through `summary --arch`).
    #[arg(long, default_value_t = 1_000)]
    specs: usize,
    /// Mutated PNG and JPEG images (through `predict`).
    #[arg(long, default_value_t = 1_000)]
    images: usize,
    /// Mutated data directories (through `evaluate`).
    #[arg(long, default_value_t = 500)]
    data_dirs: usize,
    /// Seed of every mutation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Address-space limit of each run (RLIMIT_AS), in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_limit_mb: u64,
    /// Wall-time limit of each run, in seconds.
    #[arg(long, default_value_t = 10)]
    time_limit: u64,
    /// Also keep the first refused mutants of each kind, with the message each produced, as a
    /// regression corpus in this directory (crates/cli/tests/corpus; use a small model file, and
    /// the data-directory mutants are made from the first 100 test images).
    #[arg(long)]
    write_corpus: Option<PathBuf>,
    /// Mutants of each kind the corpus keeps.
    #[arg(long, default_value_t = 60)]
    corpus_per_kind: usize,
}

/// One kind of input and how many mutants of it to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    ModelFile,
    Spec,
    Image,
    DataDir,
}

/// What one run showed.
struct Outcome {
    kind: Kind,
    case: usize,
    code: Option<i32>,
    wall: Duration,
    problem: Option<String>,
    /// The command line, and the one-line message of a refusal.
    command: Vec<String>,
    message: String,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    // Built beforehand, not from here: the peak memory reported is the largest of this
    // process's children, and a compiler run among them would be the largest.
    let binary = std::fs::canonicalize("target/release/mnist")
        .context("target/release/mnist: run `cargo build --release -p cli` first")?;
    if Command::new("prlimit").arg("--version").output().is_err() {
        bail!("prlimit (util-linux) is needed to limit each run's memory");
    }
    let seeds = Seeds::new(&args)?;
    if let Some(corpus) = &args.write_corpus {
        // A new corpus: the model and the digit its commands read, then the mutants.
        let _ = std::fs::remove_dir_all(corpus);
        std::fs::create_dir_all(corpus)?;
        std::fs::copy(&seeds.good_model, corpus.join("model.safetensors"))?;
        std::fs::write(corpus.join("digit.png"), &seeds.png)?;
    }
    let work = tempfile::tempdir().context("cannot make a scratch directory")?;
    let mut cases: Vec<(Kind, usize)> = Vec::new();
    for (kind, count) in [
        (Kind::ModelFile, args.model_files),
        (Kind::Spec, args.specs),
        (Kind::Image, args.images),
        (Kind::DataDir, args.data_dirs),
    ] {
        cases.extend((0..count).map(|case| (kind, case)));
    }
    // `cargo run` replaces itself with this program, so children cargo waited for (a
    // compiler) count in this process's children's peak: note it, to tell the runs' apart.
    let inherited_peak = peak_child_rss_kib();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::with_capacity(cases.len()));
    let started = Instant::now();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (cases, next, outcomes, seeds, args, binary) =
                (&cases, &next, &outcomes, &seeds, &args, &binary);
            let dir = work.path().join(format!("worker{worker}"));
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(kind, case)) = cases.get(i) else {
                        break;
                    };
                    let outcome = run_case(kind, case, &dir, seeds, args, binary);
                    if let Ok(mut all) = outcomes.lock() {
                        all.push(outcome);
                        if all.len().is_multiple_of(1000) {
                            eprintln!("{} of {} runs", all.len(), cases.len());
                        }
                    }
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap_or_default();
    if let Some(corpus) = &args.write_corpus {
        // Workers appended in the order they finished: sort, so the file is the same each time.
        let path = corpus.join("expected.tsv");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        std::fs::write(&path, lines.join("\n") + "\n")?;
    }
    report(&outcomes, &args, started.elapsed(), inherited_peak)
}

/// The valid inputs every mutation starts from.
struct Seeds {
    model: Vec<u8>,
    good_model: PathBuf,
    spec: String,
    png: Vec<u8>,
    jpeg: Vec<u8>,
    test_images: Vec<u8>,
    test_labels: Vec<u8>,
    seed: u64,
}

impl Seeds {
    fn new(args: &FuzzArgs) -> Result<Seeds> {
        let good_model = std::fs::canonicalize(&args.model_file)
            .with_context(|| format!("cannot read {}", args.model_file.display()))?;
        let model = std::fs::read(&good_model)?;
        let (header, _) = split_safetensors(&model).context("the model file is not safetensors")?;
        let spec = header["__metadata__"]["spec"]
            .as_str()
            .context("the model file has no spec")?
            .to_string();
        let read = |name: &str| {
            let path = args.data_dir.join(name);
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
        };
        // A thick "7", dark on light paper, the kind of picture a user takes.
        let digit = image::GrayImage::from_fn(120, 160, |x, y| {
            let stroke =
                (20..140).contains(&y) && (x as i64 - (100 - (y as i64 - 20) / 2)).abs() < 9;
            let bar = (20..34).contains(&y) && (15..105).contains(&x);
            image::Luma([if stroke || bar { 30 } else { 220 }])
        });
        let mut png = std::io::Cursor::new(Vec::new());
        digit.write_to(&mut png, image::ImageFormat::Png)?;
        let mut jpeg = std::io::Cursor::new(Vec::new());
        digit.write_to(&mut jpeg, image::ImageFormat::Jpeg)?;
        let (mut test_images, mut test_labels) = (
            read("t10k-images-idx3-ubyte.gz")?,
            read("t10k-labels-idx1-ubyte.gz")?,
        );
        if args.write_corpus.is_some() {
            // Small enough to commit: the first 100 test images.
            test_images = first_items(&test_images, 16, 784, 100)?;
            test_labels = first_items(&test_labels, 8, 1, 100)?;
        }
        Ok(Seeds {
            model,
            good_model,
            spec,
            png: png.into_inner(),
            jpeg: jpeg.into_inner(),
            test_images,
            test_labels,
            seed: args.seed,
        })
    }

    /// The generator of one case, independent of every other case and of the run order.
    fn rng(&self, kind: Kind, case: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(kind as u64 * (1 << 32) + case as u64);
        rng
    }
}

/// The first `count` items of a gzip-compressed IDX file whose header is `header` bytes long
/// (count at bytes 4..8) and whose items are `item` bytes, gzip-compressed again.
fn first_items(gz: &[u8], header: usize, item: usize, count: u32) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz).read_to_end(&mut raw)?;
    let end = header + item * count as usize;
    if raw.len() < end {
        bail!("the test set has fewer than {count} items");
    }
    raw.truncate(end);
    raw[4..8].copy_from_slice(&count.to_be_bytes());
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&raw)?;
    Ok(encoder.finish()?)
}

/// Writes one mutant, runs the binary on it, and judges the run.
fn run_case(
    kind: Kind,
    case: usize,
    dir: &Path,
    seeds: &Seeds,
    args: &FuzzArgs,
    binary: &Path,
) -> Outcome {
    let mut rng = seeds.rng(kind, case);
    let _ = std::fs::remove_dir_all(dir);
    let prepared = std::fs::create_dir_all(dir).and_then(|()| {
        let good = seeds.good_model.to_string_lossy().into_owned();
        Ok(match kind {
            Kind::ModelFile => {
                let path = dir.join(format!("model-{case}.safetensors"));
                std::fs::write(&path, mutate_model(&seeds.model, &mut rng))?;
                let file = path.to_string_lossy().into_owned();
                let mut runs = vec![(
                    vec![
                        "predict".into(),
                        "--model-file".into(),
                        file.clone(),
                        write_png(dir, seeds)?,
                    ],
                    file.clone(),
                )];
                if case.is_multiple_of(20) {
                    let data = args.data_dir.to_string_lossy().into_owned();
                    runs.push((
                        vec![
                            "evaluate".into(),
                            "--model-file".into(),
                            file.clone(),
                            "--data-dir".into(),
                            data,
                        ],
                        file,
                    ));
                }
                runs
            }
            Kind::Spec => {
                let path = dir.join(format!("spec-{case}.json"));
                std::fs::write(&path, mutate_json_text(&seeds.spec, &mut rng))?;
                let file = path.to_string_lossy().into_owned();
                vec![(vec!["summary".into(), "--arch".into(), file.clone()], file)]
            }
            Kind::Image => {
                let (seed, ext) = if case.is_multiple_of(2) {
                    (&seeds.png, "png")
                } else {
                    (&seeds.jpeg, "jpg")
                };
                let path = dir.join(format!("image-{case}.{ext}"));
                std::fs::write(&path, mutate_bytes(seed, &mut rng))?;
                let file = path.to_string_lossy().into_owned();
                vec![(
                    vec!["predict".into(), "--model-file".into(), good, file.clone()],
                    file,
                )]
            }
            Kind::DataDir => {
                let data = dir.join(format!("data-{case}"));
                std::fs::create_dir_all(&data)?;
                let (images, labels) = mutate_data(seeds, &mut rng);
                std::fs::write(data.join("t10k-images-idx3-ubyte.gz"), images)?;
                std::fs::write(data.join("t10k-labels-idx1-ubyte.gz"), labels)?;
                let data = data.to_string_lossy().into_owned();
                vec![(
                    vec![
                        "evaluate".into(),
                        "--model-file".into(),
                        good,
                        "--data-dir".into(),
                        data.clone(),
                    ],
                    data,
                )]
            }
        })
    });
    let runs = match prepared {
        Ok(runs) => runs,
        Err(e) => {
            return Outcome {
                kind,
                case,
                code: None,
                wall: Duration::ZERO,
                problem: Some(format!("could not write the mutant: {e}")),
                command: Vec::new(),
                message: String::new(),
            };
        }
    };
    let mut last = None;
    for (command, named) in runs {
        let outcome = run_binary(binary, &command, &named, args, kind, case);
        let failed = outcome.problem.is_some();
        last = Some(outcome);
        if failed {
            break;
        }
    }
    let outcome = last.unwrap_or(Outcome {
        kind,
        case,
        code: None,
        wall: Duration::ZERO,
        problem: Some("no command".into()),
        command: Vec::new(),
        message: String::new(),
    });
    if let Some(corpus) = &args.write_corpus
        && case < args.corpus_per_kind
        && outcome.problem.is_none()
        && outcome.code == Some(1)
        && let Err(e) = keep_in_corpus(corpus, &outcome, dir, seeds)
    {
        eprintln!("cannot add {kind:?} case {case} to the corpus: {e}");
    }
    outcome
}

/// Copies a refused mutant into the corpus and appends its line to `expected.tsv`: the input,
/// the command with `{input}`, `{model}` and `{digit}` in place of the paths, and the message
/// with `{input}` in place of the input's path.
fn keep_in_corpus(corpus: &Path, outcome: &Outcome, dir: &Path, seeds: &Seeds) -> Result<()> {
    let Some(input) = outcome
        .command
        .iter()
        .find(|a| Path::new(a).starts_with(dir) && !a.ends_with("digit.png"))
    else {
        return Ok(());
    };
    let name = Path::new(input)
        .file_name()
        .context("no file name")?
        .to_string_lossy()
        .into_owned();
    let target = corpus.join(&name);
    if Path::new(input).is_dir() {
        std::fs::create_dir_all(&target)?;
        for entry in std::fs::read_dir(input)? {
            let entry = entry?;
            std::fs::copy(entry.path(), target.join(entry.file_name()))?;
        }
    } else {
        std::fs::copy(input, &target)?;
    }
    let model = seeds.good_model.to_string_lossy();
    let digit = dir.join("digit.png");
    let command: Vec<String> = outcome
        .command
        .iter()
        .map(|a| {
            if a == input {
                "{input}".to_string()
            } else if *a == model {
                "{model}".to_string()
            } else if Path::new(a) == digit {
                "{digit}".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let message = outcome.message.replace(input.as_str(), "{input}");
    let line = format!("{name}\t{}\t{message}\n", command.join(" "));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(corpus.join("expected.tsv"))?;
    file.write_all(line.as_bytes())?;
    Ok(())
}

/// A valid PNG for `predict` to read beside a mutated model.
fn write_png(dir: &Path, seeds: &Seeds) -> std::io::Result<String> {
    let path = dir.join("digit.png");
    std::fs::write(&path, &seeds.png)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Runs `mnist <command>` under the limits; a refusal must be one line naming `named`.
fn run_binary(
    binary: &Path,
    command: &[String],
    named: &str,
    args: &FuzzArgs,
    kind: Kind,
    case: usize,
) -> Outcome {
    let started = Instant::now();
    let limit = format!("--as={}", args.memory_limit_mb << 20);
    let child = Command::new("prlimit")
        .arg(limit)
        .arg("--")
        .arg(binary)
        .args(command)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut outcome = Outcome {
        kind,
        case,
        code: None,
        wall: Duration::ZERO,
        problem: None,
        command: command.to_vec(),
        message: String::new(),
    };
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            outcome.problem = Some(format!("cannot start: {e}"));
            return outcome;
        }
    };
    // Read standard error on a thread, so a chatty child cannot block on a full pipe.
    let mut stderr_pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr_pipe.as_mut() {
            let _ = pipe.take(1 << 20).read_to_string(&mut text);
        }
        text
    });
    let deadline = started + Duration::from_secs(args.time_limit);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => break None,
        }
    };
    outcome.wall = started.elapsed();
    let stderr = reader.join().unwrap_or_default();
    let line = stderr.trim_end();
    outcome.message = line.to_string();
    outcome.problem = match status {
        None => Some(format!("killed after {} s", args.time_limit)),
        Some(status) => {
            outcome.code = status.code();
            match status.code() {
                Some(0) => None,
                Some(1) if line.lines().count() != 1 => {
                    Some(format!("refused in {} lines: {line}", line.lines().count()))
                }
                Some(1) if !line.starts_with("error: ") || !line.contains(named) => {
                    Some(format!("the message does not name {named}: {line}"))
                }
                Some(1) => None,
                Some(code) => Some(format!("exit code {code}: {line}")),
                None => Some(format!("ended by a signal ({status}): {line}")),
            }
        }
    };
    if let Some(problem) = &mut outcome.problem {
        *problem = format!("mnist {}: {problem}", command.join(" "));
    }
    outcome
}

fn report(
    outcomes: &[Outcome],
    args: &FuzzArgs,
    elapsed: Duration,
    inherited_peak: i64,
) -> Result<()> {
    println!(
        "cargo xtask fuzz-files --seed {} (each run: at most {} MiB of address space, {} s)",
        args.seed, args.memory_limit_mb, args.time_limit
    );
    println!(
        "| inputs | runs | accepted (exit 0) | refused (exit 1, one line) | failures | slowest run |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for kind in [Kind::ModelFile, Kind::Spec, Kind::Image, Kind::DataDir] {
        let of_kind: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
        let failures = of_kind.iter().filter(|o| o.problem.is_some()).count();
        let accepted = of_kind
            .iter()
            .filter(|o| o.problem.is_none() && o.code == Some(0))
            .count();
        let refused = of_kind
            .iter()
            .filter(|o| o.problem.is_none() && o.code == Some(1))
            .count();
        let slowest = of_kind.iter().map(|o| o.wall).max().unwrap_or_default();
        println!(
            "| {kind:?} | {} | {accepted} | {refused} | {failures} | {:.2} s |",
            of_kind.len(),
            slowest.as_secs_f64()
        );
    }
    let peak = peak_child_rss_kib();
    if peak > inherited_peak {
        println!(
            "largest peak memory of any run: {} MiB; all {} runs in {:.0} s",
            peak / 1024,
            outcomes.len(),
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "largest peak memory of any run: at most {} MiB, a compiler's that cargo ran before \
             this process (run target/debug/xtask directly for the runs' own); all {} runs in \
             {:.0} s",
            peak / 1024,
            outcomes.len(),
            elapsed.as_secs_f64()
        );
    }
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.problem.is_some()).collect();
    for o in failures.iter().take(20) {
        println!(
            "FAILED {:?} case {}: {}",
            o.kind,
            o.case,
            o.problem.as_deref().unwrap_or("")
        );
    }
    if !failures.is_empty() {
        bail!("{} of {} runs failed", failures.len(), outcomes.len());
    }
    Ok(())
}

/// The largest peak resident set of any child process that has ended, in KiB (getrusage's
/// RUSAGE_CHILDREN: the maximum over all of them, not the sum).
#[allow(unsafe_code)]
fn peak_child_rss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points to
    // one; on failure (it has none for RUSAGE_CHILDREN) the zeroed value is read.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_maxrss
}

// ---- Mutations ----

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// Numbers a hostile editor puts into a file: zero, negatives, the edges of 32 and 64 bits,
/// very large and fractional values.
const HOSTILE: [&str; 14] = [
    "0",
    "-1",
    "1",
    "3",
    "1e9",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "1e300",
    "0.5",
    "NaN",
    "10000",
];

/// Raw byte mutations: bit flips, overwritten runs, cuts, insertions, duplicated slices.
fn mutate_bytes(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + below(rng, 4) {
        if bytes.is_empty() {
            break;
        }
        // Half the time near the start, where the headers are.
        let span = if rng.next_u64().is_multiple_of(2) {
            bytes.len().min(256)
        } else {
            bytes.len()
        };
        let at = below(rng, span);
        match below(rng, 6) {
            0 => bytes[at] ^= 1 << below(rng, 8),
            1 => {
                let end = (at + 1 + below(rng, 64)).min(bytes.len());
                let fill = if rng.next_u64().is_multiple_of(2) {
                    0xff
                } else {
                    0
                };
                bytes[at..end].fill(fill);
            }
            2 => bytes.truncate(at),
            3 => {
                let extra: Vec<u8> = (0..1 + below(rng, 32))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                bytes.splice(at..at, extra);
            }
            4 => {
                let end = (at + 1 + below(rng, 4096)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => bytes[at] = rng.next_u64() as u8,
        }
    }
    bytes
}

/// A JSON text with one of its values replaced: a number by a hostile number, a string by
/// another, an array emptied or lengthened, or a key removed; sometimes raw byte mutations.
fn mutate_json_text(text: &str, rng: &mut ChaCha8Rng) -> String {
    if rng.next_u64().is_multiple_of(8) {
        return String::from_utf8_lossy(&mutate_bytes(text.as_bytes(), rng)).into_owned();
    }
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        return text.to_string();
    };
    for _ in 0..1 + below(rng, 3) {
        let count = count_values(&value);
        let target = below(rng, count);
        let choice = below(rng, 6);
        let hostile = HOSTILE[below(rng, HOSTILE.len())];
        edit_value(&mut value, target, &mut 0, &mut |v| match v {
            Value::Number(_) | Value::Bool(_) | Value::Null => {
                *v = serde_json::from_str(hostile).unwrap_or(Value::String(hostile.into()));
            }
            Value::String(s) => {
                *s = match choice {
                    0 => "a/../../../x".into(),
                    1 => "Conv3d".into(),
                    2 => "x\ny".into(),
                    3 => "".into(),
                    4 => "y".repeat(10_000),
                    _ => hostile.into(),
                }
            }
            Value::Array(items) => match choice {
                0 | 1 => items.clear(),
                2 | 3 => {
                    if let Some(first) = items.first().cloned() {
                        items.extend(std::iter::repeat_n(first, 1 + choice * 300));
                    }
                }
                _ => items.reverse(),
            },
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                if !keys.is_empty() {
                    map.remove(&keys[choice % keys.len()]);
                }
            }
        });
    }
    value.to_string()
}

fn count_values(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_values).sum(),
        Value::Object(map) => map.values().map(count_values).sum(),
        _ => 0,
    }
}

/// Applies `edit` to the `target`-th value in document order.
fn edit_value(
    value: &mut Value,
    target: usize,
    seen: &mut usize,
    edit: &mut dyn FnMut(&mut Value),
) {
    if *seen == target {
        *seen += 1;
        edit(value);
        return;
    }
    *seen += 1;
    match value {
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| edit_value(v, target, seen, edit)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|v| edit_value(v, target, seen, edit)),
        _ => {}
    }
}

/// A safetensors file's header as JSON, and its data bytes.
fn split_safetensors(bytes: &[u8]) -> Option<(Value, &[u8])> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, &bytes[8 + n..]))
}

fn join_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A model file with its bytes, its header (shapes, offsets, dtypes, metadata) or its embedded
/// spec mutated.
fn mutate_model(seed: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let Some((mut header, data)) = split_safetensors(seed) else {
        return mutate_bytes(seed, rng);
    };
    match below(rng, 4) {
        0 => mutate_bytes(seed, rng),
        1 => {
            // The spec: the case the issue measured (huge numbers in the architecture).
            let spec = header["__metadata__"]["spec"]
                .as_str()
                .unwrap_or("{}")
                .to_string();
            header["__metadata__"]["spec"] = mutate_json_text(&spec, rng).into();
            join_safetensors(&header.to_string(), data)
        }
        2 => join_safetensors(&mutate_json_text(&header.to_string(), rng), data),
        _ => {
            // Other metadata: normalization, version, hash, format.
            let key = [
                "normalization",
                "format_version",
                "tensors_sha256",
                "format",
                "training",
            ][below(rng, 5)];
            let value = header["__metadata__"][key]
                .as_str()
                .unwrap_or("")
                .to_string();
            header["__metadata__"][key] = if value.starts_with('{') {
                mutate_json_text(&value, rng).into()
            } else {
                HOSTILE[below(rng, HOSTILE.len())].into()
            };
            join_safetensors(&header.to_string(), data)
        }
    }
}

/// The test images and labels, one of them mutated: its gzip bytes, or its IDX bytes inside a
/// valid gzip stream (header sizes, element type, data), or swapped with the other.
fn mutate_data(seeds: &Seeds, rng: &mut ChaCha8Rng) -> (Vec<u8>, Vec<u8>) {
    let (mut images, mut labels) = (seeds.test_images.clone(), seeds.test_labels.clone());
    let target = if rng.next_u64().is_multiple_of(2) {
        &mut images
    } else {
        &mut labels
    };
    match below(rng, 4) {
        0 => *target = mutate_bytes(target, rng),
        3 => std::mem::swap(&mut images, &mut labels),
        _ => {
            let mut raw = Vec::new();
            let _ = flate2::read::GzDecoder::new(target.as_slice()).read_to_end(&mut raw);
            if raw.len() >= 8 && rng.next_u64().is_multiple_of(2) {
                // A header size: one u32 among the dimensions, set to an edge value.
                let dims = usize::from(raw[3]).min((raw.len() - 4) / 4).max(1);
                let at = 4 + 4 * below(rng, dims);
                let value: u32 = [0, 1, 255, 65_535, 10_001, u32::MAX, 1 << 31][below(rng, 7)];
                raw[at..at + 4].copy_from_slice(&value.to_be_bytes());
            } else {
                raw = mutate_bytes(&raw, rng);
            }
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = encoder.write_all(&raw);
            *target = encoder.finish().unwrap_or_default();
        }
    }
    (images, labels)
}
