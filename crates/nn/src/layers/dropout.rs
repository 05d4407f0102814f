//! Inverted dropout: in training, each activation is kept with probability `1 - rate` and
//! scaled by `1 / (1 - rate)`, so evaluation (the identity) needs no rescaling.

use ndarray::{ArrayD, Zip};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;

use crate::error::NnError;
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
        let mask = draw_mask(&mut self.rng, x.len(), keep, scale);
        let mask = ArrayD::from_shape_vec(x.raw_dim(), mask)
            .unwrap_or_else(|e| unreachable!("one mask value per activation: {e}"));
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

/// `len` values, each `scale` with probability `keep` and 0 otherwise, in the order of
/// `crate::init::unit(rng) < keep` drawn once per value.
///
/// Why not that loop: a 64 x 1600 activation (Keras' mnist_convnet) took 0.86 ms in it, a
/// quarter of that network's step. Here the generator fills a block of bytes at a time, which
/// are the same words as its `next_u64` calls, and the comparison is on integers: `unit` is
/// `(u >> 11) / 2^53`, exact in f64, so `unit < keep` exactly when `(u >> 11) <
/// ceil(keep * 2^53)`. Large masks are drawn in two halves over rayon, the second from a copy
/// of the generator moved to where the first half's words end (ChaCha seeks to any word).
/// The masks, and so the bits of training, are those of the loop whatever the threads.
fn draw_mask(rng: &mut ChaCha8Rng, len: usize, keep: f64, scale: f32) -> Vec<f32> {
    // Below this many values one thread draws them all (about 0.03 ms).
    const PARALLEL_MIN: usize = 1 << 14;
    // Two 32-bit words of the stream per value.
    const WORDS_PER_VALUE: u128 = 2;
    let threshold = (keep * (1u64 << 53) as f64).ceil() as u64;
    let mut mask = vec![0.0f32; len];
    if len < PARALLEL_MIN {
        fill_mask(rng, &mut mask, threshold, scale);
        return mask;
    }
    let start = rng.get_word_pos();
    let (first, second) = mask.split_at_mut(len / 2);
    let mut second_rng = rng.clone();
    second_rng.set_word_pos(start + WORDS_PER_VALUE * first.len() as u128);
    rayon::join(
        || fill_mask(rng, first, threshold, scale),
        || fill_mask(&mut second_rng, second, threshold, scale),
    );
    rng.set_word_pos(start + WORDS_PER_VALUE * len as u128);
    mask
}

/// [`draw_mask`]'s values from `rng`'s next words, in order: `scale` where `u >> 11` of
/// the word is below `threshold`, else 0.
fn fill_mask(rng: &mut ChaCha8Rng, mask: &mut [f32], threshold: u64, scale: f32) {
    const WORDS_AT_ONCE: usize = 512;
    let mut bytes = [0u8; 8 * WORDS_AT_ONCE];
    for values in mask.chunks_mut(WORDS_AT_ONCE) {
        let bytes = &mut bytes[..8 * values.len()];
        rng.fill_bytes(bytes);
        let (words, _) = bytes.as_chunks::<8>();
        for (value, word) in values.iter_mut().zip(words) {
            let drawn = u64::from_le_bytes(*word) >> 11;
            *value = if drawn < threshold { scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;

    use super::*;
    use crate::init::unit;

    #[test]
    fn masks_are_those_of_one_unit_draw_per_value() {
        // Lengths across the block of draws and across the parallel split (odd, so that the
        // halves differ); the generator is then where the loop would leave it.
        for (len, rate) in [
            (1, 0.5f32),
            (511, 0.25),
            (512, 0.4),
            (1601, 0.5),
            (3000, 0.0),
            (40_001, 0.6),
        ] {
            let mut fast = ChaCha8Rng::seed_from_u64(len as u64);
            let mut slow = fast.clone();
            let keep = 1.0 - f64::from(rate);
            let scale = 1.0 / keep as f32;
            let mask = draw_mask(&mut fast, len, keep, scale);
            let expected: Vec<f32> = (0..len)
                .map(|_| if unit(&mut slow) < keep { scale } else { 0.0 })
                .collect();
            assert_eq!(mask, expected, "{len} values at rate {rate}");
            assert_eq!(
                fast.next_u64(),
                slow.next_u64(),
                "{len} values at rate {rate}"
            );
            let kept = mask.iter().filter(|&&m| m > 0.0).count();
            assert!(rate > 0.0 || kept == len, "rate 0 dropped {}", len - kept);
        }
    }
}
