//! Command-line arguments. Impossible values are refused by the parser, with one line that
//! says what is wrong, before any work starts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::{AugmentConfig, ReduceLrConfig};
use nn::{Rule, Schedule};

/// Train and run convolutional networks on MNIST-style digit images.
#[derive(Parser)]
#[command(name = "mnist", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a model; writes a run directory with the model files, history and log.
    Train(Box<TrainArgs>),
    /// Evaluate a model file on the test set: accuracy, per-class metrics, confusion matrix.
    Evaluate(EvaluateArgs),
    /// Predict the digit of a test image and draw it in the terminal.
    Predict(PredictArgs),
    /// Print a model's layers, output shapes and parameter counts (Keras-style).
    Summary(SummaryArgs),
    /// Measure a preset's training and inference speed (what `cargo xtask bench` runs).
    Bench(BenchArgs),
    /// Write a model file as ONNX, for onnxruntime, Netron and every ONNX tool.
    Export(ExportArgs),
    /// Serve a model: a page to draw digits on, and a JSON API (see the README).
    Serve(ServeArgs),
}

#[derive(Args)]
pub struct ServeArgs {
    /// A model file written by `train`.
    #[arg(long, value_name = "FILE")]
    pub model_file: PathBuf,
    /// The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// The port (0: any free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// At most this many images in one forward pass.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub max_batch: usize,
    /// After a batch's first request, wait at most this many milliseconds for more; 0 takes
    /// only what queued during the previous forward pass (no added delay).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub max_wait_ms: u64,
    /// A dataset directory whose test set the page offers: random test images with their
    /// labels, and the model's most confident mistakes.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// ONNX, opset 13: input float32 pixels in 0..1, outputs logits and probabilities.
    Onnx,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A model file written by `train`.
    #[arg(long, value_name = "FILE")]
    pub model_file: PathBuf,
    /// The format to write.
    #[arg(long, value_enum, default_value = "onnx")]
    pub format: ExportFormat,
    /// Where to write it.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The preset to measure, with its tutorial's optimizer and batch size.
    #[arg(
        long,
        value_name = "PRESET",
        default_value = "two-conv",
        conflicts_with = "arch"
    )]
    pub model: String,
    /// Measure an architecture spec in JSON instead, trained with Adam at 0.001.
    #[arg(long, value_name = "SPEC.json")]
    pub arch: Option<PathBuf>,
    /// Mini-batch size [default: the preset's; 64 with --arch].
    #[arg(long, value_parser = at_least_one)]
    pub batch_size: Option<usize>,
    /// Training batches timed, after the warm-up.
    #[arg(long, default_value_t = 300, value_parser = at_least_one)]
    pub batches: usize,
    /// Training batches run before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Worker threads [default: all cores].
    #[arg(long, value_parser = at_least_one)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also time each layer's forward and backward pass and the rest of the training step.
    #[arg(long)]
    pub profile: bool,
}

/// Which architecture: a preset or a spec file.
#[derive(Args, Clone)]
pub struct ModelChoice {
    /// A preset: two-conv, one-conv, one-conv-dropout, lenet5, bn-cnn, fast-cnn [default:
    /// two-conv].
    #[arg(long, value_name = "PRESET", conflicts_with = "arch")]
    pub model: Option<String>,
    /// An architecture spec in JSON (see docs/model-format.md).
    #[arg(long, value_name = "SPEC.json")]
    pub arch: Option<PathBuf>,
}

/// Where the dataset is.
#[derive(Args, Clone)]
pub struct DataDirArg {
    /// Directory holding the dataset in MNIST's layout.
    #[arg(
        long,
        value_name = "DIR",
        env = "MNIST_DATA_DIR",
        default_value = "data/mnist"
    )]
    pub data_dir: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerName {
    Sgd,
    Adam,
    Adamw,
    Rmsprop,
    Adagrad,
}

