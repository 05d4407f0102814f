//! A sequential model: layers applied in order, one parameter-visiting API that the optimizer,
//! the saver and the parameter count all use.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

use ndarray::{Array2, Array4, ArrayD, Ix2};

use crate::build::Weights;
use crate::error::NnError;
use crate::layer::{Fusion, Layer, Mode, PoolWindow};
use crate::param::Param;
use crate::profile::LayerTimes;
use crate::spec::{LayerSpec, ModelSpec};

/// Layers applied in order to `[N, C, H, W]` images, ending in `[N, classes]` scores.
#[derive(Debug)]
pub struct Sequential {
    spec: ModelSpec,
    layers: Vec<Box<dyn Layer>>,
    /// The layers as the passes run them, in order: one layer, or a convolution that computes
    /// the ReLU and max pooling after it as well (the first layer of the range does the work).
    steps: Vec<Range<usize>>,
    /// Per-layer times while profiling is on.
    profile: Option<Vec<LayerTimes>>,
    /// Layers `0..frozen` are fixed (Keras' `trainable = False`): the optimizer skips their
    /// parameters, no gradient is computed for them, and they run as in evaluation.
    frozen: usize,
}

/// Parameter counts, as Keras' summary reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// Scalars the optimizer updates.
    pub trainable: usize,
    /// Scalars of saved state the optimizer does not touch (BatchNorm's running statistics).
    pub non_trainable: usize,
}

impl Sequential {
    /// Builds the model `spec` describes, with weights initialized from `seed`.
    pub fn new(spec: ModelSpec, seed: u64) -> Result<Sequential, NnError> {
        let layers = spec.build_layers(seed)?;
        Ok(Sequential::assemble(spec, layers))
    }

    /// Builds the model `spec` describes with these weights and state, moved in by their
    /// state-dict names (`<layer index>.<name>`); every tensor must be there with its shape.
    pub fn with_tensors(
        spec: ModelSpec,
        mut tensors: HashMap<String, ArrayD<f32>>,
    ) -> Result<Sequential, NnError> {
        let layers = spec.build(Weights::Stored(&mut tensors))?;
        if let Some(extra) = tensors.keys().min() {
            return Err(NnError::Spec(format!(
                "tensor {extra} is not part of the model {}",
                spec.name
            )));
        }
        Ok(Sequential::assemble(spec, layers))
    }

    fn assemble(spec: ModelSpec, layers: Vec<Box<dyn Layer>>) -> Sequential {
        let mut model = Sequential {
            spec,
            layers,
            steps: Vec::new(),
            profile: None,
            frozen: 0,
        };
        model.fuse_layers(true);
        model
    }

