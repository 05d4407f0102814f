//! Seeded weight initialization: He (Kaiming) and Glorot (Xavier), uniform and normal, and
//! PyTorch's defaults for Conv2d and Linear.
//!
//! Random numbers come from ChaCha8 with our own uniform and normal transforms, so a seed gives
//! the same weights on every platform and with every version of the rand crates.

use ndarray::{ArrayD, IxDyn};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How a weight tensor is initialized. `fan_in` is the inputs per output (C*KH*KW for a
/// convolution, in-features for a dense layer), `fan_out` the outputs per input.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// PyTorch's default for Conv2d and Linear: `kaiming_uniform_(a=sqrt(5))`, which is
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    #[default]
    TorchDefault,
    /// He uniform: U(-b, b), b = sqrt(6 / fan_in) (ReLU gain).
    HeUniform,
    /// He normal: N(0, 2 / fan_in).
    HeNormal,
    /// Glorot uniform (Keras' default): U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
    GlorotUniform,
    /// Glorot normal: N(0, 2 / (fan_in + fan_out)).
    GlorotNormal,
    /// All zeros (Keras' default for biases).
    Zeros,
}

/// Fans of a weight of this shape: `[out, in]` or `[O, C, KH, KW]`.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape.iter().skip(2).product();
    let fan_in = shape.get(1).copied().unwrap_or(1) * receptive;
    let fan_out = shape.first().copied().unwrap_or(1) * receptive;
    (fan_in.max(1), fan_out.max(1))
}

/// A tensor of `shape` drawn by `init` with fans `(fan_in, fan_out)`.
pub fn initialize(
    init: Init,
    shape: &[usize],
    fan: (usize, usize),
    rng: &mut ChaCha8Rng,
) -> ArrayD<f32> {
    let (fan_in, fan_out) = (fan.0 as f64, fan.1 as f64);
    let mut uniform = |bound: f64| {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || ((2.0 * unit(rng) - 1.0) * bound) as f32)
    };
    match init {
        Init::TorchDefault => uniform(1.0 / fan_in.sqrt()),
        Init::HeUniform => uniform((6.0 / fan_in).sqrt()),
        Init::GlorotUniform => uniform((6.0 / (fan_in + fan_out)).sqrt()),
        Init::HeNormal => normal(shape, (2.0 / fan_in).sqrt(), rng),
        Init::GlorotNormal => normal(shape, (2.0 / (fan_in + fan_out)).sqrt(), rng),
        Init::Zeros => ArrayD::zeros(IxDyn(shape)),
    }
}

/// The generator for one layer of a model seeded with `seed`: each layer gets its own stream,
/// so adding a layer does not change the others' weights.
pub fn layer_rng(seed: u64, layer: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(layer as u64);
    rng
}

/// The generator for layer `layer` during epoch `epoch` of a run seeded with `seed`: a stream of
/// its own for every (layer, epoch), so an epoch can be replayed without the ones before it.
pub fn epoch_layer_rng(seed: u64, layer: usize, epoch: u64) -> ChaCha8Rng {
    // A different 64-bit seed per epoch (odd multiplier: distinct epochs give distinct seeds).
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (epoch.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    rng.set_stream(layer as u64);
    rng
}

/// A uniform f64 in [0, 1) from the top 53 bits of one draw.
pub fn unit(rng: &mut impl Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Normal samples with standard deviation `std`, by the Box-Muller transform.
fn normal(shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> ArrayD<f32> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        // 1 - unit is in (0, 1]: the logarithm is finite.
        let (u1, u2) = (1.0 - unit(rng), unit(rng));
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fans_follow_pytorch() {
        assert_eq!(fans(&[64, 32, 3, 3]), (288, 576));
        assert_eq!(fans(&[10, 128]), (128, 10));
    }

    #[test]
    fn distributions_have_their_bounds_and_spread() {
        let mut rng = layer_rng(1, 0);
        let shape = [256, 100];
        let w = initialize(Init::TorchDefault, &shape, (100, 256), &mut rng);
        assert!(w.iter().all(|&v| v.abs() <= 0.1));
        let w = initialize(Init::HeNormal, &shape, (100, 256), &mut rng);
        let var = w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        // 25,600 samples: the variance estimate is within a few percent of 2/100.
        assert!((var - 0.02).abs() < 0.002, "variance {var}");
        let w = initialize(Init::GlorotUniform, &shape, (100, 256), &mut rng);
        let bound = (6.0f64 / 356.0).sqrt() as f32;
        assert!(w.iter().all(|&v| v.abs() <= bound));
        assert!(w.iter().any(|&v| v.abs() > 0.9 * bound));
    }

    #[test]
    fn same_seed_same_weights_other_layer_other_weights() {
        let draw = |seed, layer| {
            initialize(
                Init::HeUniform,
                &[4, 4],
                (4, 4),
                &mut layer_rng(seed, layer),
            )
        };
        assert_eq!(draw(3, 0), draw(3, 0));
        assert_ne!(draw(3, 0), draw(3, 1));
        assert_ne!(draw(3, 0), draw(4, 0));
    }
}
