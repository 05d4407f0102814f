//! Architectures as data: a JSON-serializable spec that prints itself and round-trips; and the
//! named presets of the reference tutorials. (`build.rs` makes layers from it.)
//!
//! Layers map one to one onto the modules of a `torch.nn.Sequential`, activations included, so
//! parameter names (`<index>.weight`) match PyTorch's.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::init::Init;

/// Zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PaddingSpec {
    /// No padding.
    #[default]
    Valid,
    /// Output size `ceil(input / stride)`, as Keras and TensorFlow pad.
    Same,
    /// Rows and columns of zeros: `[top, bottom, left, right]`.
    Explicit([usize; 4]),
}

impl From<PaddingSpec> for tensor::Padding {
    fn from(p: PaddingSpec) -> Self {
        match p {
            PaddingSpec::Valid => tensor::Padding::Valid,
            PaddingSpec::Same => tensor::Padding::Same,
            PaddingSpec::Explicit([top, bottom, left, right]) => tensor::Padding::Explicit {
                top,
                bottom,
                left,
                right,
            },
        }
    }
}

fn one_by_one() -> [usize; 2] {
    [1, 1]
}
fn yes() -> bool {
    true
}
fn leaky_slope() -> f32 {
    0.01
}
fn bn_eps() -> f32 {
    1e-5
}
fn bn_momentum() -> f32 {
    0.1
}

/// One layer of an architecture. Input sizes (channels, features) are inferred from the layer
/// before, so a spec states only what a Keras model definition states.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum LayerSpec {
    /// 2-D convolution.
    Conv2d {
        /// Output channels.
        filters: usize,
        /// `[KH, KW]`.
        kernel: [usize; 2],
        /// `[vertical, horizontal]`, default `[1, 1]`.
        #[serde(default = "one_by_one")]
        stride: [usize; 2],
        /// Default `valid`.
        #[serde(default)]
        padding: PaddingSpec,
        /// Whether there is a bias, default true.
        #[serde(default = "yes")]
        bias: bool,
        /// Weight initialization, default PyTorch's.
        #[serde(default)]
        init: Init,
    },
    /// Max pooling; `stride` defaults to `kernel`.
    MaxPool2d {
        /// `[KH, KW]`.
        kernel: [usize; 2],
        /// Default: the kernel.
        #[serde(default)]
        stride: Option<[usize; 2]>,
    },
    /// Average pooling; `stride` defaults to `kernel`.
    AvgPool2d {
        /// `[KH, KW]`.
        kernel: [usize; 2],
        /// Default: the kernel.
        #[serde(default)]
        stride: Option<[usize; 2]>,
    },
    /// `[N, C, H, W]` to `[N, C*H*W]`, in C, H, W order (PyTorch's and this crate's).
    Flatten,
    /// Fully connected layer (PyTorch's Linear).
    Dense {
        /// Output features.
        units: usize,
        /// Whether there is a bias, default true.
        #[serde(default = "yes")]
        bias: bool,
        /// Weight initialization, default PyTorch's.
        #[serde(default)]
        init: Init,
    },
    /// max(x, 0).
    ReLU,
    /// x, or slope * x below 0.
    LeakyReLU {
        /// Default 0.01, as PyTorch.
        #[serde(default = "leaky_slope")]
        negative_slope: f32,
    },
    /// 1 / (1 + exp(-x)).
    Sigmoid,
    /// tanh(x).
    Tanh,
    /// Softmax over features, as an output layer when the loss takes probabilities.
    Softmax,
    /// Inverted dropout: zeroes a share `rate` of activations in training, scales the rest.
    Dropout {
        /// Share dropped, in [0, 1).
        rate: f32,
    },
    /// Batch normalization over channels of `[N, C, H, W]`.
    BatchNorm2d {
        /// Added to the variance, default 1e-5.
        #[serde(default = "bn_eps")]
        eps: f32,
        /// Running-statistics update weight, default 0.1 (PyTorch's convention).
        #[serde(default = "bn_momentum")]
        momentum: f32,
    },
    /// Batch normalization over features of `[N, F]`.
    BatchNorm1d {
        /// Added to the variance, default 1e-5.
        #[serde(default = "bn_eps")]
        eps: f32,
        /// Running-statistics update weight, default 0.1.
        #[serde(default = "bn_momentum")]
        momentum: f32,
    },
}

/// A whole architecture: its name, the input `[C, H, W]` of one example, and its layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name, e.g. "two-conv".
    pub name: String,
    /// One example's shape `[C, H, W]`.
    pub input: [usize; 3],
    /// The layers, in order.
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    /// Parses a spec from JSON.
    pub fn from_json(json: &str) -> Result<ModelSpec, crate::NnError> {
        serde_json::from_str(json).map_err(|e| crate::NnError::Spec(e.to_string()))
    }

    /// The spec as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| unreachable!("plain data: {e}"))
    }
}

