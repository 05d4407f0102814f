//! `mnist`: train, evaluate and run CNNs on MNIST-style digits from the command line.

mod args;
mod progress;
mod train_command;

/// The process's allocator. With glibc's, each batch's multi-megabyte activations came from
/// fresh mmap pages, zeroed by the kernel on first touch; mimalloc keeps freed pages for the
/// next batch.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use mnist_data::{DataError, Dataset, LoadOptions, Normalization, Split, load_dir, load_split};
use ndarray::Array2;
use nn::{Mode, ModelSpec, Sequential, load_model, summary};

use crate::args::{
    BenchArgs, Cli, Command, EvaluateArgs, ExportArgs, ExportFormat, ModelChoice, PredictArgs,
    ServeArgs, SummaryArgs,
};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Train(args) => train_command::train(&args, &given_flags(&matches, "train")),
        Command::Evaluate(args) => evaluate_command(&args),
        Command::Predict(args) => predict(&args),
        Command::Summary(args) => summary_command(&args),
        Command::Bench(args) => bench_command(&args),
        Command::Export(args) => export_command(&args),
        Command::Serve(args) => serve_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the cause chain, never a backtrace: this is a message for a person.
            // Causes may quote untrusted text (a spec's field, a file's bytes): control
            // characters are escaped so that the message stays one line.
            eprintln!("error: {}", one_line(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}

/// The ids of the flags of `subcommand` given on the command line or through the environment
/// (not left at their defaults).
fn given_flags(matches: &clap::ArgMatches, subcommand: &str) -> HashSet<String> {
    let Some(matches) = matches.subcommand_matches(subcommand) else {
        return HashSet::new();
    };
    matches
        .ids()
        .filter(|id| {
            matches!(
                matches.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.as_str().to_string())
        .collect()
}

/// `text` with every control character escaped (`\n` as `\\n`), so it prints as one line.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Loads the test set alone (evaluation and prediction need no training images).
fn load_test_set(dir: &Path) -> Result<mnist_data::LabeledImages> {
    load_split(dir, Split::Test, &LoadOptions::default()).map_err(|e| explain_data_error(e, dir))
}

/// Loads the dataset, turning a missing one into instructions.
pub(crate) fn load_dataset(dir: &Path) -> Result<Dataset> {
    load_dir(dir, &LoadOptions::default()).map_err(|e| explain_data_error(e, dir))
}

/// A dataset error, with instructions when the files are missing.
fn explain_data_error(e: DataError, dir: &Path) -> anyhow::Error {
    match e {
        DataError::MissingFile { .. } => anyhow::Error::new(e).context(format!(
            "no dataset in {}: download MNIST into data/mnist with `cargo xtask fetch-data`, or \
             point --data-dir (or MNIST_DATA_DIR) at a directory in MNIST's layout",
            dir.display()
        )),
        other => anyhow::Error::new(other).context("cannot load the dataset"),
    }
}

/// The architecture named by `--model` or read from `--arch`.
pub(crate) fn resolve_spec(choice: &ModelChoice) -> Result<ModelSpec> {
    if let Some(path) = &choice.arch {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        // Checked whole here, before any data is loaded or any file written.
        let spec = ModelSpec::from_json(&json).with_context(|| format!("{}", path.display()))?;
        spec.plan().with_context(|| format!("{}", path.display()))?;
        return Ok(spec);
    }
    let name = choice.model.as_deref().unwrap_or("two-conv");
    nn::preset(name).with_context(|| {
        format!(
            "unknown model {name:?}: choose one of {}, or pass --arch <spec.json>",
            nn::PRESETS.join(", ")
        )
    })
}

/// Runs `work` on a thread of the worker pool and waits for it. From there, a kernel's parallel
/// loop starts at once and the other workers steal from it; called from outside the pool,
/// each loop would be sent to the pool while the caller sleeps until it is done, two thread
/// switches per loop (lenet5 trained at 25k images/s that way, 27.5-29k this way).
pub(crate) fn on_a_worker<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| work())
}

/// The number of cores, the default thread count.
pub(crate) fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sizes the worker pool every kernel runs on.
pub(crate) fn start_threads(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("cannot start the worker threads")
}

/// A model file and the normalization it was trained with.
pub(crate) fn open_model(path: &Path) -> Result<(Sequential, Normalization)> {
    cli::open_model(path).context("cannot load the model")
}

/// The most models `evaluate` averages: more is a typo, not an ensemble.
const MAX_ENSEMBLE: usize = 32;

fn evaluate_command(args: &EvaluateArgs) -> Result<()> {
    if args.model_file.len() > MAX_ENSEMBLE {
        bail!(
            "{} model files: an ensemble takes at most {MAX_ENSEMBLE}",
            args.model_file.len()
        );
    }
    let classes = LoadOptions::default().classes;
    let mut models = Vec::with_capacity(args.model_file.len());
    for file in &args.model_file {
        let (model, normalization) = open_model(file)?;
        let outputs = model.spec().plan()?.classes();
        if outputs != classes {
            bail!(
                "{}: the model gives {outputs} scores per image, but the dataset has {classes} \
                 classes",
                file.display()
            );
        }
        models.push((model, normalization));
    }
    let test = load_test_set(&args.data.data_dir)?;
    let mut members: Vec<_> = models.iter_mut().map(|(m, n)| (m, &*n)).collect();
    let result = on_a_worker(|| cli::evaluate_ensemble(&mut members, &test))?;
    if let Some(png) = &args.confusion_png {
        cli::confusion_heatmap(png, &result.confusion)?;
    }
    if let Some(png) = &args.misclassified {
        cli::mistakes_grid(png, &test, &result.mistakes)?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&result).context("cannot format the result")?
        );
        return Ok(());
    }
    let files: Vec<String> = args
        .model_file
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    let what = match files.as_slice() {
        [one] => one.clone(),
        many => format!("ensemble of {} ({})", many.len(), many.join(", ")),
    };
    println!(
        "{what} on {} test images: loss {:.4}, accuracy {:.4}\n",
        test.len(),
        result.loss,
        result.accuracy
    );
    print!("{}", result.report());
    Ok(())
}

