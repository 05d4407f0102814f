//! Learning-rate schedules (step, exponential, cosine, one-cycle) and reduce-on-plateau.

use serde::{Deserialize, Serialize};

/// The learning rate as a function of training progress, from a base rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `every` epochs (PyTorch's StepLR).
    Step {
        /// Epochs between decays.
        every: usize,
        /// Factor per decay.
        gamma: f32,
    },
    /// Multiply by `gamma` every epoch (ExponentialLR).
    Exponential {
        /// Factor per epoch.
        gamma: f32,
    },
    /// Cosine from the base rate to `min_lr` over the run's epochs (CosineAnnealingLR with
    /// T_max = epochs).
    Cosine {
        /// Final rate.
        min_lr: f32,
    },
    /// One cycle per batch (OneCycleLR, cosine): from base/`div_factor` up to the base rate over
    /// the first `pct_start` of the steps, then down to base/(`div_factor` * `final_div_factor`).
    OneCycle {
        /// Share of steps spent rising, default 0.3.
        pct_start: f32,
        /// Initial rate = base / div_factor, default 25.
        div_factor: f32,
        /// Final rate = initial / final_div_factor, default 1e4.
        final_div_factor: f32,
    },
}

impl Schedule {
    /// The rate for batch `step` (0-based, counted over the whole run) of a run of
    /// `total_steps` batches in epochs of `steps_per_epoch`.
    pub fn learning_rate(
        &self,
        base: f32,
        step: usize,
        steps_per_epoch: usize,
        total_steps: usize,
    ) -> f32 {
        let epoch = step / steps_per_epoch.max(1);
        let epochs = total_steps.div_ceil(steps_per_epoch.max(1)).max(1);
        let cosine = |from: f32, to: f32, progress: f32| {
            to + (from - to) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
        };
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
            Schedule::Exponential { gamma } => base * gamma.powi(epoch as i32),
            Schedule::Cosine { min_lr } => cosine(base, min_lr, epoch as f32 / epochs as f32),
            Schedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = base / div_factor;
                let last = initial / final_div_factor;
                // PyTorch: the peak is at step pct_start * total - 1, the end at total - 1.
                let peak = (pct_start * total_steps as f32 - 1.0).max(1.0);
                let end = (total_steps as f32 - 1.0).max(peak + 1.0);
                let s = step as f32;
                if s <= peak {
                    cosine(initial, base, s / peak)
                } else {
                    cosine(base, last, ((s - peak) / (end - peak)).min(1.0))
                }
            }
        }
    }
}

/// Keras' ReduceLROnPlateau on a quantity to minimize (validation loss): after `patience`
/// epochs without an improvement of more than `min_delta`, multiply the rate by `factor`, not
/// below `min_lr`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReduceOnPlateau {
    /// Factor per reduction, in (0, 1).
    pub factor: f32,
    /// Epochs without improvement tolerated.
    pub patience: usize,
    /// The rate never goes below this.
    pub min_lr: f32,
    /// Smallest decrease that counts as an improvement.
    pub min_delta: f32,
    best: Option<f32>,
    waited: usize,
}

impl ReduceOnPlateau {
    /// Reduce by `factor` after `patience` flat epochs, down to `min_lr`.
    pub fn new(factor: f32, patience: usize, min_lr: f32) -> ReduceOnPlateau {
        ReduceOnPlateau {
            factor,
            patience,
            min_lr,
            min_delta: 1e-4,
            best: None,
            waited: 0,
        }
    }

    /// The same with another smallest improvement (Keras' `min_delta`, default 1e-4).
    pub fn with_min_delta(mut self, min_delta: f32) -> ReduceOnPlateau {
        self.min_delta = min_delta;
        self
    }