#[derive(Args, Clone)]
// Let "--lr -1" reach the value check ("must be a positive number") instead of reading "-1" as
// an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// A recipe: its model and settings for every flag not given (fast: 99% in two short
    /// epochs; best: the best single model in 15 minutes; see the README).
    #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(cli::RECIPES), conflicts_with = "resume")]
    pub recipe: Option<String>,
    #[command(flatten)]
    pub model: ModelChoice,
    /// Passes over the training set.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub epochs: usize,
    /// Examples per mini-batch.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Update rule.
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: OptimizerName,
    /// Learning rate [default: 0.01 for sgd, 0.001 otherwise, as Keras].
    #[arg(long, value_name = "LR", value_parser = positive)]
    pub lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub momentum: f32,
    /// Nesterov momentum (SGD; needs --momentum above 0).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay: L2 penalty (decoupled for adamw) [default: 0, 0.01 for adamw].
    #[arg(long, value_parser = non_negative)]
    pub weight_decay: Option<f32>,
    /// Learning-rate schedule: constant, step:EVERY:GAMMA, exponential:GAMMA, cosine[:MIN_LR],
    /// one-cycle.
    #[arg(long, default_value = "constant", value_parser = parse_schedule)]
    pub schedule: Schedule,
    /// Label smoothing of the cross-entropy targets.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub label_smoothing: f32,
    /// Share of the training set held out for validation (the last examples, as Keras'
    /// validation_split); 0 for none.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.1, value_parser = fraction_f64)]
    pub val_split: f64,
    /// Seed of initialization, dropout and batch order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Worker threads [default: all cores]; results are identical for any count.
    #[arg(long, value_parser = at_least_one)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// Stop once this many epochs in a row have not lowered the validation loss (Keras'
    /// EarlyStopping patience), restoring the best epoch's weights.
    #[arg(long, value_name = "PATIENCE")]
    pub early_stopping: Option<usize>,
    /// Early stopping counts an epoch as an improvement only if it lowers the loss by more than
    /// this (Keras' min_delta).
    #[arg(long, value_name = "DELTA", default_value_t = 0.0, value_parser = non_negative, requires = "early_stopping")]
    pub early_stopping_min_delta: f32,
    /// Multiply the learning rate by --reduce-lr-factor once this many epochs in a row have not
    /// lowered the validation loss (Keras' ReduceLROnPlateau patience).
    #[arg(long, value_name = "PATIENCE")]
    pub reduce_lr_on_plateau: Option<usize>,
    /// Reduce-on-plateau counts an epoch as an improvement only if it lowers the loss by more
    /// than this (Keras' min_delta).
    #[arg(long, value_name = "DELTA", default_value_t = 1e-4, value_parser = non_negative, requires = "reduce_lr_on_plateau")]
    pub reduce_lr_min_delta: f32,
    /// Factor of each reduction.
    #[arg(long, default_value_t = 0.1, value_parser = fraction, requires = "reduce_lr_on_plateau")]
    pub reduce_lr_factor: f32,
    /// Floor of the reduced learning rate.
    #[arg(long, default_value_t = 1e-6, value_parser = non_negative, requires = "reduce_lr_on_plateau")]
    pub min_lr: f32,
    /// Augment the training images on the fly: random rotation, zoom and shift, different every
    /// epoch (tutorial settings unless --rotation, --zoom or --shift say otherwise).
    #[arg(long)]
    pub augment: bool,
    /// Rotation range in degrees for --augment.
    #[arg(long, value_name = "DEGREES", default_value_t = 10.0, value_parser = non_negative, requires = "augment")]
    pub rotation: f32,
    /// Zoom range for --augment: scale in [1 - ZOOM, 1 + ZOOM].
    #[arg(long, default_value_t = 0.1, value_parser = fraction, requires = "augment")]
    pub zoom: f32,
    /// Shift range in pixels for --augment.
    #[arg(long, value_name = "PIXELS", default_value_t = 2.0, value_parser = non_negative, requires = "augment")]
    pub shift: f32,
    /// Where to write TensorBoard event files (loss, accuracy, learning rate per epoch), under
    /// DIR/train and DIR/validation as Keras' callback does [default: <run dir>/tensorboard].
    #[arg(long, value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
    /// Continue a run from its directory's last checkpoint, with the settings in its
    /// config.json: an interrupted run ends with the weights an uninterrupted one would have;
    /// with --epochs, a finished run trains further (Keras' initial_epoch).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
    /// Elastic distortion for --augment: a random displacement field smoothed by a Gaussian of
    /// SIGMA pixels and scaled to ALPHA pixels (Simard et al. use 34:4).
    #[arg(long, value_name = "ALPHA:SIGMA", value_parser = parse_elastic, requires = "augment")]
    pub elastic: Option<(f32, f32)>,
    /// Run directory [default: runs/<UTC time>-<model>]; one that already holds a run is
    /// refused unless --overwrite is given.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Replace the run in --run-dir (a directory with a config.json) instead of refusing it.
    #[arg(long, requires = "run_dir")]
    pub overwrite: bool,
    /// Start from this model file's weights and normalization (its architecture; Keras'
    /// load_model then fit), e.g. to fine-tune it on another dataset.
    #[arg(long, value_name = "MODEL_FILE")]
    pub init_from: Option<PathBuf>,
    /// Keep the first N layers fixed, as Keras' `layer.trainable = False`: no updates, no
    /// gradients computed for them, run as in evaluation (count layers as `summary` numbers
    /// them: activations and pooling included).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub freeze: usize,
    /// No progress output; errors still go to stderr.
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// One JSON object per epoch on stdout, then one with the test result.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    /// The update rule with its hyper-parameters.
    pub fn rule(&self) -> Rule {
        match self.optimizer {
            OptimizerName::Sgd => Rule::Sgd {
                momentum: self.momentum,
                dampening: 0.0,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay.unwrap_or(0.0),
            },
            OptimizerName::Adam => match Rule::adam() {
                Rule::Adam {
                    beta1, beta2, eps, ..
                } => Rule::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay: self.weight_decay.unwrap_or(0.0),
                    decoupled: false,
                },
                other => other,
            },
            OptimizerName::Adamw => match Rule::adamw() {
                Rule::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => Rule::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay: self.weight_decay.unwrap_or(weight_decay),
                    decoupled: true,
                },
                other => other,
            },
            OptimizerName::Rmsprop => Rule::RmsProp {
                alpha: 0.99,
                eps: 1e-8,
                weight_decay: self.weight_decay.unwrap_or(0.0),
            },
            OptimizerName::Adagrad => Rule::Adagrad {
                eps: 1e-10,
                weight_decay: self.weight_decay.unwrap_or(0.0),
            },
        }
    }

    /// The learning rate given, or Keras' default for the optimizer.
    pub fn learning_rate(&self) -> f32 {
        self.lr.unwrap_or(if self.optimizer == OptimizerName::Sgd {
            0.01
        } else {
            0.001
        })
    }

    /// Augmentation settings, when enabled.
    pub fn augment(&self) -> Option<AugmentConfig> {
        self.augment.then_some(AugmentConfig {
            degrees: self.rotation,
            zoom: self.zoom,
            shift: self.shift,
            elastic: self.elastic,
        })
    }

    /// Reduce-on-plateau settings, when enabled.
    pub fn reduce_lr(&self) -> Option<ReduceLrConfig> {
        self.reduce_lr_on_plateau.map(|patience| ReduceLrConfig {
            patience,
            factor: self.reduce_lr_factor,
            min_lr: self.min_lr,
            min_delta: self.reduce_lr_min_delta,
        })
    }
}