/// One input of `predict`: what it is, the 28x28 image or why there is none, its label when
/// known.
type PredictInput = (String, Result<Array2<u8>, String>, Option<u8>);

fn predict(args: &PredictArgs) -> Result<()> {
    let (mut model, normalization) = open_model(&args.model_file)?;
    let mut inputs: Vec<PredictInput> = Vec::new();
    if args.images.is_empty() {
        let test = load_test_set(&args.data.data_dir)?;
        let n = test.len();
        let index = match (args.test_index, args.random) {
            (Some(i), _) if i < n => i,
            (Some(i), _) => {
                bail!("--test-index {i} is out of range: the test set has {n} images (0..{n})")
            }
            // Any image will do; the clock's nanoseconds pick one.
            (None, true) => {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as usize)
                    % n
            }
            (None, false) => {
                bail!("say which image: one or more image files, --test-index N or --random")
            }
        };
        inputs.push((
            format!("test image {index}"),
            Ok(test.image(index).to_owned()),
            Some(test.labels()[index]),
        ));
    } else {
        for path in image_files(&args.images)? {
            let image = if path.as_os_str() == "-" {
                read_stdin_image()
            } else {
                cli::load_digit(&path).map_err(|e| e.to_string())
            };
            let name = if path.as_os_str() == "-" {
                "standard input".to_string()
            } else {
                path.display().to_string()
            };
            // A decoding error names the file already; keep the message to the problem.
            let image = image.map_err(|e| {
                e.strip_prefix(&format!("{name}: "))
                    .map_or(e.clone(), str::to_string)
            });
            inputs.push((name, image, None));
        }
    }
    if let Some(png) = &args.save_image
        && let Some((_, Ok(image), _)) = inputs.iter().find(|(_, image, _)| image.is_ok())
    {
        save_png(png, image)?;
    }
    let mut results = Vec::new();
    let mut failed = 0;
    for (name, image, label) in &inputs {
        let image = match image {
            Ok(image) => image,
            // One image: its error is the command's, on one line.
            Err(problem) if inputs.len() == 1 && !args.json => bail!("{name}: {problem}"),
            Err(problem) => {
                failed += 1;
                if args.json {
                    results.push(serde_json::json!({"input": name, "error": problem}));
                } else {
                    eprintln!("error: {}", one_line(&format!("{name}: {problem}")));
                }
                continue;
            }
        };
        let (predicted, probabilities) = classify(&mut model, image, &normalization)?;
        if args.json {
            results.push(serde_json::json!({"input": name, "label": label, "predicted": predicted, "probabilities": probabilities}));
        } else {
            print_prediction(image, &probabilities, predicted, name, *label);
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Array(results));
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be read; the others were answered",
            inputs.len()
        );
    }
    Ok(())
}

