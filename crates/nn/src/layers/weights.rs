//! The weight and optional bias of the layers that multiply their input by a weight (Conv2d,
//! Dense): drawn fresh, or checked when a model file gives them.

use ndarray::ArrayD;
use rand_chacha::ChaCha8Rng;

use crate::init::{Init, fans, initialize};

/// A weight of `shape` (outputs first) drawn by `init` and, with `bias`, a bias of one value
/// per output drawn as PyTorch draws it (zeros when the weight is).
pub(crate) fn initial_weight_and_bias(
    init: Init,
    shape: &[usize],
    bias: bool,
    rng: &mut ChaCha8Rng,
) -> (ArrayD<f32>, Option<ArrayD<f32>>) {
    let fan = fans(shape);
    let weight = initialize(init, shape, fan, rng);
    let bias_init = if init == Init::Zeros {
        Init::Zeros
    } else {
        Init::TorchDefault
    };
    // After the weight: the generator's order is part of a seed's meaning.
    let bias = bias.then(|| initialize(bias_init, &shape[..1], fan, rng));
    (weight, bias)
}

/// Checks a given `weight` against the layer's `shape` (outputs first) and a given `bias`
/// against one value per output and whether the layer has one (`has_bias`); the problem
/// otherwise.
pub(crate) fn check_weight_and_bias(
    weight: &ArrayD<f32>,
    bias: Option<&ArrayD<f32>>,
    shape: &[usize],
    has_bias: bool,
) -> Result<(), String> {
    if weight.shape() != shape {
        return Err(format!(
            "weight has shape {:?}, the layer needs {shape:?}",
            weight.shape()
        ));
    }
    match bias {
        Some(b) if b.shape() != &shape[..1] => Err(format!(
            "bias has shape {:?}, the layer needs [{}]",
            b.shape(),
            shape[0]
        )),
        Some(_) if !has_bias => Err("a bias was given to a layer without one".into()),
        None if has_bias => Err("the bias is missing".into()),
        _ => Ok(()),
    }
}
