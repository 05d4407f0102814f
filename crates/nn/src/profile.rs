//! Where a model's time goes: each layer's forward and backward time, summed over the batches
//! since profiling was switched on (what `mnist bench --profile` prints).

use std::time::Duration;

/// Time one layer spent, summed over calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerTimes {
    /// Total time in forward passes.
    pub forward: Duration,
    /// Forward passes timed.
    pub forward_calls: u32,
    /// Total time in backward passes.
    pub backward: Duration,
    /// Backward passes timed.
    pub backward_calls: u32,
}

impl LayerTimes {
    /// Mean forward time per call (zero when never called).
    pub fn mean_forward(&self) -> Duration {
        self.forward
            .checked_div(self.forward_calls)
            .unwrap_or_default()
    }

    /// Mean backward time per call (zero when never called).
    pub fn mean_backward(&self) -> Duration {
        self.backward
            .checked_div(self.backward_calls)
            .unwrap_or_default()
    }
}
