//! Flatten: `[N, C, H, W]` to `[N, C*H*W]` in logical C, H, W order (PyTorch's `nn.Flatten`),
//! whatever the memory layout.

use ndarray::{ArrayD, IxDyn};

use crate::error::NnError;
use crate::layer::{Layer, Mode};
use crate::spec::LayerSpec;

/// Flattens every axis after the batch into one.
#[derive(Debug, Default)]
pub struct Flatten {
    input_shape: Option<Vec<usize>>,
}

impl Layer for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        match input.split_first() {
            Some((&n, rest)) if !rest.is_empty() => Ok(vec![n, rest.iter().product()]),
            _ => Err(format!(
                "needs a batch axis and at least one more, got {input:?}"
            )),
        }
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        let shape = x.shape().to_vec();
        let out = self.output_shape(&shape).map_err(|detail| NnError::Input {
            kind: "Flatten",
            detail,
        })?;
        self.input_shape = (mode == Mode::Train).then_some(shape);
        Ok(reshape(x, &out))
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let shape = self
            .input_shape
            .as_ref()
            .ok_or(NnError::NoForwardCache("Flatten"))?;
        Ok(input_grad.then(|| reshape(dy, shape)))
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::Flatten
    }
}

/// Reshapes in logical (row-major) order: free for standard-layout arrays, a copy otherwise.
fn reshape(x: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let x = if x.is_standard_layout() {
        x
    } else {
        x.as_standard_layout().into_owned()
    };
    x.into_shape_with_order(IxDyn(shape))
        .unwrap_or_else(|e| unreachable!("same element count, standard layout: {e}"))
}
