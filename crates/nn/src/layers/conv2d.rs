//! 2-D convolution layer: weight `[O, C, KH, KW]`, bias `[O]`, on `tensor`'s im2col + GEMM.

use ndarray::{Array4, ArrayD, Ix1, Ix4};
use rand_chacha::ChaCha8Rng;

use crate::error::NnError;
use crate::init::Init;
use crate::layer::{Fusion, Layer, Mode, PoolWindow};
use crate::layers::expect_dim;
use crate::layers::weights::{check_weight_and_bias, initial_weight_and_bias};
use crate::param::{Param, fixed, fixed_mut, weight_and_bias, weight_and_bias_mut};
use crate::spec::{LayerSpec, PaddingSpec};
use tensor::{
    Backward, BeforePool, Conv2dBuffers, Conv2dDims, Conv2dGrads, ConvAlgorithm, Pool2dDims,
    conv2d_backward, conv2d_forward, conv2d_max_pool_backward, conv2d_max_pool_forward,
};

/// The hyper-parameters of a [`Conv2d`], apart from its weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dConfig {
    /// C.
    pub in_channels: usize,
    /// O.
    pub out_channels: usize,
    /// `[KH, KW]`.
    pub kernel: [usize; 2],
    /// `[vertical, horizontal]`.
    pub stride: [usize; 2],
    /// Zero padding.
    pub padding: PaddingSpec,
    /// Whether there is a bias.
    pub bias: bool,
    /// Weight initialization; the bias always follows PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub init: Init,
}

impl Conv2dConfig {
    /// A layer with freshly initialized weights.
    pub fn init(self, rng: &mut ChaCha8Rng) -> Result<Conv2d, NnError> {
        let shape = self.weight_shape()?;
        let (weight, bias) = initial_weight_and_bias(self.init, &shape, self.bias, rng);
        self.with_weights(weight, bias)
    }

    /// A layer with these weights `[O, C, KH, KW]` and bias `[O]` (present exactly when the
    /// config has a bias), as a model file stores them.
    pub fn with_weights(
        self,
        weight: ArrayD<f32>,
        bias: Option<ArrayD<f32>>,
    ) -> Result<Conv2d, NnError> {
        let shape = self.weight_shape()?;
        check_weight_and_bias(&weight, bias.as_ref(), &shape, self.bias).map_err(refused)?;
        Ok(Conv2d {
            config: self,
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            // Chosen once, from the layer's shape (the algorithm does not depend on the batch
            // or the image size).
            buffers: Conv2dBuffers::new(self.algorithm()),
            forward_dims: None,
            fused_pool: None,
            pool_dims: None,
            argmax: Array4::zeros((0, 0, 0, 0)),
            spare_output: None,
        })
    }

    /// How this convolution is computed.
    pub fn algorithm(&self) -> ConvAlgorithm {
        ConvAlgorithm::for_layer(
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
        )
    }

    /// `[O, C, KH, KW]`, or why the config has none.
    fn weight_shape(&self) -> Result<[usize; 4], NnError> {
        let shape = [
            self.out_channels,
            self.in_channels,
            self.kernel[0],
            self.kernel[1],
        ];
        if shape.contains(&0) || self.stride.contains(&0) {
            return Err(refused(format!(
                "channels, kernel and stride must be at least 1: weight {shape:?}, stride {:?}",
                self.stride
            )));
        }
        Ok(shape)
    }
}

/// A configuration error of a convolution layer.
fn refused(detail: String) -> NnError {
    NnError::Config {
        what: "Conv2d",
        detail,
    }
}

/// A 2-D convolution over `[N, C, H, W]`.
#[derive(Debug)]
pub struct Conv2d {
    config: Conv2dConfig,
    weight: Param,
    bias: Option<Param>,
    /// The unfolded input of the last training forward pass, and scratch.
    buffers: Conv2dBuffers,
    /// The dimensions of the last training forward pass; `None` when there is nothing to
    /// differentiate.
    forward_dims: Option<Conv2dDims>,
    /// The max pooling window this layer computes, and whether a ReLU comes before it, when
    /// fused.
    fused_pool: Option<(PoolWindow, BeforePool)>,
    /// The pooling of the last fused training forward pass.
    pool_dims: Option<Pool2dDims>,
    /// Where each pooled maximum came from, in the last fused forward pass.
    argmax: Array4<u32>,
    /// The last backward pass's output gradient (of the pooled output, when fused), free
    /// once it has run: the next forward pass writes its output there (the same shape), not
    /// into fresh memory, whose page faults cost as much as a small layer's arithmetic.
    spare_output: Option<Array4<f32>>,
}

impl Conv2d {
    fn dims(&self, input: &[usize]) -> Result<Conv2dDims, String> {
        let &[n, c, h, w] = input else {
            return Err(format!("expected [N, C, H, W] input, got {input:?}"));
        };
        if c != self.config.in_channels {
            return Err(format!(
                "expected {} input channels, got {c}",
                self.config.in_channels
            ));
        }
        Conv2dDims::new(
            [n, c, h, w],
            self.config.out_channels,
            self.config.kernel,
            self.config.stride,
            self.config.padding.into(),
        )
        .map_err(|e| e.to_string())
    }

