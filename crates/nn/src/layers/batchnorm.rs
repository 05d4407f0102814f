//! Batch normalization over the channels of `[N, C, H, W]` (2d) or the features of `[N, F]`
//! (1d), as PyTorch defines it: batch statistics in training (biased variance to normalize,
//! unbiased to update the running variance), running statistics in evaluation. It computes the
//! ReLU after it, or the ReLU and max pooling, in the same pass when the model fuses them.

use ndarray::{
    Array1, Array3, Array4, ArrayBase, ArrayD, ArrayView3, Ix1, Ix4, IxDyn, RawData, Zip,
};
use tensor::{ChannelNormalization, Pool2dDims};

use crate::error::NnError;
use crate::layer::{Fusion, Layer, Mode};
use crate::param::{Param, fixed, fixed_mut};
use crate::spec::LayerSpec;

/// A batch-normalization layer: trainable scale `weight` (gamma) and shift `bias` (beta),
/// running mean and variance, and the count of batches seen.
#[derive(Debug)]
pub struct BatchNorm {
    features: usize,
    /// 4 for BatchNorm2d, 2 for BatchNorm1d.
    rank: usize,
    eps: f32,
    momentum: f32,
    weight: Param,
    bias: Param,
    running_mean: ArrayD<f32>,
    running_var: ArrayD<f32>,
    num_batches_tracked: ArrayD<f32>,
    /// The layers after this one that it computes.
    fusion: Fusion,
    /// From the last training pass, what its backward pass needs.
    cache: Option<TrainingCache>,
    /// Where each pooled maximum came from, in the last fused training pass with pooling.
    argmax: Array4<u32>,
    /// The last pooled backward pass's output gradient, free once it has run: the next
    /// pooled training pass writes its output there (the same shape), not into fresh memory.
    spare_output: Option<Array4<f32>>,
}

/// What a training pass keeps for its backward pass.
#[derive(Debug)]
struct TrainingCache {
    /// The input, in standard layout.
    input: ArrayD<f32>,
    /// The batch's mean per channel.
    mean: Array1<f32>,
    /// 1 / sqrt(var + eps) per channel.
    inv_std: Array1<f32>,
    /// The fusion the pass ran with, and its pooling.
    fusion: Fusion,
    pool: Option<Pool2dDims>,
}

impl TrainingCache {
    /// The input as `[N, C, S]`.
    fn ncs(&self) -> Result<ArrayView3<'_, f32>, NnError> {
        ncs_view(self.input.view())
    }
}

/// The `[N, C, S]` shape of an `[N, C, ...]` one, S the product of the rest (1 if none).
fn ncs_shape(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product())
}

/// Why an array cannot be seen as `[N, C, S]` (it is not in standard layout).
fn not_ncs(e: ndarray::ShapeError) -> NnError {
    NnError::Input {
        kind: "BatchNorm",
        detail: format!("cannot view the input as [N, C, S]: {e}"),
    }
}

/// A standard-layout `[N, C, ...]` array as `[N, C, S]`.
fn ncs_view(x: ndarray::ArrayViewD<'_, f32>) -> Result<ArrayView3<'_, f32>, NnError> {
    let shape = ncs_shape(x.shape());
    x.into_shape_with_order(shape).map_err(not_ncs)
}

/// A standard-layout array (or view, mutable or not) as `[N, C, H, W]`.
fn nchw<S: RawData<Elem = f32>>(x: ArrayBase<S, IxDyn>) -> Result<ArrayBase<S, Ix4>, NnError> {
    x.into_dimensionality().map_err(|e| NnError::Input {
        kind: "BatchNorm",
        detail: format!("pooling needs [N, C, H, W] input: {e}"),
    })
}

/// The hyper-parameters of a [`BatchNorm`] layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// The channels (of `[N, C, H, W]`) or features (of `[N, F]`) normalized.
    pub features: usize,
    /// 4 for images (BatchNorm2d), 2 for features (BatchNorm1d).
    pub rank: usize,
    /// Added to the variance.
    pub eps: f32,
    /// The running statistics' update weight (PyTorch's convention).
    pub momentum: f32,
}

