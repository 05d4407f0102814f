//! Seeded shuffling that gives the same order for the same seed on every platform and version.
//!
//! rand's own `shuffle` and `random_range` may change their output between minor releases; a
//! trainer that promises "same seed, same weights" cannot depend on that, so the few lines of
//! Fisher-Yates live here, fed by ChaCha8, whose stream is fixed by its specification.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// A generator for `seed`, on an independent stream per `stream` (e.g. per epoch), so that any
/// epoch's order can be recomputed without replaying the ones before it.
pub fn seeded_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Shuffles `items` in place with the Fisher-Yates algorithm.
pub fn shuffle<T>(items: &mut [T], rng: &mut impl Rng) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A uniformly distributed integer in `0..bound` (`bound > 0`), without modulo bias
/// (Lemire, "Fast Random Integer Generation in an Interval", 2019).
fn uniform_below(rng: &mut impl Rng, bound: u64) -> u64 {
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(bound);
        if (product as u64) >= threshold {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_and_depends_on_seed_and_stream() {
        let shuffled = |seed, stream| {
            let mut v: Vec<u32> = (0..1000).collect();
            shuffle(&mut v, &mut seeded_rng(seed, stream));
            v
        };
        let a = shuffled(7, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, shuffled(7, 0));
        assert_ne!(a, shuffled(7, 1));
        assert_ne!(a, shuffled(8, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn uniform_below_covers_the_range_evenly() {
        let mut rng = seeded_rng(1, 0);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            counts[uniform_below(&mut rng, 6) as usize] += 1;
        }
        // Each count is Binomial(60000, 1/6): mean 10000, sd about 91; 6 sd is far outside chance.
        for c in counts {
            assert!((9_450..=10_550).contains(&c), "{counts:?}");
        }
    }
}
