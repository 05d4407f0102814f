//! Max and average pooling layers over `[N, C, H, W]`.

use ndarray::{Array4, ArrayD, Ix4};

use crate::error::NnError;
use crate::layer::{Layer, Mode};
use crate::layers::expect_dim;
use crate::spec::LayerSpec;
use tensor::{
    Pool2dDims, avg_pool2d_backward, avg_pool2d_forward, max_pool2d_backward, max_pool2d_forward,
};

/// Which statistic a pooling window takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The maximum (remembering where it was, for the backward pass).
    Max,
    /// The mean.
    Average,
}

/// A pooling layer with no padding (Keras' default).
#[derive(Debug)]
pub struct Pool2d {
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// The dimensions of the last training forward pass.
    forward_dims: Option<Pool2dDims>,
    /// Where each maximum came from (max pooling only).
    argmax: Array4<u32>,
}

/// The hyper-parameters of a [`Pool2d`] layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dConfig {
    /// Maximum or mean.
    pub kind: PoolKind,
    /// The window `[KH, KW]`.
    pub kernel: [usize; 2],
    /// How far it moves, `[vertical, horizontal]`.
    pub stride: [usize; 2],
}

impl Pool2dConfig {
    /// The layer.
    pub fn init(self) -> Result<Pool2d, NnError> {
        let Pool2dConfig {
            kind,
            kernel,
            stride,
        } = self;
        if kernel.contains(&0) || stride.contains(&0) {
            return Err(NnError::Config {
                what: "pooling",
                detail: format!("kernel {kernel:?} and stride {stride:?} must be at least 1"),
            });
        }
        Ok(Pool2d {
            kind,
            kernel,
            stride,
            forward_dims: None,
            argmax: Array4::zeros((0, 0, 0, 0)),
        })
    }
}

impl Pool2d {
    fn dims(&self, input: &[usize]) -> Result<Pool2dDims, String> {
        let &[n, c, h, w] = input else {
            return Err(format!("expected [N, C, H, W] input, got {input:?}"));
        };
        Pool2dDims::new([n, c, h, w], self.kernel, self.stride).map_err(|e| e.to_string())
    }
}

impl Layer for Pool2d {
    fn kind(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "MaxPool2d",
            PoolKind::Average => "AvgPool2d",
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(self.dims(input)?.output_shape().to_vec())
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        let kind = self.kind();
        let dims = self
            .dims(x.shape())
            .map_err(|detail| NnError::Input { kind, detail })?;
        let x = expect_dim::<Ix4>(x, kind, "[N, C, H, W]")?;
        let mut y = Array4::zeros(dims.output_shape());
        match self.kind {
            PoolKind::Max => {
                if self.argmax.shape() != dims.output_shape() {
                    self.argmax = Array4::zeros(dims.output_shape());
                }
                max_pool2d_forward(&dims, x.view(), y.view_mut(), self.argmax.view_mut())?;
            }
            PoolKind::Average => avg_pool2d_forward(&dims, x.view(), y.view_mut())?,
        }
        self.forward_dims = (mode == Mode::Train).then_some(dims);
        Ok(y.into_dyn())
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let kind = self.kind();
        let dims = self.forward_dims.ok_or(NnError::NoForwardCache(kind))?;
        if !input_grad {
            return Ok(None);
        }
        let dy = expect_dim::<Ix4>(dy, kind, "[N, C, OH, OW] gradient")?;
        let mut dx = Array4::zeros(dims.input_shape());
        match self.kind {
            PoolKind::Max => {
                max_pool2d_backward(&dims, dy.view(), self.argmax.view(), dx.view_mut())?
            }
            PoolKind::Average => avg_pool2d_backward(&dims, dy.view(), dx.view_mut())?,
        }
        Ok(Some(dx.into_dyn()))
    }

    fn spec(&self) -> LayerSpec {
        let stride = (self.stride != self.kernel).then_some(self.stride);
        match self.kind {
            PoolKind::Max => LayerSpec::MaxPool2d {
                kernel: self.kernel,
                stride,
            },
            PoolKind::Average => LayerSpec::AvgPool2d {
                kernel: self.kernel,
                stride,
            },
        }
    }
}