impl BatchNormConfig {
    /// The layer: scale 1, shift 0, running mean 0 and variance 1, as PyTorch starts.
    pub fn init(self) -> Result<BatchNorm, NnError> {
        let BatchNormConfig {
            features,
            rank,
            eps,
            momentum,
        } = self;
        if eps.is_nan() || eps <= 0.0 || !(0.0..=1.0).contains(&momentum) || ![2, 4].contains(&rank)
        {
            return Err(NnError::Config {
                what: "BatchNorm",
                detail: format!(
                    "eps {eps} must be positive, momentum {momentum} in [0, 1] and rank {rank} \
                     2 or 4"
                ),
            });
        }
        Ok(BatchNorm {
            features,
            rank,
            eps,
            momentum,
            weight: Param::new(ArrayD::ones(vec![features])),
            bias: Param::zeros(&[features]),
            running_mean: ArrayD::zeros(vec![features]),
            running_var: ArrayD::ones(vec![features]),
            num_batches_tracked: ArrayD::zeros(vec![]),
            fusion: Fusion::Alone,
            cache: None,
            argmax: Array4::zeros((0, 0, 0, 0)),
            spare_output: None,
        })
    }
}

impl BatchNorm {
    /// [`Layer::backward`] from the forward pass's `cache`, whose input the pooled pass
    /// consumes.
    fn backward_from(
        &mut self,
        cache: &mut TrainingCache,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let kind = self.kind();
        let (gamma, dgamma) = self.weight.value_and_grad_to_add();
        let (beta, dbeta) = self.bias.value_and_grad_to_add();
        let normalization = ChannelNormalization {
            mean: cache.mean.view(),
            inv_std: cache.inv_std.view(),
            gamma: fixed::<Ix1>(gamma, "BatchNorm weight")?,
            beta: fixed::<Ix1>(beta, "BatchNorm bias")?,
        };
        let dgamma = fixed_mut::<Ix1>(dgamma, "BatchNorm weight")?;
        let dbeta = fixed_mut::<Ix1>(dbeta, "BatchNorm bias")?;
        let wrong_gradient = |dy: &ArrayD<f32>| NnError::Input {
            kind,
            detail: format!(
                "gradient of shape {:?} for an input of shape {:?}",
                dy.shape(),
                cache.input.shape()
            ),
        };
        if let Some(pool) = cache.pool {
            if dy.shape() != pool.output_shape() {
                return Err(wrong_gradient(&dy));
            }
            let dy = standard_layout(dy);
            // The input becomes its own gradient: this pass is the last to read it.
            let mut input = std::mem::take(&mut cache.input);
            tensor::batch_norm_relu_max_pool_backward(
                nchw(dy.view())?,
                self.argmax.view(),
                &pool,
                nchw(input.view_mut())?,
                normalization,
                dgamma,
                dbeta,
                input_grad,
            )?;
            self.spare_output = dy.into_dimensionality().ok();
            return Ok(input_grad.then_some(input));
        }
        if dy.shape() != cache.input.shape() {
            return Err(wrong_gradient(&dy));
        }
        let shape = dy.shape().to_vec();
        let mut dy = into_ncs(standard_layout(dy))?;
        tensor::batch_norm_backward(
            dy.view_mut(),
            cache.ncs()?,
            normalization,
            cache.fusion == Fusion::Relu,
            dgamma,
            dbeta,
            input_grad,
        )?;
        Ok(input_grad.then(|| into_shape(dy, shape)))
    }

    /// Checks an input's shape, and gives it in standard layout.
    fn checked(&self, x: ArrayD<f32>) -> Result<ArrayD<f32>, NnError> {
        self.output_shape(x.shape())
            .map_err(|detail| NnError::Input {
                kind: self.kind(),
                detail,
            })?;
        Ok(standard_layout(x))
    }

    /// The pooling a fused forward pass of input `shape` runs, if any.
    fn pool_dims(&self, shape: &[usize]) -> Result<Option<Pool2dDims>, NnError> {
        let Fusion::ReluMaxPool((kernel, stride)) = self.fusion else {
            return Ok(None);
        };
        let &[n, c, h, w] = shape else {
            return Err(NnError::Input {
                kind: self.kind(),
                detail: format!("pooling needs [N, C, H, W] input, got {shape:?}"),
            });
        };
        Pool2dDims::new([n, c, h, w], kernel, stride)
            .map(Some)
            .map_err(|e| NnError::Input {
                kind: self.kind(),
                detail: format!("the fused max pooling: {e}"),
            })
    }

