//! Fully connected layer (Keras' Dense, PyTorch's Linear): `y [N, out] = x [N, in] * W^T + b`, with W
//! `[out, in]` as PyTorch stores it.

use ndarray::{Array2, ArrayD, Ix1, Ix2, Zip};
use rand_chacha::ChaCha8Rng;

use crate::error::NnError;
use crate::init::Init;
use crate::layer::{Layer, Mode};
use crate::layers::expect_dim;
use crate::layers::weights::{check_weight_and_bias, initial_weight_and_bias};
use crate::param::{Param, fixed, fixed_mut, weight_and_bias, weight_and_bias_mut};
use crate::spec::LayerSpec;
use tensor::gemm_parallel;

/// A dense layer; keeps its input from a training forward pass for the weight gradient.
#[derive(Debug)]
pub struct Dense {
    in_features: usize,
    out_features: usize,
    init: Init,
    weight: Param,
    bias: Option<Param>,
    input: Option<Array2<f32>>,
}

/// The hyper-parameters of a [`Dense`] layer, apart from its weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseConfig {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether there is a bias.
    pub bias: bool,
    /// Weight initialization; the bias follows PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub init: Init,
}

impl DenseConfig {
    /// A layer with freshly initialized weights.
    pub fn init(self, rng: &mut ChaCha8Rng) -> Result<Dense, NnError> {
        let shape = self.weight_shape()?;
        let (weight, bias) = initial_weight_and_bias(self.init, &shape, self.bias, rng);
        self.with_weights(weight, bias)
    }

    /// A layer with these weights `[out, in]` and bias `[out]` (present exactly when the
    /// config has a bias), as a model file stores them.
    pub fn with_weights(
        self,
        weight: ArrayD<f32>,
        bias: Option<ArrayD<f32>>,
    ) -> Result<Dense, NnError> {
        let shape = self.weight_shape()?;
        check_weight_and_bias(&weight, bias.as_ref(), &shape, self.bias).map_err(refused)?;
        Ok(Dense {
            in_features: self.in_features,
            out_features: self.out_features,
            init: self.init,
            weight: Param::new(weight),
            bias: bias.map(Param::new),
            input: None,
        })
    }

    /// `[out, in]`, or why the config has none.
    fn weight_shape(&self) -> Result<[usize; 2], NnError> {
        if self.in_features == 0 || self.out_features == 0 {
            return Err(refused(format!(
                "{} -> {} features: both must be at least 1",
                self.in_features, self.out_features
            )));
        }
        Ok([self.out_features, self.in_features])
    }
}

/// A configuration error of a dense layer.
fn refused(detail: String) -> NnError {
    NnError::Config {
        what: "Dense",
        detail,
    }
}

impl Layer for Dense {
    fn kind(&self) -> &'static str {
        "Dense"
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        match *input {
            [n, f] if f == self.in_features => Ok(vec![n, self.out_features]),
            _ => Err(format!(
                "expected [N, {}] input, got {input:?}",
                self.in_features
            )),
        }
    }

    fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        self.output_shape(x.shape())
            .map_err(|detail| NnError::Input {
                kind: "Dense",
                detail,
            })?;
        let x = expect_dim::<Ix2>(x, "Dense", "[N, F]")?;
        let w = fixed::<Ix2>(&self.weight.value, "Dense weight")?;
        let mut y = Array2::zeros((x.nrows(), self.out_features));
        let beta = match &self.bias {
            Some(b) => {
                // Start from the bias; GEMM adds x W^T onto it.
                let b = fixed::<Ix1>(&b.value, "Dense bias")?;
                y.rows_mut().into_iter().for_each(|mut row| row.assign(&b));
                1.0
            }
            None => 0.0,
        };
        // y [N, out] = x [N, in] * W^T [in, out]
        gemm_parallel(1.0, x.view(), w.t(), beta, y.view_mut())?;
        self.input = (mode == Mode::Train).then_some(x);
        Ok(y.into_dyn())
    }

    fn backward(
        &mut self,
        dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let x = self
            .input
            .as_ref()
            .ok_or(NnError::NoForwardCache("Dense"))?;
        let dy = expect_dim::<Ix2>(dy, "Dense", "[N, out] gradient")?;
        // dW [out, in] (+)= dy^T [out, N] * x [N, in]
        let (dw, beta) = self.weight.grad_to_write();
        let dw = fixed_mut::<Ix2>(dw, "Dense weight")?;
        gemm_parallel(1.0, dy.t(), x.view(), beta, dw)?;
        if let Some(b) = &mut self.bias {
            // db [out] += sum over the batch of dy
            let mut db = fixed_mut::<Ix1>(b.grad_to_add(), "Dense bias")?;
            for row in dy.rows() {
                Zip::from(&mut db).and(&row).for_each(|d, &g| *d += g);
            }
        }
        if !input_grad {
            return Ok(None);
        }
        // dx [N, in] = dy [N, out] * W [out, in]
        let mut dx = Array2::zeros((dy.nrows(), self.in_features));
        gemm_parallel(
            1.0,
            dy.view(),
            fixed::<Ix2>(&self.weight.value, "Dense weight")?,
            0.0,
            dx.view_mut(),
        )?;
        Ok(Some(dx.into_dyn()))
    }

    fn params(&self) -> Vec<(&'static str, &Param)> {
        weight_and_bias(&self.weight, self.bias.as_ref())
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        weight_and_bias_mut(&mut self.weight, self.bias.as_mut())
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::Dense {
            units: self.out_features,
            bias: self.bias.is_some(),
            init: self.init,
        }
    }
}
