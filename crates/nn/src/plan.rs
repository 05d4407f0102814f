//! What a spec builds, worked out before anything is allocated: every layer's output shape and
//! parameter tensors, with checked arithmetic, against documented limits.
//!
//! Architecture invariant: every path from an untrusted spec to a model (`--arch`, a model
//! file, the server) goes through [`ModelSpec::plan`] first, so no number in a spec sizes an
//! allocation before it has been checked here. The limits are far above any honest model of the
//! MNIST family (two-conv has 225,034 parameters and 33,000 activations per image) and far
//! below what would exhaust a laptop; docs/model-format.md lists them.

use tensor::{Conv2dDims, ConvAlgorithm, Pool2dDims};

use crate::error::NnError;
use crate::model::ParamCounts;
use crate::spec::{LayerSpec, ModelSpec};

/// At most this many layers.
pub const MAX_LAYERS: usize = 1000;
/// An input's height and width are at most this.
pub const MAX_INPUT_SIDE: usize = 4096;
/// An input has at most this many channels.
pub const MAX_INPUT_CHANNELS: usize = 4096;
/// At most this many scalars in all parameters and saved state together (400 MB of f32).
pub const MAX_PARAMETERS: usize = 100_000_000;
/// At most this many values computed per image at batch 1, every layer's output and every
/// convolution's unfolded input together (256 MiB of f32).
pub const MAX_ACTIVATIONS_PER_IMAGE: usize = 64 << 20;

/// One tensor a layer stores: its name in a model file and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    /// `<layer index>.<name>`, as in a `torch.nn.Sequential` state dict.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Whether the optimizer updates it (a parameter) or not (saved state).
    pub trainable: bool,
}

/// One layer as a spec will build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPlan {
    /// The layer type as specs name it (what summaries print).
    pub kind: &'static str,
    /// The output shape of one example (no batch axis).
    pub output: Vec<usize>,
    /// Parameters, then saved state, in the order the layer visits them.
    pub tensors: Vec<TensorPlan>,
    /// How a convolution is computed (`None` for other layers).
    pub algorithm: Option<ConvAlgorithm>,
}

/// A whole architecture as a spec will build it, checked against the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPlan {
    /// One entry per layer.
    pub layers: Vec<LayerPlan>,
    /// Parameter counts as [`crate::Sequential::param_counts`] reports them.
    pub counts: ParamCounts,
    /// Values computed per image at batch 1 (see [`MAX_ACTIVATIONS_PER_IMAGE`]).
    pub activations_per_image: usize,
}

/// Floating-point operations of the layers with weights (convolutions and dense layers; the
/// elementwise layers, pooling, BatchNorm and the loss are left out), per image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlopCount {
    /// One forward pass.
    pub forward: u64,
    /// One training step: forward, weight gradient and input gradient (the same
    /// multiply-adds each), except the input gradient of the first layer with weights, which
    /// nothing needs.
    pub training: u64,
}

impl ModelPlan {
    /// The floating-point operations per image (1 multiply-add = 2), as docs/benchmarks.md
    /// counts them for the FLOP bound.
    pub fn flops_per_image(&self) -> FlopCount {
        let mut count = FlopCount {
            forward: 0,
            training: 0,
        };
        let mut first = true;
        for layer in &self.layers {
            let Some(weight) = layer.tensors.iter().find(|t| {
                t.name.ends_with(".weight") && matches!(t.shape.len(), 2 | 4) && t.trainable
            }) else {
                continue;
            };
            let outputs: usize = layer.output.iter().product();
            let weights: usize = weight.shape.iter().product();
            // Each output value is a dot product over one filter: weights / filters terms.
            let per_output = weights / weight.shape[0].max(1);
            let flops = 2 * (outputs * per_output) as u64;
            count.forward += flops;
            count.training += if first { 2 * flops } else { 3 * flops };
            first = false;
        }
        count
    }

    /// The number of classes: the width of the last layer's output.
    pub fn classes(&self) -> usize {
        self.layers
            .last()
            .and_then(|l| l.output.last().copied())
            .unwrap_or(0)
    }

    /// Parameter counts with the first `frozen` layers frozen: their parameters count as
    /// non-trainable, as Keras counts a layer with `trainable = False`.
    pub fn counts_with_frozen(&self, frozen: usize) -> ParamCounts {
        let moved: usize = self
            .layers
            .iter()
            .take(frozen)
            .flat_map(|l| &l.tensors)
            .filter(|t| t.trainable)
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        ParamCounts {
            trainable: self.counts.trainable - moved,
            non_trainable: self.counts.non_trainable + moved,
        }
    }