impl LayerSpec {
    /// The layer type's name.
    pub fn name(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "Conv2d",
            LayerSpec::MaxPool2d { .. } => "MaxPool2d",
            LayerSpec::AvgPool2d { .. } => "AvgPool2d",
            LayerSpec::Flatten => "Flatten",
            LayerSpec::Dense { .. } => "Dense",
            LayerSpec::ReLU => "ReLU",
            LayerSpec::LeakyReLU { .. } => "LeakyReLU",
            LayerSpec::Sigmoid => "Sigmoid",
            LayerSpec::Tanh => "Tanh",
            LayerSpec::Softmax => "Softmax",
            LayerSpec::Dropout { .. } => "Dropout",
            LayerSpec::BatchNorm2d { .. } => "BatchNorm2d",
            LayerSpec::BatchNorm1d { .. } => "BatchNorm1d",
        }
    }
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSpec::Conv2d {
                filters,
                kernel,
                stride,
                padding,
                bias,
                ..
            } => {
                write!(f, "Conv2d({filters}, {}x{}", kernel[0], kernel[1])?;
                if *stride != [1, 1] {
                    write!(f, ", stride {}x{}", stride[0], stride[1])?;
                }
                match padding {
                    PaddingSpec::Valid => {}
                    PaddingSpec::Same => write!(f, ", same")?,
                    PaddingSpec::Explicit(p) => write!(f, ", padding {p:?}")?,
                }
                if !bias {
                    write!(f, ", no bias")?;
                }
                write!(f, ")")
            }
            LayerSpec::MaxPool2d { kernel, .. } => {
                write!(f, "MaxPool2d({}x{})", kernel[0], kernel[1])
            }
            LayerSpec::AvgPool2d { kernel, .. } => {
                write!(f, "AvgPool2d({}x{})", kernel[0], kernel[1])
            }
            LayerSpec::Dense { units, .. } => write!(f, "Dense({units})"),
            LayerSpec::LeakyReLU { negative_slope } => write!(f, "LeakyReLU({negative_slope})"),
            LayerSpec::Dropout { rate } => write!(f, "Dropout({rate})"),
            other => f.write_str(other.name()),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [c, h, w] = self.input;
        write!(f, "{}: input {c}x{h}x{w}", self.name)?;
        for layer in &self.layers {
            write!(f, " -> {layer}")?;
        }
        Ok(())
    }
}

/// The names of the built-in architectures.
pub const PRESETS: [&str; 6] = [
    "two-conv",
    "one-conv",
    "one-conv-dropout",
    "lenet5",
    "bn-cnn",
    "fast-cnn",
];

/// A built-in architecture by name, for 28x28 grayscale inputs and 10 classes.
pub fn preset(name: &str) -> Option<ModelSpec> {
    use LayerSpec::*;
    let conv = |filters, k, padding| Conv2d {
        filters,
        kernel: [k, k],
        stride: [1, 1],
        padding,
        bias: true,
        init: Init::TorchDefault,
    };
    let pool = || MaxPool2d {
        kernel: [2, 2],
        stride: None,
    };
    let dense = |units| Dense {
        units,
        bias: true,
        init: Init::TorchDefault,
    };
    let layers = match name {
        // Keras' "simple MNIST convnet": 225,034 parameters.
        "two-conv" => vec![
            conv(32, 3, PaddingSpec::Valid),
            ReLU,
            pool(),
            conv(64, 3, PaddingSpec::Valid),
            ReLU,
            pool(),
            Flatten,
            dense(128),
            ReLU,
            dense(10),
        ],
        // One convolution and a 100-unit dense layer: 542,230 parameters.
        "one-conv" => vec![
            conv(32, 3, PaddingSpec::Valid),
            ReLU,
            pool(),
            Flatten,
            dense(100),
            ReLU,
            dense(10),
        ],
        // With dropout before the classifier: 693,962 parameters.
        "one-conv-dropout" => vec![
            conv(32, 3, PaddingSpec::Valid),
            ReLU,
            pool(),
            Flatten,
            dense(128),
            ReLU,
            Dropout { rate: 0.2 },
            dense(10),
        ],
        // LeNet-5 with ReLU and max pooling: 61,706 parameters.
        "lenet5" => vec![
            conv(6, 5, PaddingSpec::Same),
            ReLU,
            pool(),
            conv(16, 5, PaddingSpec::Valid),
            ReLU,
            pool(),
            Flatten,
            dense(120),
            ReLU,
            dense(84),
            ReLU,
            dense(10),
        ],
        // The modern MNIST CNN of most Kaggle notebooks and tutorial 003: two 3x3 "same"
        // convolutions with BatchNorm and ReLU, pooling, twice; a BatchNorm'd dense layer
        // with dropout. 872,426 parameters as Keras counts them (running statistics
        // included).
        "bn-cnn" => {
            let conv_bn_relu = |filters| {
                [
                    conv(filters, 3, PaddingSpec::Same),
                    BatchNorm2d {
                        eps: 1e-5,
                        momentum: 0.1,
                    },
                    ReLU,
                ]
            };
            let mut layers = Vec::new();
            for filters in [32, 64] {
                layers.extend(conv_bn_relu(filters));
                layers.extend(conv_bn_relu(filters));
                layers.push(pool());
            }
            layers.extend([
                Flatten,
                dense(256),
                BatchNorm1d {
                    eps: 1e-5,
                    momentum: 0.1,
                },
                ReLU,
                Dropout { rate: 0.4 },
                dense(10),
            ]);
            layers
        }
        // The `fast` recipe's network: two small 3x3 convolutions without bias (BatchNorm's
        // shift replaces it), each pooled, then BatchNorm and ReLU (pooling first, as the
        // airbench speed-run networks do: BatchNorm then works on a quarter of the values),
        // then the classifier. 12,954 parameters as Keras counts them (96 running statistics).
        "fast-cnn" => {
            let mut layers = Vec::new();
            for filters in [16, 32] {
                layers.extend([
                    Conv2d {
                        filters,
                        kernel: [3, 3],
                        stride: [1, 1],
                        padding: PaddingSpec::Valid,
                        bias: false,
                        init: Init::TorchDefault,
                    },
                    pool(),
                    BatchNorm2d {
                        eps: 1e-5,
                        momentum: 0.1,
                    },
                    ReLU,
                ]);
            }
            layers.extend([Flatten, dense(10)]);
            layers
        }
        _ => return None,
    };
    Some(ModelSpec {
        name: name.to_string(),
        input: [1, 28, 28],
        layers,
    })
}