    /// Records an epoch's metric; returns the new rate when it is time to reduce `current`.
    /// As Keras' ReduceLROnPlateau: an epoch not better than the best by more than `min_delta`
    /// adds one to a counter; when the counter reaches `patience` and the rate is above
    /// `min_lr`, the rate is multiplied by `factor` (not below `min_lr`) and the counter starts
    /// again.
    pub fn observe(&mut self, metric: f32, current: f32) -> Option<f32> {
        if self.best.is_none_or(|best| metric < best - self.min_delta) {
            self.best = Some(metric);
            self.waited = 0;
            return None;
        }
        self.waited += 1;
        if self.waited < self.patience || current <= self.min_lr {
            return None;
        }
        self.waited = 0;
        Some((current * self.factor).max(self.min_lr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_schedules_follow_their_formulas() {
        let lr = |s: Schedule, epoch: usize| s.learning_rate(0.1, epoch * 10, 10, 50);
        assert_eq!(lr(Schedule::Constant, 3), 0.1);
        assert!(
            (lr(
                Schedule::Step {
                    every: 2,
                    gamma: 0.5
                },
                3
            ) - 0.05)
                .abs()
                < 1e-7
        );
        assert!((lr(Schedule::Exponential { gamma: 0.9 }, 2) - 0.081).abs() < 1e-7);
        // Cosine over 5 epochs: halfway (epoch 2.5) would be the midpoint; epoch 0 is the base.
        assert!((lr(Schedule::Cosine { min_lr: 0.0 }, 0) - 0.1).abs() < 1e-7);
        let c = lr(Schedule::Cosine { min_lr: 0.0 }, 4);
        assert!((c - 0.1 * 0.5 * (1.0 + (std::f32::consts::PI * 0.8).cos())).abs() < 1e-7);
    }

    #[test]
    fn one_cycle_rises_to_the_base_then_falls_below_the_start() {
        let s = Schedule::OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        };
        let lr = |step| s.learning_rate(1.0, step, 10, 100);
        assert!((lr(0) - 0.04).abs() < 1e-6);
        assert!((lr(29) - 1.0).abs() < 1e-6);
        assert!(lr(60) < lr(40));
        assert!((lr(99) - 0.04 / 1e4).abs() < 1e-9);
    }

    /// Hand-worked against Keras 3's ReduceLROnPlateau.on_epoch_end (mode "min", cooldown 0):
    /// `wait` grows on every epoch not below `best - min_delta`, and the rate drops when `wait`
    /// reaches `patience`.
    #[test]
    fn reduce_on_plateau_acts_when_the_wait_reaches_patience_as_keras() {
        // patience 2: 0.95 (wait 1), 0.92 (wait 2: reduce, wait 0), 0.91 (wait 1), 0.93 (wait
        // 2: reduce again from the rate in use).
        let mut r = ReduceOnPlateau::new(0.5, 2, 0.01);
        assert_eq!(r.observe(1.0, 0.1), None);
        assert_eq!(r.observe(0.9, 0.1), None);
        assert_eq!(r.observe(0.95, 0.1), None);
        assert_eq!(r.observe(0.92, 0.1), Some(0.05));
        assert_eq!(r.observe(0.91, 0.05), None);
        assert_eq!(r.observe(0.93, 0.05), Some(0.025));
        // An improvement resets the wait: 0.8 is best, then one flat epoch is not enough.
        assert_eq!(r.observe(0.8, 0.025), None);
        assert_eq!(r.observe(0.85, 0.025), None);
        // min_delta: 0.79 is not below 0.8 - 0.05, so it counts as flat and completes the wait.
        let mut r = ReduceOnPlateau::new(0.5, 2, 0.0).with_min_delta(0.05);
        assert_eq!(r.observe(0.8, 0.1), None);
        assert_eq!(r.observe(0.85, 0.1), None);
        assert_eq!(r.observe(0.79, 0.1), Some(0.05));
        // patience 1 acts on the first flat epoch (it waited 2 before this change).
        let mut r = ReduceOnPlateau::new(0.1, 1, 0.0);
        assert_eq!(r.observe(1.0, 0.1), None);
        assert!(r.observe(1.0, 0.1).is_some());
        // Never below min_lr, and no "reduction" once there.
        let mut r = ReduceOnPlateau::new(0.1, 0, 0.01);
        r.observe(1.0, 0.02);
        assert_eq!(r.observe(1.0, 0.02), Some(0.01));
        assert_eq!(r.observe(1.0, 0.01), None);
    }
}