    /// The architecture.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Box<dyn Layer>] {
        &self.layers
    }

    /// With `enabled` (the default), a Conv2d or BatchNorm2d followed by ReLU and MaxPool2d
    /// computes all three in one pass, a Conv2d followed by MaxPool2d both, and a BatchNorm
    /// followed by ReLU both, which gives the same bits faster; without, every layer runs
    /// alone.
    pub fn fuse_layers(&mut self, enabled: bool) {
        self.steps.clear();
        let mut first = 0;
        // A final Softmax is not run: its work belongs to the loss (see `forward`).
        let end = self.layers.len() - usize::from(self.ends_in_softmax());
        while first < end {
            let following = &self.layers[first + 1..end];
            let candidates = [
                relu_then_max_pool(following.get(..2)).map(Fusion::ReluMaxPool),
                following
                    .first()
                    .and_then(|layer| max_pool(layer.as_ref()))
                    .map(Fusion::MaxPool),
                following
                    .first()
                    .filter(|layer| layer.spec() == LayerSpec::ReLU)
                    .map(|_| Fusion::Relu),
            ];
            let layer = &mut self.layers[first];
            let fused = candidates
                .into_iter()
                .flatten()
                .filter(|_| enabled)
                .find(|&fusion| layer.fuse(fusion));
            let len = match fused {
                Some(Fusion::ReluMaxPool(_)) => 3,
                Some(Fusion::Relu | Fusion::MaxPool(_)) => 2,
                Some(Fusion::Alone) | None => {
                    layer.fuse(Fusion::Alone);
                    1
                }
            };
            self.steps.push(first..first + len);
            first += len;
        }
    }

    /// Every layer's output for `images` in evaluation mode, each layer run alone (a fused
    /// convolution's ReLU and pooling included), in order: what a model shows of itself, e.g.
    /// the feature maps of its convolutions. The fusion setting is restored afterwards.
    pub fn layer_outputs(&mut self, images: Array4<f32>) -> Result<Vec<ArrayD<f32>>, NnError> {
        let fused = self.steps.iter().any(|step| step.len() > 1);
        self.fuse_layers(false);
        let mut outputs = Vec::with_capacity(self.layers.len());
        let mut x: ArrayD<f32> = images.into_dyn();
        let mut result = Ok(());
        for (index, layer) in self.layers.iter_mut().enumerate() {
            match layer.forward(x.clone(), Mode::Eval) {
                Ok(y) => {
                    x = y;
                    outputs.push(x.clone());
                }
                Err(e) => {
                    result = Err(at_layer(e, index));
                    break;
                }
            }
        }
        self.fuse_layers(fused);
        result.map(|()| outputs)
    }

    /// The gradient of the score of `class` (before any final Softmax) with respect to the
    /// input `images` `[1, C, H, W]`, the model as in evaluation: a saliency map, from the
    /// hand-written backward passes. BatchNorm is the affine map of its running statistics and
    /// Dropout the identity, as in evaluation; every other layer runs its training forward pass
    /// (the same values) to keep what its backward pass reads. Parameter gradients written on
    /// the way are cleared, and the fusion setting is restored.
    pub fn input_gradient(
        &mut self,
        images: Array4<f32>,
        class: usize,
    ) -> Result<ArrayD<f32>, NnError> {
        let fused = self.steps.iter().any(|step| step.len() > 1);
        self.fuse_layers(false);
        let result = self.input_gradient_unfused(images, class);
        self.zero_grad();
        self.fuse_layers(fused);
        result
    }

    fn input_gradient_unfused(
        &mut self,
        images: Array4<f32>,
        class: usize,
    ) -> Result<ArrayD<f32>, NnError> {
        let end = self.layers.len() - usize::from(self.ends_in_softmax());
        let specs = self.spec.layers.clone();
        let evaluated = |spec: &LayerSpec| {
            matches!(
                spec,
                LayerSpec::BatchNorm2d { .. }
                    | LayerSpec::BatchNorm1d { .. }
                    | LayerSpec::Dropout { .. }
            )
        };
        let mut x: ArrayD<f32> = images.into_dyn();
        for (index, layer) in self.layers[..end].iter_mut().enumerate() {
            let mode = if evaluated(&specs[index]) {
                Mode::Eval
            } else {
                Mode::Train
            };
            x = layer.forward(x, mode).map_err(|e| at_layer(e, index))?;
        }
        let classes = x.shape().get(1).copied().unwrap_or(0);
        if x.ndim() != 2 || x.shape()[0] != 1 || class >= classes {
            return Err(NnError::Shape {
                layer: end.saturating_sub(1),
                kind: "output",
                detail: format!("class {class} of scores {:?} for one image", x.shape()),
            });
        }
        let mut g = ArrayD::<f32>::zeros(x.raw_dim());
        g[[0, class]] = 1.0;
        for index in (0..end).rev() {
            g = match specs[index] {
                LayerSpec::Dropout { .. } => g,
                LayerSpec::BatchNorm2d { eps, .. } | LayerSpec::BatchNorm1d { eps, .. } => {
                    // y = gamma (x - mean) / sqrt(var + eps) + beta: dx = dy gamma / sqrt(var + eps).
                    let layer = &self.layers[index];
                    let gamma = layer.params().first().map(|(_, p)| p.value.clone());
                    let var = layer
                        .buffers()
                        .iter()
                        .find(|(name, _)| *name == "running_var")
                        .map(|(_, b)| (*b).clone());
                    let (Some(gamma), Some(var)) = (gamma, var) else {
                        return Err(NnError::NoForwardCache("BatchNorm"));
                    };
                    for (c, mut channel) in g.axis_iter_mut(ndarray::Axis(1)).enumerate() {
                        channel *= gamma[[c]] / (var[[c]] + eps).sqrt();
                    }
                    g
                }
                _ => self.layers[index]
                    .backward(g, true)
                    .map_err(|e| at_layer(e, index))?
                    .ok_or(NnError::NoForwardCache("input gradient"))?,
            };
        }
        Ok(g)
    }

    /// Fixes the first `layers` layers, as Keras' `layer.trainable = False` does: the optimizer
    /// skips their parameters, backward passes stop before them (computing no gradient for
    /// them), and they run as in evaluation (a frozen BatchNorm uses and keeps its running
    /// statistics, a frozen Dropout drops nothing). 0 unfreezes every layer.
    pub fn freeze(&mut self, layers: usize) -> Result<(), NnError> {
        if layers >= self.layers.len() {
            return Err(NnError::Config {
                what: "frozen layers",
                detail: format!(
                    "{layers} of the {} layers of {}: at least the last must stay trainable",
                    self.layers.len(),
                    self.spec.name
                ),
            });
        }
        self.frozen = layers;
        if self.param_counts().trainable == 0 {
            self.frozen = 0;
            return Err(NnError::Config {
                what: "frozen layers",
                detail: format!(
                    "freezing {layers} layers of {} leaves no trainable parameter",
                    self.spec.name
                ),
            });
        }
        Ok(())
    }

    /// How many leading layers are frozen (see [`Sequential::freeze`]).
    pub fn frozen(&self) -> usize {
        self.frozen
    }

    /// The index of the layer whose pass computes layer `index`: itself, or the convolution a
    /// fused ReLU or max pooling belongs to.
    pub fn computed_by(&self, index: usize) -> usize {
        self.steps
            .iter()
            .find(|step| step.contains(&index))
            .map_or(index, |step| step.start)
    }

    /// Output shape of each layer for a batch of `batch` images.
    pub fn output_shapes(&self, batch: usize) -> Vec<Vec<usize>> {
        let [c, h, w] = self.spec.input;
        let mut shape = vec![batch, c, h, w];
        self.layers
            .iter()
            .map(|layer| {
                // The spec was checked when the model was built, so every shape fits.
                shape = layer.output_shape(&shape).unwrap_or_default();
                shape.clone()
            })
            .collect()
    }

    /// Whether the spec's last layer is a Softmax (what Keras users write for a classifier).
    pub fn ends_in_softmax(&self) -> bool {
        matches!(self.spec.layers.last(), Some(LayerSpec::Softmax))
    }

    /// Scores `[N, classes]` (logits) for images `[N, C, H, W]`. A spec that ends in Softmax
    /// gives the logits before it, in training and evaluation alike: the softmax belongs to the
    /// loss (the fused, stable softmax cross-entropy, as Keras does for a softmax output with
    /// `categorical_crossentropy`) and to whoever turns scores into probabilities. Applying it
    /// here too would train through two softmaxes; the predicted classes are the same.
    pub fn forward(&mut self, images: Array4<f32>, mode: Mode) -> Result<Array2<f32>, NnError> {
        let [c, h, w] = self.spec.input;
        if images.shape()[1..] != [c, h, w] {
            return Err(NnError::Shape {
                layer: 0,
                kind: "input",
                detail: format!(
                    "model {} takes [N, {c}, {h}, {w}] images, got {:?}",
                    self.spec.name,
                    images.shape()
                ),
            });
        }
        let mut x: ArrayD<f32> = images.into_dyn();
        for step in &self.steps {
            let (index, layer) = (step.start, &mut self.layers[step.start]);
            let start = self.profile.is_some().then(Instant::now);
            // Frozen layers keep nothing for a backward pass that will not reach them.
            let mode = if index < self.frozen {
                Mode::Eval
            } else {
                mode
            };
            x = layer.forward(x, mode).map_err(|e| at_layer(e, index))?;
            if let (Some(start), Some(times)) = (start, self.profile.as_mut()) {
                times[index].forward += start.elapsed();
                times[index].forward_calls += 1;
            }
        }
        let shape = x.shape().to_vec();
        x.into_dimensionality::<Ix2>().map_err(|_| NnError::Shape {
            layer: self.layers.len() - 1,
            kind: "output",
            detail: format!("the model must end in [N, classes], ends in {shape:?}"),
        })
    }

    /// Backpropagates the gradient of the loss with respect to the scores, adding every
    /// parameter's gradient to its `grad`.
    pub fn backward(&mut self, grad: Array2<f32>) -> Result<(), NnError> {
        let mut g: ArrayD<f32> = grad.into_dyn();
        // The first step with anything to learn: nothing before it needs a gradient (the
        // images never do, frozen layers neither).
        let first_trainable = self
            .steps
            .iter()
            .find(|step| step.start >= self.frozen)
            .map_or(0, |step| step.start);
        for step in self.steps.iter().rev() {
            if step.start < first_trainable {
                break;
            }
            let (index, layer) = (step.start, &mut self.layers[step.start]);
            let start = self.profile.is_some().then(Instant::now);
            let next = layer
                .backward(g, index > first_trainable)
                .map_err(|e| at_layer(e, index))?;
            if let (Some(start), Some(times)) = (start, self.profile.as_mut()) {
                times[index].backward += start.elapsed();
                times[index].backward_calls += 1;
            }
            match next {
                Some(next) => g = next,
                None => break,
            }
        }
        Ok(())
    }

    /// Starts timing every layer's forward and backward passes, from zero.
    pub fn start_profiling(&mut self) {
        self.profile = Some(vec![LayerTimes::default(); self.layers.len()]);
    }

    /// The times since [`Sequential::start_profiling`], one entry per layer, and stops timing.
    pub fn take_profile(&mut self) -> Option<Vec<LayerTimes>> {
        self.profile.take()
    }

    /// Gives every random layer (Dropout) the generator of `epoch` of a run seeded with `seed`.
    pub fn reseed(&mut self, seed: u64, epoch: u64) {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            layer.reseed(crate::init::epoch_layer_rng(seed, index, epoch));
        }
    }

    /// Zeroes every gradient: its own step before each batch.
    pub fn zero_grad(&mut self) {
        for layer in &mut self.layers {
            for (_, param) in layer.params_mut() {
                param.zero_grad();
            }
        }
    }

    /// Calls `f` with every trainable parameter's name (`<layer index>.<name>`, as in a
    /// `torch.nn.Sequential` state dict) in a fixed order.
    pub fn visit_params(&self, mut f: impl FnMut(&str, &Param)) {
        for (index, layer) in self.layers.iter().enumerate() {
            for (name, param) in layer.params() {
                f(&format!("{index}.{name}"), param);
            }
        }
    }

    /// Like [`Sequential::visit_params_mut`], over the parameters of the layers that are not
    /// frozen: what the optimizer updates.
    pub fn visit_trainable_params_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut Param) -> Result<(), NnError>,
    ) -> Result<(), NnError> {
        let frozen = self.frozen;
        for (index, layer) in self.layers.iter_mut().enumerate().skip(frozen) {
            for (name, param) in layer.params_mut() {
                f(&format!("{index}.{name}"), param)?;
            }
        }
        Ok(())
    }

    /// Like [`Sequential::visit_params`], over the layers that are not frozen.
    pub fn visit_trainable_params(&self, mut f: impl FnMut(&str, &Param)) {
        for (index, layer) in self.layers.iter().enumerate().skip(self.frozen) {
            for (name, param) in layer.params() {
                f(&format!("{index}.{name}"), param);
            }
        }
    }

    /// Like [`Sequential::visit_params`], mutably; stops at the first error.
    pub fn visit_params_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut Param) -> Result<(), NnError>,
    ) -> Result<(), NnError> {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            for (name, param) in layer.params_mut() {
                f(&format!("{index}.{name}"), param)?;
            }
        }
        Ok(())
    }

    /// Calls `f` with every non-trainable state tensor's name and value, in a fixed order.
    pub fn visit_buffers(&self, mut f: impl FnMut(&str, &ArrayD<f32>)) {
        for (index, layer) in self.layers.iter().enumerate() {
            for (name, buffer) in layer.buffers() {
                f(&format!("{index}.{name}"), buffer);
            }
        }
    }

    /// Like [`Sequential::visit_buffers`], mutably; stops at the first error.
    pub fn visit_buffers_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut ArrayD<f32>) -> Result<(), NnError>,
    ) -> Result<(), NnError> {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            for (name, buffer) in layer.buffers_mut() {
                f(&format!("{index}.{name}"), buffer)?;
            }
        }
        Ok(())
    }

    /// Trainable and non-trainable scalars: frozen layers' parameters and saved state are
    /// non-trainable (BatchNorm's batch counter is not counted at all).
    pub fn param_counts(&self) -> ParamCounts {
        let mut counts = ParamCounts {
            trainable: 0,
            non_trainable: 0,
        };
        self.visit_trainable_params(|_, p| counts.trainable += p.len());
        let mut all = 0;
        self.visit_params(|_, p| all += p.len());
        counts.non_trainable = all - counts.trainable;
        self.visit_buffers(|name, b| {
            if !name.ends_with("num_batches_tracked") {
                counts.non_trainable += b.len();
            }
        });
        counts
    }
}

/// The pooling window of `layers` when they are a ReLU and then a max pooling.
fn relu_then_max_pool(layers: Option<&[Box<dyn Layer>]>) -> Option<PoolWindow> {
    let [relu, pool] = layers? else {
        return None;
    };
    (relu.spec() == LayerSpec::ReLU).then(|| max_pool(pool.as_ref()))?
}

/// The window and stride of `layer` when it is a max pooling.
fn max_pool(layer: &dyn Layer) -> Option<PoolWindow> {
    match layer.spec() {
        LayerSpec::MaxPool2d { kernel, stride } => Some((kernel, stride.unwrap_or(kernel))),
        _ => None,
    }
}

/// A layer's input error as the model's, naming the layer by its position.
fn at_layer(error: NnError, index: usize) -> NnError {
    match error {
        NnError::Input { kind, detail } => NnError::Shape {
            layer: index,
            kind,
            detail,
        },
        other => other,
    }
}