/// The image files `paths` name: files as given, `-` for standard input, and every PNG or
/// JPEG of a directory (not its subdirectories), in name order.
fn image_files(paths: &[std::path::PathBuf]) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        if found.is_empty() {
            bail!(
                "{}: no PNG or JPEG images in this directory",
                path.display()
            );
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

/// An image read from standard input, at most [`cli::MAX_IMAGE_FILE_BYTES`].
fn read_stdin_image() -> Result<Array2<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::io::stdin()
        .take(cli::MAX_IMAGE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > cli::MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "more than the limit of {} bytes for an image",
            cli::MAX_IMAGE_FILE_BYTES
        ));
    }
    cli::decode_digit(&bytes)
}

/// The predicted class and every class's softmax probability for one image of bytes.
fn classify(
    model: &mut Sequential,
    image: &Array2<u8>,
    normalization: &Normalization,
) -> Result<(usize, Vec<f32>)> {
    let x = image
        .mapv(|p| normalization.apply(p))
        .into_shape_with_order((1, 1, image.nrows(), image.ncols()))?;
    let logits = model.forward(x, Mode::Eval)?;
    let predicted = nn::predictions(logits.view())[0];
    let mut p = Array2::zeros(logits.raw_dim());
    tensor::softmax(logits.view(), ndarray::Axis(1), p.view_mut())?;
    Ok((predicted, p.row(0).to_vec()))
}

fn print_prediction(
    image: &Array2<u8>,
    probabilities: &[f32],
    predicted: usize,
    name: &str,
    label: Option<u8>,
) {
    let mut ranked: Vec<(usize, f32)> = probabilities.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    print!("{}", progress::shade(image.view()));
    let truth = label.map(|l| format!(" (label {l})")).unwrap_or_default();
    println!("{name}{truth}: predicted {predicted}");
    for &(class, p) in ranked.iter().take(3) {
        println!(
            "  {class}  {:<30} {:6.2}%",
            "█".repeat((p * 30.0).round() as usize),
            p * 100.0
        );
    }
}

/// Writes a grayscale image as PNG, atomically.
fn save_png(path: &Path, image: &Array2<u8>) -> Result<()> {
    let (h, w) = image.dim();
    let gray = image::GrayImage::from_raw(w as u32, h as u32, image.iter().copied().collect())
        .context("image buffer of the wrong size")?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut bytes, image::ImageFormat::Png)
        .context("cannot encode the PNG")?;
    nn::write_atomically(path, bytes.get_ref())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn summary_command(args: &SummaryArgs) -> Result<()> {
    // A model file is loaded whole, so that a summary also vouches for the file; a spec is
    // only planned: its shapes and counts need no weights.
    let spec = match &args.model_file {
        Some(path) => load_model(path)
            .context("cannot load the model")?
            .0
            .spec()
            .clone(),
        None => resolve_spec(&args.model)?,
    };
    let table = if args.verbose {
        nn::detailed_summary(&spec, args.freeze)?
    } else {
        summary(&spec, args.freeze)?
    };
    print!("{table}");
    Ok(())
}

