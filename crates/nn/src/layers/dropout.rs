//! Inverted dropout: in training, each activation is kept with probability `1 - rate` and
//! scaled by `1 / (1 - rate)`, so evaluation (the identity) needs no rescaling.

use ndarray::{ArrayD, Zip};
use rand_chacha::ChaCha8Rng;

use crate::error::NnError;
use crate::init::unit;
use crate::layer::{Layer, Mode};
use crate::spec::LayerSpec;

/// A dropout layer with its own seeded generator.
#[derive(Debug)]
pub struct Dropout {
    rate: f32,
    rng: ChaCha8Rng,
    /// The scale applied to each activation in the last training pass: 0 or 1 / (1 - rate).
    mask: Option<ArrayD<f32>>,
}

/// The hyper-parameter of a [`Dropout`] layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutConfig {
    /// The share of activations dropped in training, in [0, 1).
    pub rate: f32,
}

impl DropoutConfig {
    /// The layer, drawing its masks from `rng`.
    pub fn init(self, rng: ChaCha8Rng) -> Result<Dropout, NnError> {
        let rate = self.rate;
        if !(0.0..1.0).contains(&rate) {
            return Err(NnError::Config {
                what: "Dropout",
                detail: format!("rate {rate} must be at least 0 and below 1"),
            });
        }
        Ok(Dropout {
            rate,
            rng,
            mask: None,
        })
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }

    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input.to_vec())
    }

    fn forward(&mut self, mut x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>, NnError> {
        if mode == Mode::Eval {
            self.mask = None;
            return Ok(x);
        }
        let keep = 1.0 - f64::from(self.rate);
        let scale = 1.0 / keep as f32;
        let rng = &mut self.rng;
        let mask =
            ArrayD::from_shape_simple_fn(
                x.raw_dim(),
                || if unit(rng) < keep { scale } else { 0.0 },
            );
        Zip::from(&mut x).and(&mask).for_each(|x, &m| *x *= m);
        self.mask = Some(mask);
        Ok(x)
    }

    fn backward(
        &mut self,
        mut dy: ArrayD<f32>,
        input_grad: bool,
    ) -> Result<Option<ArrayD<f32>>, NnError> {
        let mask = self
            .mask
            .as_ref()
            .ok_or(NnError::NoForwardCache("Dropout"))?;
        if !input_grad {
            return Ok(None);
        }
        Zip::from(&mut dy).and(mask).for_each(|g, &m| *g *= m);
        Ok(Some(dy))
    }

    fn spec(&self) -> LayerSpec {
        LayerSpec::Dropout { rate: self.rate }
    }

    fn reseed(&mut self, rng: ChaCha8Rng) {
        self.rng = rng;
    }
}
