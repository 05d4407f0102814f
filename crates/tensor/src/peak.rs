//! The machine's own ceiling: the floating-point operations per second its vector units
//! sustain in fused multiply-adds, measured in the same run as what is compared with it.
//!
//! Why measured: the team's CPUs differ from session to session (AVX-512 at full width on
//! Zen 5, at half width on Zen 4; clocks that fall with load), so a "multiple of the FLOP
//! bound" is only meaningful against this machine's figure, taken now.

use std::time::{Duration, Instant};

use crate::simd::dispatched;
use crate::vector::Simd;

/// Independent accumulator registers per thread: more than an FMA's latency (4 cycles) times
/// the FMA units (2), so no chain ever waits on its previous result.
const CHAINS: usize = 12;

/// Multiply-add rounds per call of the kernel (each `CHAINS` vector FMAs).
const ROUNDS: usize = 100_000;

dispatched! {
    /// `ROUNDS` rounds of `CHAINS` independent vector multiply-adds; their sum into `out`, so
    /// that the work is kept. Its lane count into `lanes`.
    fn fma_chains(out: &mut f32, lanes: &mut usize) => fma_chains_body;
}

#[inline(always)]
fn fma_chains_body<S: Simd, const LANES: usize>(simd: S, out: &mut f32, lanes: &mut usize) {
    let (a, b) = (simd.splat(0.999_999), simd.splat(1e-7));
    let mut acc = [simd.splat(1.0); CHAINS];
    for _ in 0..ROUNDS {
        for c in &mut acc {
            *c = simd.mul_add(*c, a, b);
        }
    }
    *out = acc.into_iter().map(|c| simd.sum(c)).sum();
    *lanes = S::LANES;
}

/// FLOP/s (2 per multiply-add) of the widest fused multiply-add this process's kernels use
/// (see [`crate::instruction_set`]), on `threads` threads at once, each running for about
/// `duration` after a short warm-up; the total over the threads.
pub fn fma_peak_flops(threads: usize, duration: Duration) -> f64 {
    let per_thread: Vec<f64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(move || {
                    let (mut sink, mut lanes) = (0.0f32, 0usize);
                    // Warm-up: the clock settles at its all-core vector frequency.
                    let warm = Instant::now();
                    while warm.elapsed() < duration / 4 {
                        fma_chains(&mut sink, &mut lanes);
                    }
                    let start = Instant::now();
                    let mut calls = 0u64;
                    while start.elapsed() < duration {
                        fma_chains(&mut sink, &mut lanes);
                        calls += 1;
                    }
                    let seconds = start.elapsed().as_secs_f64();
                    std::hint::black_box(sink);
                    let flops = calls as f64 * (ROUNDS * CHAINS * lanes * 2) as f64;
                    flops / seconds
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or(0.0))
            .collect()
    });
    per_thread.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_counts_work_done() {
        // A figure, not a speed claim: positive and finite, and two threads do not report
        // less in total than one can (they run on separate cores or share one).
        let one = fma_peak_flops(1, Duration::from_millis(40));
        let two = fma_peak_flops(2, Duration::from_millis(40));
        assert!(one.is_finite() && one > 1e8, "{one}");
        assert!(two.is_finite() && two > 0.5 * one, "{two} against {one}");
    }
}