    /// Every stored tensor, in the order of the model's visitors: parameters, then state.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorPlan> {
        let params = self.layers.iter().flat_map(|l| &l.tensors);
        params
            .clone()
            .filter(|t| t.trainable)
            .chain(params.filter(|t| !t.trainable))
    }
}

impl ModelSpec {
    /// Checks the whole architecture and works out what it builds, allocating nothing sized
    /// by the spec: an error names the layer and the limit or the shape that does not fit.
    pub fn plan(&self) -> Result<ModelPlan, NnError> {
        // The name is printed in messages and becomes part of a run directory's name.
        if self.name.is_empty()
            || self.name.chars().count() > 100
            || self.name.chars().any(char::is_control)
        {
            return Err(NnError::Spec(
                "the name must be 1 to 100 characters, none of them a control character".into(),
            ));
        }
        let spec_error = |detail: String| NnError::Spec(format!("{}: {detail}", self.name));
        if self.layers.is_empty() {
            return Err(spec_error("has no layers".into()));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(spec_error(format!(
                "{} layers, more than the limit of {MAX_LAYERS}",
                self.layers.len()
            )));
        }
        let [c, h, w] = self.input;
        if c == 0 || h == 0 || w == 0 {
            return Err(spec_error(format!(
                "input {c}x{h}x{w}: every size must be at least 1"
            )));
        }
        if c > MAX_INPUT_CHANNELS || h > MAX_INPUT_SIDE || w > MAX_INPUT_SIDE {
            return Err(spec_error(format!(
                "input {c}x{h}x{w} exceeds the limit of {MAX_INPUT_CHANNELS} channels of \
                 {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}"
            )));
        }
        let mut shape = vec![c, h, w];
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut counts = ParamCounts {
            trainable: 0,
            non_trainable: 0,
        };
        let mut activations = 0usize;
        for (index, layer) in self.layers.iter().enumerate() {
            let at = |detail: String| {
                NnError::Spec(format!("layer {index} ({}): {detail}", layer.name()))
            };
            let planned = plan_layer(layer, &shape, index).map_err(at)?;
            for tensor in &planned.layer.tensors {
                let n = product(&tensor.shape).ok_or_else(|| at(too_many_parameters()))?;
                // BatchNorm's batch counter is bookkeeping, not a parameter (as in Keras).
                if tensor.trainable {
                    counts.trainable = counts.trainable.saturating_add(n);
                } else if !tensor.name.ends_with("num_batches_tracked") {
                    counts.non_trainable = counts.non_trainable.saturating_add(n);
                }
            }
            if counts.trainable.saturating_add(counts.non_trainable) > MAX_PARAMETERS {
                return Err(at(too_many_parameters()));
            }
            activations = product(&planned.layer.output)
                .and_then(|n| n.checked_add(planned.scratch))
                .and_then(|n| n.checked_add(activations))
                .filter(|&n| n <= MAX_ACTIVATIONS_PER_IMAGE)
                .ok_or_else(|| {
                    at(format!(
                        "output {:?}: the layers so far compute more than the limit of {} values \
                         per image ({} MiB)",
                        planned.layer.output,
                        MAX_ACTIVATIONS_PER_IMAGE,
                        (MAX_ACTIVATIONS_PER_IMAGE * 4) >> 20
                    ))
                })?;
            shape = planned.layer.output.clone();
            layers.push(planned.layer);
        }
        if shape.len() != 1 {
            return Err(spec_error(format!(
                "the last layer gives {shape:?} per example; a classifier must end in one score \
                 per class (add Flatten and Dense)"
            )));
        }
        Ok(ModelPlan {
            layers,
            counts,
            activations_per_image: activations,
        })
    }
}

fn too_many_parameters() -> String {
    format!("the layers so far hold more than the limit of {MAX_PARAMETERS} parameters")
}

