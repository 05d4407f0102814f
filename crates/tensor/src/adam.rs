//! The Adam optimizer's elementwise update, over a parameter's values and its state.
//!
//! Why a kernel: compiled generically, the update's two divisions and square root per value
//! ran four lanes at a time (SSE2), and an MLP's optimizer step (670k parameters) took a fifth
//! of its training step. Compiled for the CPU's widest registers it does the same IEEE
//! operations (division and square root are correctly rounded at every width, and nothing is
//! fused), so the bits are those of the plain loop.

use rayon::prelude::*;

use crate::error::{TensorError, expect_shape};
use crate::simd::dispatched;
use crate::vector::Simd;

/// One Adam step's constants (PyTorch's `Adam` and `AdamW`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// The learning rate.
    pub lr: f32,
    /// The first moment's decay.
    pub beta1: f32,
    /// The second moment's decay.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// The weight decay: added to the gradient (Adam), or decoupled (AdamW).
    pub weight_decay: f32,
    /// Whether the weight decay shrinks the parameter directly (AdamW).
    pub decoupled: bool,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias2_sqrt: f32,
}

impl AdamStep {
    /// The update of one value `p` with gradient `g` and moments `m`, `v` (what
    /// [`adam_update`] does to each, for values that are not in one slice).
    #[inline(always)]
    pub fn apply(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        let g = if self.decoupled {
            *p *= 1.0 - self.lr * self.weight_decay;
            g
        } else {
            g + self.weight_decay * *p
        };
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        *p -= self.step_size * *m / (v.sqrt() / self.bias2_sqrt + self.eps);
    }
}

/// Values at least this many are updated on all threads (elementwise, so the bits are the same).
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// Applies one Adam step to parameter values `p` with gradient `g` and moments `m` and `v`
/// (all of one length): `m` and `v` move toward `g` and `g^2`, and `p` by `step_size * m /
/// (sqrt(v) / bias2_sqrt + eps)`.
pub fn adam_update(
    step: &AdamStep,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<(), TensorError> {
    const OP: &str = "adam_update";
    for (name, len) in [
        ("gradient", g.len()),
        ("exp_avg", m.len()),
        ("exp_avg_sq", v.len()),
    ] {
        expect_shape(OP, name, &[len], &[p.len()])?;
    }
    if p.len() < PARALLEL_MIN_LEN {
        adam_values(step, p, g, m, v);
        return Ok(());
    }
    let chunk = PARALLEL_MIN_LEN / 2;
    p.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk))
        .zip(m.par_chunks_mut(chunk))
        .zip(v.par_chunks_mut(chunk))
        .for_each(|(((p, g), m), v)| adam_values(step, p, g, m, v));
    Ok(())
}

dispatched! {
    /// [`adam_update`] of some values on one thread.
    fn adam_values(step: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32])
        => adam_values_body;
}

#[inline(always)]
fn adam_values_body<S: Simd, const LANES: usize>(
    _: S,
    step: &AdamStep,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let step = *step;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        step.apply(p, g, m, v);
    }
}
