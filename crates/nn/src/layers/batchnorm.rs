//! Batch normalization over the channels of `[N, C, H, W]` (2d) or the features of `[N, F]`
//! (1d), as PyTorch defines it: batch statistics in training (biased variance to normalize,
//! unbiased to update the running variance), running statistics in evaluation.

use ndarray::{Array1, Array3, ArrayD, Ix1, Zip};

use crate::error::NnError;
use crate::layer::{Layer, Mode};
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
    /// From the last training pass: its input as `[N, C, S]`, the batch's statistics and the
    /// input's shape.
    cache: Option<TrainingCache>,
}

/// What a training pass keeps for its backward pass.
#[derive(Debug)]
struct TrainingCache {
    /// The input, `[N, C, S]`.
    input: Array3<f32>,
    /// The batch's mean per channel.
    mean: Array1<f32>,
    /// 1 / sqrt(var + eps) per channel.
    inv_std: Array1<f32>,
    /// The input's shape as the layer received it.
    shape: Vec<usize>,
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
            cache: None,
        })
    }
}

impl BatchNorm {
    /// The input as `[N, C, S]` with S the pixels per channel (1 for features).
    fn as_ncs(&self, x: ArrayD<f32>) -> Result<Array3<f32>, NnError> {
        let shape = x.shape().to_vec();
        self.output_shape(&shape).map_err(|detail| NnError::Input {
            kind: self.kind(),
            detail,
        })?;
        let s = shape[2..].iter().product::<usize>();
        let x = if x.is_standard_layout() {
            x
        } else {
            x.as_standard_layout().into_owned()
        };
        Ok(x.into_shape_with_order((shape[0], shape[1], s))
            .unwrap_or_else(|e| unreachable!("standard layout, same count: {e}")))
    }
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
        let shape = x.shape().to_vec();
        let mut x = self.as_ncs(x)?;
        let (n, _, s) = x.dim();
        let count = n * s;
        let gamma = fixed::<Ix1>(&self.weight.value, "BatchNorm weight")?;
        let beta = fixed::<Ix1>(&self.bias.value, "BatchNorm bias")?;
        if mode == Mode::Eval {
            // y = gamma * (x - mean) / sqrt(var + eps) + beta, as one scale and shift.
            let mean = fixed::<Ix1>(&self.running_mean, "running_mean")?;
            let var = fixed::<Ix1>(&self.running_var, "running_var")?;
            let scale = Zip::from(&gamma)
                .and(&var)
                .map_collect(|&g, &v| g / (v + self.eps).sqrt());
            let shift = Zip::from(&beta)
                .and(&scale)
                .and(&mean)
                .map_collect(|&b, &a, &m| b - a * m);
            tensor::scale_channels(x.view_mut(), scale.view(), shift.view())?;
            self.cache = None;
            return Ok(into_shape(x, shape));
        }
        if count < 2 {
            return Err(NnError::Input {
                kind: self.kind(),
                detail: format!(
                    "training needs more than one value per channel, got input {shape:?}"
                ),
            });
        }
        let (mean, var) = tensor::channel_mean_var(x.view())?;
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
        // The previous batch's input is free once this one starts: its buffer takes the output.
        let mut y = match self.cache.take() {
            Some(kept) if kept.input.dim() == x.dim() => kept.input,
            _ => Array3::zeros(x.dim()),
        };
        tensor::batch_norm_forward(
            x.view(),
            y.view_mut(),
            mean.view(),
            inv_std.view(),
            gamma,
            beta,
        )?;
        self.cache = Some(TrainingCache {
            input: x,
            mean,
            inv_std,
            shape: shape.clone(),
        });
        Ok(into_shape(y, shape))
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let kind = self.kind();
        let mut dy = self.as_ncs(dy)?;
        let cache = self.cache.as_ref().ok_or(NnError::NoForwardCache(kind))?;
        let shape = &cache.shape;
        if dy.dim() != cache.input.dim() {
            return Err(NnError::Input {
                kind,
                detail: format!(
                    "gradient of shape {:?} for an output of shape {shape:?}",
                    dy.shape()
                ),
            });
        }
        let gamma = fixed::<Ix1>(&self.weight.value, "BatchNorm weight")?.to_owned();
        let dgamma = fixed_mut::<Ix1>(self.weight.grad_to_add(), "BatchNorm weight")?;
        let dbeta = fixed_mut::<Ix1>(self.bias.grad_to_add(), "BatchNorm bias")?;
        tensor::batch_norm_backward(
            dy.view_mut(),
            cache.input.view(),
            cache.mean.view(),
            cache.inv_std.view(),
            gamma.view(),
            dgamma,
            dbeta,
            input_grad,
        )?;
        Ok(input_grad.then(|| into_shape(dy, shape.clone())))
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