    /// Evaluation: the running statistics folded into one scale and shift per channel,
    /// `y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift`.
    fn eval_forward(&mut self, x: ArrayD<f32>) -> Result<ArrayD<f32>, NnError> {
        let gamma = fixed::<Ix1>(&self.weight.value, "BatchNorm weight")?;
        let beta = fixed::<Ix1>(&self.bias.value, "BatchNorm bias")?;
        let mean = fixed::<Ix1>(&self.running_mean, "running_mean")?;
        let var = fixed::<Ix1>(&self.running_var, "running_var")?;
        let scale = Zip::from(&gamma)
            .and(&var)
            .map_collect(|&g, &v| g / (v + self.eps).sqrt());
        let shift = Zip::from(&beta)
            .and(&scale)
            .and(&mean)
            .map_collect(|&b, &a, &m| b - a * m);
        self.cache = None;
        if let Some(pool) = self.pool_dims(x.shape())? {
            // scale * ((x - 0) * 1) + shift: the same bits as `scale_channels`.
            let (zeros, ones) = (Array1::zeros(self.features), Array1::ones(self.features));
            let normalization = ChannelNormalization {
                mean: zeros.view(),
                inv_std: ones.view(),
                gamma: scale.view(),
                beta: shift.view(),
            };
            let mut y = Array4::zeros(pool.output_shape());
            tensor::batch_norm_relu_max_pool_forward(
                nchw(x.view())?,
                &pool,
                normalization,
                y.view_mut(),
                None,
            )?;
            return Ok(y.into_dyn());
        }
        let shape = x.shape().to_vec();
        let mut x = into_ncs(x)?;
        tensor::scale_channels(x.view_mut(), scale.view(), shift.view())?;
        if self.fusion == Fusion::Relu {
            tensor::relu(x.view_mut());
        }
        Ok(into_shape(x, shape))
    }
}

/// `x` in standard layout, copied only when it is not.
fn standard_layout(x: ArrayD<f32>) -> ArrayD<f32> {
    if x.is_standard_layout() {
        x
    } else {
        x.as_standard_layout().into_owned()
    }
}

/// A standard-layout `[N, C, ...]` array as an owned `[N, C, S]` one.
fn into_ncs(x: ArrayD<f32>) -> Result<Array3<f32>, NnError> {
    let shape = ncs_shape(x.shape());
    x.into_shape_with_order(shape).map_err(not_ncs)
}

/// `[N, C, S]` values back in the layer's shape (the same count, in standard layout).
fn into_shape(x: Array3<f32>, shape: Vec<usize>) -> ArrayD<f32> {
    x.into_shape_with_order(shape)
        .unwrap_or_else(|e| unreachable!("same count: {e}"))
}

