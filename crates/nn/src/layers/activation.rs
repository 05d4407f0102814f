//! Elementwise activation layers: ReLU, LeakyReLU, Sigmoid, Tanh. Each keeps its output from a
//! training forward pass, which is all its derivative needs.

use ndarray::ArrayD;

use crate::error::NnError;
use crate::layer::{Layer, Mode};
use crate::spec::LayerSpec;

/// Which elementwise function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActivationKind {
    /// max(x, 0).
    Relu,
    /// x above 0, slope * x below.
    LeakyRelu(f32),
    /// 1 / (1 + exp(-x)).
    Sigmoid,
    /// tanh(x).
    Tanh,
}

/// An elementwise activation layer.
#[derive(Debug)]
pub struct Activation {
    kind: ActivationKind,
    output: Option<ArrayD<f32>>,
}

impl Activation {
    /// A layer applying `kind`.
    pub fn new(kind: ActivationKind) -> Activation {
        Activation { kind, output: None }
    }
}

impl Layer for Activation {
    fn kind(&self) -> &'static str {
        match self.kind {
            ActivationKind::Relu => "ReLU",
            ActivationKind::LeakyRelu(_) => "LeakyReLU",
            ActivationKind::Sigmoid => "Sigmoid",
            ActivationKind::Tanh => "Tanh",
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input.to_vec())
    }

    fn forward(&mut self, mut x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        match self.kind {
            ActivationKind::Relu => tensor::relu(x.view_mut()),
            ActivationKind::LeakyRelu(slope) => tensor::leaky_relu(x.view_mut(), slope),
            ActivationKind::Sigmoid => tensor::sigmoid(x.view_mut()),
            ActivationKind::Tanh => tensor::tanh(x.view_mut()),
        }
        match (mode, &mut self.output) {
            // Copy into the buffer of the previous batch rather than allocate a new one.
            (Mode::Train, Some(kept)) if kept.shape() == x.shape() => kept.assign(&x),
            (Mode::Train, kept) => *kept = Some(x.clone()),
            (Mode::Eval, kept) => *kept = None,
        }
        Ok(x)
    }

    fn backward(
        &mut self,
        mut grad: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let y = self
            .output
            .as_ref()
            .ok_or(NnError::NoForwardCache(self.kind()))?;
        if !input_grad {
            return Ok(None);
        }
        // The output gradient becomes the input gradient in place.
        let (y, g) = (y.view(), grad.view_mut());
        match self.kind {
            ActivationKind::Relu => tensor::relu_backward(y, g)?,
            ActivationKind::LeakyRelu(slope) => tensor::leaky_relu_backward(y, g, slope)?,
            ActivationKind::Sigmoid => tensor::sigmoid_backward(y, g)?,
            ActivationKind::Tanh => tensor::tanh_backward(y, g)?,
        }
        Ok(Some(grad))
    }

    fn spec(&self) -> LayerSpec {
        match self.kind {
            ActivationKind::Relu => LayerSpec::ReLU,
            ActivationKind::LeakyRelu(negative_slope) => LayerSpec::LeakyReLU { negative_slope },
            ActivationKind::Sigmoid => LayerSpec::Sigmoid,
            ActivationKind::Tanh => LayerSpec::Tanh,
        }
    }
}