#[derive(Args)]
pub struct EvaluateArgs {
    /// A model file written by `train`; given several times, the ensemble that averages the
    /// models' class probabilities.
    #[arg(long, value_name = "FILE", required = true)]
    pub model_file: Vec<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Draw the confusion matrix as a heatmap into this PNG.
    #[arg(long, value_name = "PNG")]
    pub confusion_png: Option<PathBuf>,
    /// Draw the most confident mistakes, with true and predicted classes, into this PNG.
    #[arg(long, value_name = "PNG")]
    pub misclassified: Option<PathBuf>,
}

#[derive(Args)]
pub struct PredictArgs {
    /// A model file written by `train`.
    #[arg(long, value_name = "FILE")]
    pub model_file: PathBuf,
    /// Images of digits (PNG, JPEG; a directory for every image in it, `-` for standard
    /// input), brought to MNIST's form: transparency flattened, grayscale, inverted when the
    /// background is light, paper and its shading removed, cropped, fitted into 20x20, centred
    /// by mass in 28x28. Each is answered; one that cannot be read is reported on its own line
    /// and makes the exit code 1.
    #[arg(value_name = "IMAGE", conflicts_with_all = ["test_index", "random"])]
    pub images: Vec<PathBuf>,
    /// Predict test image N (0-based).
    #[arg(long, value_name = "N", conflicts_with = "random")]
    pub test_index: Option<usize>,
    /// Predict a randomly chosen test image.
    #[arg(long)]
    pub random: bool,
    /// Write the 28x28 input the model saw (of the first image) as a PNG.
    #[arg(long, value_name = "PNG")]
    pub save_image: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataDirArg,
    /// Print one JSON entry per input: the prediction, or the error.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub model: ModelChoice,
    /// Summarize the model in this file instead.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["model", "arch"])]
    pub model_file: Option<PathBuf>,
    /// Count the first N layers' parameters as non-trainable, as `train --freeze N` would.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub freeze: usize,
    /// Also say how each layer is computed (each convolution's algorithm).
    #[arg(long, short)]
    pub verbose: bool,
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse::<T>()
        .map_err(|_| format!("{text:?} is not a number"))
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match number::<usize>(text)? {
        0 => Err("must be at least 1".into()),
        v => Ok(v),
    }
}

