//! Batch normalization over the channels of `[N, C, H, W]` (2d) or the features of `[N, F]`
//! (1d), as PyTorch defines it: batch statistics in training (biased variance to normalize,
//! unbiased to update the running variance), running statistics in evaluation.

use ndarray::{Array1, Array3, ArrayD, Axis, Ix1, Zip};

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
    /// From the last training pass: the normalized input `[N, C, S]` and 1 / sqrt(var + eps).
    cache: Option<(Array3<f32>, Array1<f32>, Vec<usize>)>,
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
        let (mean, var) = if mode == Mode::Train {
            if count < 2 {
                return Err(NnError::Input {
                    kind: self.kind(),
                    detail: format!(
                        "training needs more than one value per channel, got input {shape:?}"
                    ),
                });
            }
            // Statistics in f64: sums over tens of thousands of values.
            let mut mean = Array1::<f64>::zeros(self.features);
            let mut var = Array1::<f64>::zeros(self.features);
            for (c, (m, v)) in mean.iter_mut().zip(var.iter_mut()).enumerate() {
                let lane = x.index_axis(Axis(1), c);
                *m = lane.iter().map(|&v| f64::from(v)).sum::<f64>() / count as f64;
                *v = lane
                    .iter()
                    .map(|&v| (f64::from(v) - *m).powi(2))
                    .sum::<f64>()
                    / count as f64;
            }
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
            (mean.mapv(|v| v as f32), var.mapv(|v| v as f32))
        } else {
            (
                fixed::<Ix1>(&self.running_mean, "running_mean")?.to_owned(),
                fixed::<Ix1>(&self.running_var, "running_var")?.to_owned(),
            )
        };
        let inv_std = var.mapv(|v| 1.0 / (v + self.eps).sqrt());
        // x_hat = (x - mean) * inv_std, in place; y = gamma * x_hat + beta.
        for (c, mut lane) in x.axis_iter_mut(Axis(1)).enumerate() {
            let (m, is) = (mean[c], inv_std[c]);
            lane.map_inplace(|v| *v = (*v - m) * is);
        }
        let mut y = x.clone();
        for (c, mut lane) in y.axis_iter_mut(Axis(1)).enumerate() {
            let (g, b) = (gamma[c], beta[c]);
            lane.map_inplace(|v| *v = g * *v + b);
        }
        self.cache = (mode == Mode::Train).then_some((x, inv_std, shape.clone()));
        Ok(y.into_shape_with_order(shape)
            .unwrap_or_else(|e| unreachable!("same count: {e}")))
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let kind = self.kind();
        let (x_hat, inv_std, shape) = self.cache.as_ref().ok_or(NnError::NoForwardCache(kind))?;
        let dy = self.as_ncs(dy)?;
        let (n, _, s) = dy.dim();
        let count = (n * s) as f32;
        let mut dgamma = fixed_mut::<Ix1>(self.weight.grad_to_add(), "BatchNorm weight")?;
        let mut dbeta = fixed_mut::<Ix1>(self.bias.grad_to_add(), "BatchNorm bias")?;
        let mut sum_dy = Array1::<f32>::zeros(self.features);
        let mut sum_dy_xhat = Array1::<f32>::zeros(self.features);
        for c in 0..self.features {
            let (g, xh) = (dy.index_axis(Axis(1), c), x_hat.index_axis(Axis(1), c));
            sum_dy[c] = g.sum();
            sum_dy_xhat[c] = Zip::from(&g).and(&xh).fold(0.0, |acc, &g, &x| acc + g * x);
            dgamma[c] += sum_dy_xhat[c];
            dbeta[c] += sum_dy[c];
        }
        if !input_grad {
            return Ok(None);
        }
        // dx = gamma * inv_std / M * (M * dy - sum(dy) - x_hat * sum(dy * x_hat))
        let gamma = fixed::<Ix1>(&self.weight.value, "BatchNorm weight")?;
        let mut dx = dy;
        for (c, (mut lane, xh)) in dx
            .axis_iter_mut(Axis(1))
            .zip(x_hat.axis_iter(Axis(1)))
            .enumerate()
        {
            let scale = gamma[c] * inv_std[c] / count;
            let (sd, sdx) = (sum_dy[c], sum_dy_xhat[c]);
            Zip::from(&mut lane)
                .and(&xh)
                .for_each(|g, &x| *g = scale * (count * *g - sd - x * sdx));
        }
        Ok(Some(
            dx.into_shape_with_order(shape.clone())
                .unwrap_or_else(|e| unreachable!("same count: {e}")),
        ))
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