    fn shape_error(&self, detail: String) -> NnError {
        NnError::Input {
            kind: "Conv2d",
            detail,
        }
    }
}

impl Layer for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    fn algorithm(&self) -> Option<&'static str> {
        Some(self.config.algorithm().name())
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(self.dims(input)?.output_shape().to_vec())
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        let dims = self.dims(x.shape()).map_err(|e| self.shape_error(e))?;
        let x = expect_dim::<Ix4>(x, "Conv2d", "[N, C, H, W]")?;
        let weight = fixed::<Ix4>(&self.weight.value, "Conv2d weight")?;
        let bias = match &self.bias {
            Some(b) => Some(fixed::<Ix1>(&b.value, "Conv2d bias")?),
            None => None,
        };
        let backward = match mode {
            Mode::Train => Backward::Needed,
            Mode::Eval => Backward::NotNeeded,
        };
        let y = match self.fused_pool {
            None => {
                let mut y = output_array(&mut self.spare_output, dims.output_shape());
                conv2d_forward(
                    &dims,
                    x.view(),
                    weight,
                    bias,
                    &mut self.buffers,
                    backward,
                    y.view_mut(),
                )?;
                self.pool_dims = None;
                y
            }
            Some(((kernel, stride), before)) => {
                let pool = Pool2dDims::new(dims.output_shape(), kernel, stride)
                    .map_err(|e| self.shape_error(format!("the fused max pooling: {e}")))?;
                let mut y = output_array(&mut self.spare_output, pool.output_shape());
                // Inference keeps no argmax (only the backward pass reads it).
                let argmax = match mode {
                    Mode::Train => {
                        if self.argmax.shape() != pool.output_shape() {
                            self.argmax = Array4::zeros(pool.output_shape());
                        }
                        Some(self.argmax.view_mut())
                    }
                    Mode::Eval => None,
                };
                conv2d_max_pool_forward(
                    &dims,
                    &pool,
                    before,
                    x.view(),
                    weight,
                    bias,
                    &mut self.buffers,
                    backward,
                    y.view_mut(),
                    argmax,
                )?;
                self.pool_dims = Some(pool);
                y
            }
        };
        self.forward_dims = (mode == Mode::Train).then_some(dims);
        Ok(y.into_dyn())
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let dims = self.forward_dims.ok_or(NnError::NoForwardCache("Conv2d"))?;
        let dy = expect_dim::<Ix4>(dy, "Conv2d", "[N, O, OH, OW] gradient")?;
        let mut dx = input_grad.then(|| Array4::zeros(dims.input_shape()));
        let (weight, weight_grad) = self.weight.value_and_grad_to_add();
        let grads = Conv2dGrads {
            weight: fixed_mut::<Ix4>(weight_grad, "Conv2d weight")?,
            bias: match &mut self.bias {
                Some(b) => Some(fixed_mut::<Ix1>(b.grad_to_add(), "Conv2d bias")?),
                None => None,
            },
            input: dx.as_mut().map(|dx| dx.view_mut()),
        };
        let weight = fixed::<Ix4>(weight, "Conv2d weight")?;
        match &self.pool_dims {
            None => conv2d_backward(&dims, weight, dy.view(), &mut self.buffers, grads)?,
            Some(pool) => conv2d_max_pool_backward(
                &dims,
                pool,
                weight,
                dy.view(),
                self.argmax.view(),
                &mut self.buffers,
                grads,
            )?,
        }
        if dy.is_standard_layout() {
            self.spare_output = Some(dy);
        }
        Ok(dx.map(Array4::into_dyn))
    }

    fn fuse(&mut self, following: Fusion) -> bool {
        self.fused_pool = match following {
            Fusion::Alone => None,
            Fusion::ReluMaxPool(pool) => Some((pool, BeforePool::Relu)),
            Fusion::MaxPool(pool) => Some((pool, BeforePool::Nothing)),
            // A ReLU alone is cheap next to a convolution: not worth a third path.
            Fusion::Relu => return false,
        };
        self.forward_dims = None;
        self.fused_pool.is_some()
    }

    fn params(&self) -> Vec<(&'static str, &Param)> {
        weight_and_bias(&self.weight, self.bias.as_ref())
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        weight_and_bias_mut(&mut self.weight, self.bias.as_mut())
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::Conv2d {
            filters: self.config.out_channels,
            kernel: self.config.kernel,
            stride: self.config.stride,
            padding: self.config.padding,
            bias: self.config.bias,
            init: self.config.init,
        }
    }
}

/// An array of `shape` for a forward pass's output, every value of which it overwrites: the
/// `spare` output gradient when it has that shape.
fn output_array(spare: &mut Option<Array4<f32>>, shape: [usize; 4]) -> Array4<f32> {
    match spare.take() {
        Some(spare) if spare.shape() == shape => spare,
        _ => Array4::zeros(shape),
    }
}
