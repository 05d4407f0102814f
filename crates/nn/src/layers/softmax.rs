//! Softmax over the features of `[N, F]`, as an output layer for losses on probabilities.

use ndarray::{ArrayD, Axis};

use crate::error::NnError;
use crate::layer::{Layer, Mode};
use crate::spec::LayerSpec;

/// Softmax along axis 1; keeps its output from a training forward pass.
#[derive(Debug, Default)]
pub struct Softmax {
    output: Option<ArrayD<f32>>,
}

impl Layer for Softmax {
    fn kind(&self) -> &'static str {
        "Softmax"
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        if input.len() == 2 {
            Ok(input.to_vec())
        } else {
            Err(format!("expected [N, F] input, got {input:?}"))
        }
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        let mut y = ArrayD::zeros(x.raw_dim());
        tensor::softmax(x.view(), Axis(1), y.view_mut())?;
        self.output = (mode == Mode::Train).then(|| y.clone());
        Ok(y)
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let y = self
            .output
            .as_ref()
            .ok_or(NnError::NoForwardCache("Softmax"))?;
        if !input_grad {
            return Ok(None);
        }
        let mut dx = ArrayD::zeros(y.raw_dim());
        tensor::softmax_backward(y.view(), dy.view(), Axis(1), dx.view_mut())?;
        Ok(Some(dx))
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::Softmax
    }
}