fn positive(text: &str) -> Result<f32, String> {
    match number::<f32>(text)? {
        v if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("must be a positive number".into()),
    }
}

fn non_negative(text: &str) -> Result<f32, String> {
    match number::<f32>(text)? {
        v if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err("must be zero or positive".into()),
    }
}

fn fraction(text: &str) -> Result<f32, String> {
    match number::<f32>(text)? {
        v if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be at least 0 and below 1".into()),
    }
}

fn fraction_f64(text: &str) -> Result<f64, String> {
    match number::<f64>(text)? {
        v if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be at least 0 and below 1 (0 for no validation set)".into()),
    }
}

fn parse_elastic(text: &str) -> Result<(f32, f32), String> {
    let (alpha, sigma) = text
        .split_once(':')
        .ok_or("expected ALPHA:SIGMA, e.g. 34:4")?;
    Ok((non_negative(alpha)?, positive(sigma)?))
}

/// A schedule's GAMMA: a decay factor in (0, 1] (above 1 the rate would grow every epoch).
fn decay(text: &str) -> Result<f32, String> {
    match number::<f32>(text)? {
        v if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!(
            "GAMMA {text} must be above 0 and at most 1: the rate is multiplied by it"
        )),
    }
}

fn parse_schedule(text: &str) -> Result<Schedule, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || {
        format!(
            "{text:?}: expected constant, step:EVERY:GAMMA, exponential:GAMMA, cosine[:MIN_LR] or one-cycle"
        )
    };
    match parts.as_slice() {
        ["constant"] => Ok(Schedule::Constant),
        ["step", every, gamma] => Ok(Schedule::Step {
            every: at_least_one(every).map_err(|e| format!("step:EVERY:GAMMA: EVERY {e}"))?,
            gamma: decay(gamma)?,
        }),
        ["exponential", gamma] => Ok(Schedule::Exponential {
            gamma: decay(gamma)?,
        }),
        ["cosine"] => Ok(Schedule::Cosine { min_lr: 0.0 }),
        ["cosine", min] => Ok(Schedule::Cosine {
            min_lr: non_negative(min)?,
        }),
        ["one-cycle"] => Ok(Schedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        }),
        _ => Err(bad()),
    }
}