fn serve_command(args: &ServeArgs) -> Result<()> {
    let (model, normalization) = open_model(&args.model_file)?;
    let limits = serve::Limits {
        batch: serve::BatchPolicy {
            max_batch: args.max_batch,
            max_wait: std::time::Duration::from_millis(args.max_wait_ms),
            ..serve::BatchPolicy::default()
        },
        ..serve::Limits::default()
    };
    let test = args.data_dir.as_deref().map(load_test_set).transpose()?;
    let state =
        serve::AppState::with_test_set(model, normalization, &args.model_file, limits, test)
            .with_context(|| format!("cannot serve {}", args.model_file.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let address = std::net::SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let bound = listener.local_addr().context("no local address")?;
        println!(
            "serving {} at http://{bound}/ (Ctrl-C to stop)",
            args.model_file.display()
        );
        // Ctrl-C stops accepting; requests in flight finish.
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        serve::serve(listener, state, shutdown)
            .await
            .context("the server stopped")
    })?;
    println!("stopped");
    Ok(())
}

fn export_command(args: &ExportArgs) -> Result<()> {
    let (model, info) = load_model(&args.model_file).context("cannot load the model")?;
    match args.format {
        ExportFormat::Onnx => onnx_export::write_onnx(&args.output, &model, &info)
            .with_context(|| format!("cannot export {}", args.model_file.display()))?,
    }
    println!(
        "{} -> {} (ONNX opset {}, IR version {}): input \"{}\" [N, {}] float32 pixels in 0..1; \
         outputs \"{}\" and \"{}\"",
        args.model_file.display(),
        args.output.display(),
        onnx_export::OPSET,
        onnx_export::IR_VERSION,
        onnx_export::INPUT,
        model
            .spec()
            .input
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        onnx_export::LOGITS,
        onnx_export::PROBABILITIES,
    );
    Ok(())
}

fn bench_command(args: &BenchArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(all_cores);
    start_threads(threads)?;
    let mut case = match &args.arch {
        Some(path) => {
            let choice = ModelChoice {
                model: None,
                arch: Some(path.clone()),
            };
            let spec = resolve_spec(&choice)?;
            cli::BenchCase {
                model: spec.name.clone(),
                spec,
                rule: nn::Rule::adam(),
                learning_rate: 1e-3,
                batch_size: 64,
            }
        }
        None => cli::bench_cases()?
            .into_iter()
            .find(|c| c.model == args.model)
            .with_context(|| {
                format!(
                    "no benchmark for {:?}: choose two-conv, lenet5, one-conv or bn-cnn, \
                         or pass --arch <spec.json>",
                    args.model
                )
            })?,
    };
    if let Some(batch_size) = args.batch_size {
        case.batch_size = batch_size;
    }
    let data = load_dataset(&args.data.data_dir)?;
    let normalization = Normalization::fit(&data.train);
    let result = on_a_worker(|| {
        cli::bench(
            &case,
            &data.train,
            &data.test,
            &normalization,
            args.warmup,
            args.batches,
            args.profile,
        )
    })?;
    let peak = cli::peak_rss_mb();
    if args.json {
        let mut value = serde_json::to_value(&result).context("cannot format the result")?;
        value["peak_rss_mb"] = serde_json::json!(peak);
        value["threads"] = serde_json::json!(threads);
        value["date"] = serde_json::json!(cli::utc_timestamp());
        if let Some(rows) = &result.profile {
            value["profile_table"] = serde_json::json!(cli::profile_table(rows));
        }
        println!("{value}");
    } else {
        println!(
            "{}: train {:.0} images/s (epoch of 60,000: {:.1} s), inference {:.0} images/s, latency {:.3} ms, peak RSS {}",
            result.model,
            result.train_images_per_second,
            result.projected_epoch_seconds,
            result.inference_images_per_second,
            result.latency_ms,
            peak.map_or("unknown".into(), |mb| format!("{mb:.0} MB"))
        );
        println!(
            "FMA peak {:.0} GFLOP/s on {threads} thread(s): an epoch's {:.0} GFLOP take at least \
             {:.2} s, so training runs at {:.2}x the bound; inference uses {:.0}% of the peak",
            result.fma_peak_gflops,
            result.epoch_gflop,
            result.epoch_bound_seconds,
            result.epoch_bound_multiple,
            100.0 * result.inference_share_of_peak
        );
        if let Some(rows) = &result.profile {
            println!("\n{}", cli::profile_table(rows));
        }
    }
    Ok(())
}