/// The product of `sizes`, or `None` on overflow.
fn product(sizes: &[usize]) -> Option<usize> {
    sizes.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A layer's plan and the values it computes besides its output (a convolution's unfolded
/// input), per image.
struct Planned {
    layer: LayerPlan,
    scratch: usize,
}

/// Plans layer `index` for one example of `shape` (no batch axis).
fn plan_layer(spec: &LayerSpec, shape: &[usize], index: usize) -> Result<Planned, String> {
    let tensor = |name: &str, shape: Vec<usize>, trainable: bool| TensorPlan {
        name: format!("{index}.{name}"),
        shape,
        trainable,
    };
    let image = || match *shape {
        [c, h, w] => Ok([c, h, w]),
        _ => Err(format!(
            "needs [N, C, H, W] input, got [N, {}]",
            dims(shape)
        )),
    };
    let features = || match *shape {
        [f] => Ok(f),
        _ => Err(format!(
            "needs [N, F] input (add a Flatten before it), got [N, {}]",
            dims(shape)
        )),
    };
    let positive = |what: &str, value: f32| {
        if value.is_finite() && value > 0.0 {
            Ok(())
        } else {
            Err(format!("{what} {value} must be a positive number"))
        }
    };
    let same_shape = |kind| LayerPlan {
        algorithm: None,
        kind,
        output: shape.to_vec(),
        tensors: Vec::new(),
    };
    let plain = |layer| Ok(Planned { layer, scratch: 0 });
    match *spec {
        LayerSpec::Conv2d {
            filters,
            kernel,
            stride,
            padding,
            bias,
            ..
        } => {
            let [c, h, w] = image()?;
            let dims = Conv2dDims::new([1, c, h, w], filters, kernel, stride, padding.into())
                .map_err(|e| e.to_string())?;
            let [_, o, oh, ow] = dims.output_shape();
            let unfolded = product(&[c, kernel[0], kernel[1], oh, ow]).ok_or_else(|| {
                format!(
                    "unfolding {c}x{}x{} patches overflows",
                    kernel[0], kernel[1]
                )
            })?;
            let mut tensors = vec![tensor(
                "weight",
                vec![filters, c, kernel[0], kernel[1]],
                true,
            )];
            if bias {
                tensors.push(tensor("bias", vec![filters], true));
            }
            Ok(Planned {
                layer: LayerPlan {
                    algorithm: Some(dims.algorithm()),
                    kind: "Conv2d",
                    output: vec![o, oh, ow],
                    tensors,
                },
                scratch: unfolded,
            })
        }
        LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
            let [c, h, w] = image()?;
            let dims = Pool2dDims::new([1, c, h, w], kernel, stride.unwrap_or(kernel))
                .map_err(|e| e.to_string())?;
            let [_, c, oh, ow] = dims.output_shape();
            plain(LayerPlan {
                algorithm: None,
                kind: spec.name(),
                output: vec![c, oh, ow],
                tensors: Vec::new(),
            })
        }
        LayerSpec::Flatten => {
            let n = product(shape).ok_or_else(|| format!("flattening {shape:?} overflows"))?;
            plain(LayerPlan {
                algorithm: None,
                kind: "Flatten",
                output: vec![n],
                tensors: Vec::new(),
            })
        }
        LayerSpec::Dense { units, bias, .. } => {
            let f = features()?;
            if units == 0 {
                return Err("units must be at least 1".into());
            }
            let mut tensors = vec![tensor("weight", vec![units, f], true)];
            if bias {
                tensors.push(tensor("bias", vec![units], true));
            }
            plain(LayerPlan {
                algorithm: None,
                kind: "Dense",
                output: vec![units],
                tensors,
            })
        }
        LayerSpec::LeakyReLU { negative_slope } => {
            positive("negative_slope", negative_slope)?;
            plain(same_shape("LeakyReLU"))
        }
        LayerSpec::ReLU | LayerSpec::Sigmoid | LayerSpec::Tanh => plain(same_shape(spec.name())),
        LayerSpec::Softmax => {
            features()?;
            plain(same_shape("Softmax"))
        }
        LayerSpec::Dropout { rate } => {
            if !(0.0..1.0).contains(&rate) {
                return Err(format!("rate {rate} must be at least 0 and below 1"));
            }
            plain(same_shape("Dropout"))
        }
        LayerSpec::BatchNorm2d { eps, momentum } | LayerSpec::BatchNorm1d { eps, momentum } => {
            let channels = match spec {
                LayerSpec::BatchNorm2d { .. } => image()?[0],
                _ => features()?,
            };
            positive("eps", eps)?;
            if !(0.0..=1.0).contains(&momentum) {
                return Err(format!("momentum {momentum} must be in [0, 1]"));
            }
            let tensors = vec![
                tensor("weight", vec![channels], true),
                tensor("bias", vec![channels], true),
                tensor("running_mean", vec![channels], false),
                tensor("running_var", vec![channels], false),
                tensor("num_batches_tracked", Vec::new(), false),
            ];
            plain(LayerPlan {
                algorithm: None,
                kind: spec.name(),
                output: shape.to_vec(),
                tensors,
            })
        }
    }
}

/// `[3, 4]` as "3, 4", for shapes printed after a batch axis.
fn dims(shape: &[usize]) -> String {
    shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
