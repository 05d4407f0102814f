//! Layers from a spec: each layer's config made from its spec entry and the shape before it,
//! initialized from a seed or given stored weights.

use std::collections::HashMap;

use ndarray::ArrayD;
use rand_chacha::ChaCha8Rng;

use crate::error::NnError;
use crate::init::layer_rng;
use crate::layer::Layer;
use crate::layers::{
    Activation, ActivationKind, BatchNormConfig, Conv2dConfig, DenseConfig, DropoutConfig, Flatten,
    Pool2dConfig, PoolKind, Softmax,
};
use crate::spec::{LayerSpec, ModelSpec};

impl ModelSpec {
    /// Builds the layers, initialized from `seed`, after checking the whole spec.
    pub fn build_layers(&self, seed: u64) -> Result<Vec<Box<dyn Layer>>, NnError> {
        self.build(Weights::Seeded(seed))
    }

    /// Builds the layers from `weights` after checking the whole spec (the plan) first, so no
    /// layer is allocated for a spec that breaks a limit.
    pub(crate) fn build(&self, mut weights: Weights<'_>) -> Result<Vec<Box<dyn Layer>>, NnError> {
        self.plan()?;
        let mut shape = vec![1, self.input[0], self.input[1], self.input[2]];
        let mut layers: Vec<Box<dyn Layer>> = Vec::with_capacity(self.layers.len());
        for (index, spec) in self.layers.iter().enumerate() {
            let layer = build_layer(spec, &shape, &mut weights, index)
                .map_err(|e| at_layer(index, spec, e))?;
            shape = layer
                .output_shape(&shape)
                .map_err(|detail| at_layer(index, spec, refused(detail)))?;
            layers.push(layer);
        }
        Ok(layers)
    }
}

/// A layer's stored weight and, if it has one, its bias.
type WeightAndBias = (ArrayD<f32>, Option<ArrayD<f32>>);

/// Where a built layer's weights come from.
pub(crate) enum Weights<'a> {
    /// Initialized from this seed, as the spec's `init` says.
    Seeded(u64),
    /// Taken (moved out) from these tensors, by state-dict name; shapes checked by the caller
    /// against the plan, and again by each layer.
    Stored(&'a mut HashMap<String, ArrayD<f32>>),
}

impl Weights<'_> {
    /// The generator that layer `index` initializes from, or that a Dropout draws from.
    fn rng(&self, index: usize) -> ChaCha8Rng {
        match self {
            Weights::Seeded(seed) => layer_rng(*seed, index),
            // Only Dropout draws then, and training reseeds it every epoch.
            Weights::Stored(_) => layer_rng(0, index),
        }
    }

    /// Takes tensors `<index>.weight` and, when the layer has one, `<index>.bias`; `None` when
    /// the weights are to be initialized.
    fn take_weight_and_bias(
        &mut self,
        index: usize,
        bias: bool,
    ) -> Result<Option<WeightAndBias>, NnError> {
        let Some(weight) = self.take(index, "weight")? else {
            return Ok(None);
        };
        let bias = if bias {
            self.take(index, "bias")?
        } else {
            None
        };
        Ok(Some((weight, bias)))
    }

    /// Takes tensor `<index>.<name>`, or says it is missing.
    fn take(&mut self, index: usize, name: &str) -> Result<Option<ArrayD<f32>>, NnError> {
        match self {
            Weights::Seeded(_) => Ok(None),
            Weights::Stored(tensors) => tensors
                .remove(&format!("{index}.{name}"))
                .map(Some)
                .ok_or_else(|| refused(format!("tensor {index}.{name} is missing"))),
        }
    }
}