impl Layer for BatchNorm {
    fn kind(&self) -> &'static str {
        if self.rank == 4 {
            "BatchNorm2d"
        } else {
            "BatchNorm1d"
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        if input.len() != self.rank || input[1] != self.features {
            let want = if self.rank == 4 {
                "[N, C, H, W]"
            } else {
                "[N, F]"
            };
            return Err(format!(
                "expected {want} input with {} channels, got {input:?}",
                self.features
            ));
        }
        Ok(input.to_vec())
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        let x = self.checked(x)?;
        if mode == Mode::Eval {
            return self.eval_forward(x);
        }
        let shape = x.shape().to_vec();
        let pool = self.pool_dims(&shape)?;
        let ncs = ncs_view(x.view())?;
        let (n, _, s) = ncs.dim();
        let count = n * s;
        if count < 2 {
            return Err(NnError::Input {
                kind: self.kind(),
                detail: format!(
                    "training needs more than one value per channel, got input {shape:?}"
                ),
            });
        }
        let (mean, var) = tensor::channel_mean_var(ncs)?;
        let unbiased = count as f64 / (count - 1) as f64;
        let m = f64::from(self.momentum);
        let mut running_mean = fixed_mut::<Ix1>(&mut self.running_mean, "running_mean")?;
        Zip::from(&mut running_mean)
            .and(&mean)
            .for_each(|r, &b| *r = ((1.0 - m) * f64::from(*r) + m * b) as f32);
        let mut running_var = fixed_mut::<Ix1>(&mut self.running_var, "running_var")?;
        Zip::from(&mut running_var)
            .and(&var)
            .for_each(|r, &b| *r = ((1.0 - m) * f64::from(*r) + m * b * unbiased) as f32);
        self.num_batches_tracked.map_inplace(|t| *t += 1.0);
        let mean = Array1::from_iter(mean.iter().map(|&v| v as f32));
        let inv_std = Array1::from_iter(var.iter().map(|&v| 1.0 / (v as f32 + self.eps).sqrt()));
        let gamma = fixed::<Ix1>(&self.weight.value, "BatchNorm weight")?;
        let beta = fixed::<Ix1>(&self.bias.value, "BatchNorm bias")?;
        let normalization = ChannelNormalization {
            mean: mean.view(),
            inv_std: inv_std.view(),
            gamma,
            beta,
        };
        let y = match pool {
            Some(pool) => {
                if self.argmax.shape() != pool.output_shape() {
                    self.argmax = Array4::zeros(pool.output_shape());
                }
                // Every value is overwritten.
                let mut y = match self.spare_output.take() {
                    Some(spare) if spare.shape() == pool.output_shape() => spare,
                    _ => Array4::zeros(pool.output_shape()),
                };
                tensor::batch_norm_relu_max_pool_forward(
                    nchw(x.view())?,
                    &pool,
                    normalization,
                    y.view_mut(),
                    Some(self.argmax.view_mut()),
                )?;
                y.into_dyn()
            }
            None => {
                // The previous batch's input is free once this one starts: its buffer takes
                // the output.
                let mut y = match self.cache.take() {
                    Some(kept) if kept.input.shape() == shape.as_slice() => into_ncs(kept.input)?,
                    _ => Array3::zeros(ncs.dim()),
                };
                let relu = self.fusion == Fusion::Relu;
                tensor::batch_norm_forward(ncs, y.view_mut(), normalization, relu)?;
                into_shape(y, shape)
            }
        };
        self.cache = Some(TrainingCache {
            input: x,
            mean,
            inv_std,
            fusion: self.fusion,
            pool,
        });
        Ok(y)
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let mut cache = self
            .cache
            .take()
            .ok_or(NnError::NoForwardCache(self.kind()))?;
        let result = self.backward_from(&mut cache, dy, input_grad);
        // The pooled pass turned the input into its gradient; otherwise the next forward
        // pass writes its output into the input's buffer.
        if cache.pool.is_none() {
            self.cache = Some(cache);
        }
        result
    }

    fn fuse(&mut self, following: Fusion) -> bool {
        // Pooling needs images; BatchNorm1d fuses a ReLU only. Pooling without a ReLU before
        // it has no kernel here (no network was seen to want it).
        match following {
            Fusion::ReluMaxPool(_) if self.rank != 4 => return false,
            Fusion::MaxPool(_) => return false,
            _ => {}
        }
        self.fusion = following;
        self.cache = None;
        following != Fusion::Alone
    }

    fn params(&self) -> Vec<(&'static str, &Param)> {
        vec![("weight", &self.weight), ("bias", &self.bias)]
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        vec![("weight", &mut self.weight), ("bias", &mut self.bias)]
    }

    fn buffers(&self) -> Vec<(&'static str, &ArrayD<f32>)> {
        vec![
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
            ("num_batches_tracked", &self.num_batches_tracked),
        ]
    }

    fn buffers_mut(&mut self) -> Vec<(&'static str, &mut ArrayD<f32>)> {
        vec![
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
            ("num_batches_tracked", &mut self.num_batches_tracked),
        ]
    }

    fn spec(&self) -> LayerSpec {
        if self.rank == 4 {
            LayerSpec::BatchNorm2d {
                eps: self.eps,
                momentum: self.momentum,
            }
        } else {
            LayerSpec::BatchNorm1d {
                eps: self.eps,
                momentum: self.momentum,
            }
        }
    }
}
