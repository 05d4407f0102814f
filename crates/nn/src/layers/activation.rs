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
    kept: Option<Kept>,
}

/// What a training forward pass keeps for the backward pass.
#[derive(Debug)]
enum Kept {
    /// A ReLU's: where its output was above 0 (`tensor::relu_keeping_signs`), for an output
    /// of `shape`.
    Signs { signs: Vec<u64>, shape: Vec<usize> },
    /// Another activation's (or a ReLU's output not in standard layout): the output.
    Output(ArrayD<f32>),
}

impl Activation {
    /// A layer applying `kind`.
    pub fn new(kind: ActivationKind) -> Activation {
        Activation { kind, kept: None }
    }

    /// A ReLU's training forward pass on values in standard layout: only their signs kept.
    fn relu_keeping_signs(&mut self, x: &mut ArrayD<f32>) -> Result<bool, NnError> {
        let shape = x.shape().to_vec();
        let Some(values) = x.as_slice_mut() else {
            return Ok(false);
        };
        // The words of the previous batch's signs, when there are any, rather than new ones.
        let mut signs = match self.kept.take() {
            Some(Kept::Signs { signs, .. }) => signs,
            _ => Vec::new(),
        };
        signs.resize(tensor::sign_words(values.len()), 0);
        tensor::relu_keeping_signs(values, &mut signs)?;
        self.kept = Some(Kept::Signs { signs, shape });
        Ok(true)
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
        if mode == Mode::Train
            && self.kind == ActivationKind::Relu
            && self.relu_keeping_signs(&mut x)?
        {
            return Ok(x);
        }
        match self.kind {
            ActivationKind::Relu => tensor::relu(x.view_mut()),
            ActivationKind::LeakyRelu(slope) => tensor::leaky_relu(x.view_mut(), slope),
            ActivationKind::Sigmoid => tensor::sigmoid(x.view_mut()),
            ActivationKind::Tanh => tensor::tanh(x.view_mut()),
        }
        match (mode, &mut self.kept) {
            // Copy into the buffer of the previous batch rather than allocate a new one.
            (Mode::Train, Some(Kept::Output(kept))) if kept.shape() == x.shape() => kept.assign(&x),
            (Mode::Train, kept) => *kept = Some(Kept::Output(x.clone())),
            (Mode::Eval, kept) => *kept = None,
        }
        Ok(x)
    }

    fn backward(
        &mut self,
        mut grad: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let kept = self
            .kept
            .as_ref()
            .ok_or(NnError::NoForwardCache(self.kind()))?;
        if !input_grad {
            return Ok(None);
        }
        // The output gradient becomes the input gradient in place.
        let y = match kept {
            Kept::Signs { signs, shape } => {
                if grad.shape() != shape.as_slice() {
                    return Err(NnError::Input {
                        kind: self.kind(),
                        detail: format!(
                            "gradient of shape {:?} for an output of shape {shape:?}",
                            grad.shape()
                        ),
                    });
                }
                if !grad.is_standard_layout() {
                    grad = grad.as_standard_layout().into_owned();
                }
                let values = grad
                    .as_slice_mut()
                    .unwrap_or_else(|| unreachable!("the gradient is in standard layout"));
                tensor::relu_backward_from_signs(signs, values)?;
                return Ok(Some(grad));
            }
            Kept::Output(y) => y.view(),
        };
        let g = grad.view_mut();
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

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ArrayD};

    use super::*;

    /// A training forward and backward pass of a ReLU layer.
    fn relu_pass(x: ArrayD<f32>, dy: ArrayD<f32>) -> (ArrayD<f32>, ArrayD<f32>) {
        let mut layer = Activation::new(ActivationKind::Relu);
        let y = layer.forward(x, Mode::Train).unwrap();
        let dx = layer.backward(dy, true).unwrap().unwrap();
        (y, dx)
    }

    #[test]
    fn a_relu_keeps_signs_or_its_output_to_the_same_values() {
        // Standard layout keeps signs; a transposed input (not in standard layout) and a
        // transposed gradient take the other paths.
        let x = Array2::from_shape_fn((9, 70), |(i, j)| ((i * 31 + j * 7) % 13) as f32 - 6.0);
        let dy = Array2::from_shape_fn((9, 70), |(i, j)| (i * 70 + j) as f32);
        let (y, dx) = relu_pass(x.clone().into_dyn(), dy.clone().into_dyn());
        let x_t = x
            .t()
            .as_standard_layout()
            .into_owned()
            .reversed_axes()
            .into_dyn();
        let dy_t = dy
            .t()
            .as_standard_layout()
            .into_owned()
            .reversed_axes()
            .into_dyn();
        assert!(!x_t.is_standard_layout());
        let (y_t, dx_t) = relu_pass(x_t, dy_t.clone());
        let (_, dx_mixed) = relu_pass(x.clone().into_dyn(), dy_t);
        assert_eq!(y, y_t);
        assert_eq!(dx, dx_t);
        assert_eq!(dx, dx_mixed);
        let expected =
            Array2::from_shape_fn(
                (9, 70),
                |(i, j)| {
                    if x[(i, j)] > 0.0 { dy[(i, j)] } else { 0.0 }
                },
            );
        assert_eq!(dx, expected.into_dyn());
    }

    #[test]
    fn a_relu_refuses_a_gradient_of_another_shape() {
        let mut layer = Activation::new(ActivationKind::Relu);
        layer
            .forward(ArrayD::zeros(vec![4, 5]), Mode::Train)
            .unwrap();
        let error = layer.backward(ArrayD::zeros(vec![5, 4]), true).unwrap_err();
        assert!(error.to_string().contains("[5, 4]"), "{error}");
    }
}