/// Builds one layer for an input of `shape` (batch first).
fn build_layer(
    spec: &LayerSpec,
    shape: &[usize],
    weights: &mut Weights<'_>,
    index: usize,
) -> Result<Box<dyn Layer>, NnError> {
    let channels = || {
        if shape.len() == 4 {
            Ok(shape[1])
        } else {
            Err(refused(format!("needs [N, C, H, W] input, got {shape:?}")))
        }
    };
    let features = || {
        if shape.len() == 2 {
            Ok(shape[1])
        } else {
            Err(refused(format!(
                "needs [N, F] input (add a Flatten before it), got {shape:?}"
            )))
        }
    };
    let mut rng = weights.rng(index);
    Ok(match *spec {
        LayerSpec::Conv2d {
            filters,
            kernel,
            stride,
            padding,
            bias,
            init,
        } => {
            let config = Conv2dConfig {
                in_channels: channels()?,
                out_channels: filters,
                kernel,
                stride,
                padding,
                bias,
                init,
            };
            Box::new(match weights.take_weight_and_bias(index, bias)? {
                Some((weight, bias)) => config.with_weights(weight, bias)?,
                None => config.init(&mut rng)?,
            })
        }
        LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
            channels()?;
            let kind = match spec {
                LayerSpec::MaxPool2d { .. } => PoolKind::Max,
                _ => PoolKind::Average,
            };
            let config = Pool2dConfig {
                kind,
                kernel,
                stride: stride.unwrap_or(kernel),
            };
            Box::new(config.init()?)
        }
        LayerSpec::Flatten => Box::new(Flatten::default()),
        LayerSpec::Dense { units, bias, init } => {
            let config = DenseConfig {
                in_features: features()?,
                out_features: units,
                bias,
                init,
            };
            Box::new(match weights.take_weight_and_bias(index, bias)? {
                Some((weight, bias)) => config.with_weights(weight, bias)?,
                None => config.init(&mut rng)?,
            })
        }
        LayerSpec::ReLU => Box::new(Activation::new(ActivationKind::Relu)),
        LayerSpec::LeakyReLU { negative_slope } => {
            if negative_slope.is_nan() || negative_slope <= 0.0 {
                return Err(refused(format!(
                    "negative_slope {negative_slope} must be positive"
                )));
            }
            Box::new(Activation::new(ActivationKind::LeakyRelu(negative_slope)))
        }
        LayerSpec::Sigmoid => Box::new(Activation::new(ActivationKind::Sigmoid)),
        LayerSpec::Tanh => Box::new(Activation::new(ActivationKind::Tanh)),
        LayerSpec::Softmax => {
            features()?;
            Box::new(Softmax::default())
        }
        LayerSpec::Dropout { rate } => Box::new(DropoutConfig { rate }.init(rng)?),
        LayerSpec::BatchNorm2d { eps, momentum } | LayerSpec::BatchNorm1d { eps, momentum } => {
            let (features, rank) = match spec {
                LayerSpec::BatchNorm2d { .. } => (channels()?, 4),
                _ => (features()?, 2),
            };
            let config = BatchNormConfig {
                features,
                rank,
                eps,
                momentum,
            };
            let mut layer = config.init()?;
            for (name, param) in layer.params_mut() {
                if let Some(value) = weights.take(index, name)? {
                    param.value = stored(index, name, value, param.value.shape())?;
                }
            }
            for (name, buffer) in layer.buffers_mut() {
                if let Some(value) = weights.take(index, name)? {
                    *buffer = stored(index, name, value, buffer.shape())?;
                }
            }
            Box::new(layer)
        }
    })
}

/// A stored tensor, checked to have the shape the layer built.
fn stored(
    index: usize,
    name: &str,
    value: ArrayD<f32>,
    expected: &[usize],
) -> Result<ArrayD<f32>, NnError> {
    if value.shape() == expected {
        Ok(value)
    } else {
        Err(refused(format!(
            "tensor {index}.{name} has shape {:?}, the layer expects {expected:?}",
            value.shape()
        )))
    }
}

/// A layer that cannot be built as its spec says.
fn refused(detail: String) -> NnError {
    NnError::Config {
        what: "layer",
        detail,
    }
}

/// Why layer `index` of a spec cannot be built, as an error of the spec naming the layer.
fn at_layer(index: usize, spec: &LayerSpec, error: NnError) -> NnError {
    match error {
        NnError::Config { detail, .. } | NnError::Input { detail, .. } => {
            NnError::Spec(format!("layer {index} ({}): {detail}", spec.name()))
        }
        other => other,
    }
}
