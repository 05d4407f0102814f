//! Optimizers: SGD (momentum, Nesterov, weight decay), Adam, AdamW, RMSprop and Adagrad, each
//! following PyTorch's `torch.optim` update rule, as one loop over the model's parameters.
//!
//! State (momentum buffers, moment estimates) is kept per parameter in visiting order, named
//! `<parameter>.<slot>` when saved, e.g. `0.weight.exp_avg`.

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::model::Sequential;

/// An update rule and its hyper-parameters (PyTorch's defaults where it has them).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Rule {
    /// `torch.optim.SGD`: g += wd*p; b = mu*b + (1 - dampening)*g (b = g at the first step);
    /// g = g + mu*b if Nesterov else b; p -= lr*g.
    Sgd {
        /// Momentum mu (0: plain SGD).
        momentum: f32,
        /// Dampening of the momentum's new term.
        dampening: f32,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 penalty added to the gradient.
        weight_decay: f32,
    },
    /// `torch.optim.Adam` (with `decoupled = false`) and `torch.optim.AdamW` (with `true`):
    /// m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p -= lr * m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps).
    /// Adam adds `weight_decay * p` to g; AdamW multiplies p by `1 - lr * weight_decay` first.
    Adam {
        /// b1, default 0.9.
        beta1: f32,
        /// b2, default 0.999.
        beta2: f32,
        /// Default 1e-8.
        eps: f32,
        /// Default 0 (Adam) or 0.01 (AdamW).
        weight_decay: f32,
        /// AdamW's decoupled weight decay.
        decoupled: bool,
    },
    /// `torch.optim.RMSprop`: g += wd*p; v = alpha*v + (1-alpha)*g^2; p -= lr * g / (sqrt(v) + eps).
    RmsProp {
        /// Smoothing constant, default 0.99.
        alpha: f32,
        /// Default 1e-8.
        eps: f32,
        /// L2 penalty.
        weight_decay: f32,
    },
    /// `torch.optim.Adagrad`: g += wd*p; s += g^2; p -= lr * g / (sqrt(s) + eps).
    Adagrad {
        /// Default 1e-10.
        eps: f32,
        /// L2 penalty.
        weight_decay: f32,
    },
}

impl Rule {
    /// PyTorch's SGD with momentum `momentum` (no dampening, no Nesterov, no decay).
    pub fn sgd(momentum: f32) -> Rule {
        Rule::Sgd {
            momentum,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// PyTorch's default Adam.
    pub fn adam() -> Rule {
        Rule::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// PyTorch's default AdamW (weight decay 0.01).
    pub fn adamw() -> Rule {
        Rule::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        }
    }

    /// PyTorch's default RMSprop.
    pub fn rmsprop() -> Rule {
        Rule::RmsProp {
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// PyTorch's default Adagrad.
    pub fn adagrad() -> Rule {
        Rule::Adagrad {
            eps: 1e-10,
            weight_decay: 0.0,
        }
    }

    /// The state each parameter carries, by name.
    fn slots(&self) -> &'static [&'static str] {
        match self {
            Rule::Sgd { momentum, .. } if *momentum == 0.0 => &[],
            Rule::Sgd { .. } => &["momentum_buffer"],
            Rule::Adam { .. } => &["exp_avg", "exp_avg_sq"],
            Rule::RmsProp { .. } => &["square_avg"],
            Rule::Adagrad { .. } => &["sum"],
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.describe(f)?;
        let (Rule::Sgd { weight_decay, .. }
        | Rule::Adam { weight_decay, .. }
        | Rule::RmsProp { weight_decay, .. }
        | Rule::Adagrad { weight_decay, .. }) = *self;
        if weight_decay > 0.0 {
            write!(f, " weight decay {weight_decay}")?;
        }
        Ok(())
    }
}

impl Rule {
    /// The rule's name and its own hyper-parameters (weight decay is shared and added after).
    fn describe(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Rule::Sgd {
                momentum,
                dampening,
                nesterov,
                ..
            } => {
                write!(f, "SGD")?;
                if momentum > 0.0 {
                    write!(
                        f,
                        " momentum {momentum}{}",
                        if nesterov { " nesterov" } else { "" }
                    )?;
                }
                if dampening > 0.0 {
                    write!(f, " dampening {dampening}")?;
                }
                Ok(())
            }
            Rule::Adam {
                beta1,
                beta2,
                eps,
                decoupled,
                ..
            } => write!(
                f,
                "{} betas ({beta1}, {beta2}) eps {eps:e}",
                if decoupled { "AdamW" } else { "Adam" }
            ),
            Rule::RmsProp { alpha, eps, .. } => write!(f, "RMSprop alpha {alpha} eps {eps:e}"),
            Rule::Adagrad { eps, .. } => write!(f, "Adagrad eps {eps:e}"),
        }
    }
}

/// An optimizer: a rule, a learning rate, the step count and per-parameter state.
#[derive(Clone, Debug)]
pub struct Optimizer {
    rule: Rule,
    learning_rate: f32,
    step: u64,
    /// Per parameter, in visiting order: its name and one tensor per slot of the rule.
    state: Vec<(String, Vec<ArrayD<f32>>)>,
}

/// An optimizer's saveable state: step count, learning rate and named tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Steps taken.
    pub step: u64,
    /// Current learning rate.
    pub learning_rate: f32,
    /// `<parameter>.<slot>` and its tensor.
    pub tensors: Vec<(String, ArrayD<f32>)>,
}

impl Optimizer {
    /// An optimizer applying `rule` with `learning_rate`.
    pub fn new(rule: Rule, learning_rate: f32) -> Result<Optimizer, NnError> {
        check_learning_rate(learning_rate)?;
        Ok(Optimizer {
            rule,
            learning_rate,
            step: 0,
            state: Vec::new(),
        })
    }

    /// The rule.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// The current learning rate.
    pub fn learning_rate(&self) -> f32 {
        self.learning_rate
    }

    /// Sets the learning rate (schedules and reduce-on-plateau call this).
    pub fn set_learning_rate(&mut self, learning_rate: f32) -> Result<(), NnError> {
        check_learning_rate(learning_rate)?;
        self.learning_rate = learning_rate;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Updates every parameter of the layers that are not frozen from its gradient. A
    /// parameter without a gradient is an error:
    /// a silent no-op would hide a broken backward pass.
    pub fn step(&mut self, model: &mut Sequential) -> Result<(), NnError> {
        self.step += 1;
        let t = self.step;
        let (rule, lr, slots) = (self.rule, self.learning_rate, self.rule.slots());
        let mut index = 0;
        let state = &mut self.state;
        model.visit_trainable_params_mut(|name, param| {
            if !param.has_grad {
                return Err(NnError::MissingGradient(name.to_string()));
            }
            if state.len() == index {
                let zeros = || ArrayD::zeros(param.value.raw_dim());
                state.push((name.to_string(), slots.iter().map(|_| zeros()).collect()));
            }
            let (state_name, tensors) = &mut state[index];
            if state_name != name || tensors.iter().any(|s| s.shape() != param.value.shape()) {
                return Err(NnError::Config {
                    what: "optimizer state",
                    detail: format!(
                        "state {index} belongs to {state_name}, not to {name} of this shape"
                    ),
                });
            }
            update(rule, lr, t, &mut param.value, &param.grad, tensors)?;
            index += 1;
            Ok(())
        })
    }

    /// The state, for a checkpoint.
    pub fn state(&self) -> OptimizerState {
        let slots = self.rule.slots();
        OptimizerState {
            step: self.step,
            learning_rate: self.learning_rate,
            tensors: self
                .state
                .iter()
                .flat_map(|(name, tensors)| {
                    slots
                        .iter()
                        .zip(tensors)
                        .map(move |(slot, t)| (format!("{name}.{slot}"), t.clone()))
                })
                .collect(),
        }
    }

    /// Restores a state taken from an optimizer with the same rule over the same model.
    pub fn load_state(&mut self, saved: OptimizerState, model: &Sequential) -> Result<(), NnError> {
        check_learning_rate(saved.learning_rate)?;
        let slots = self.rule.slots();
        let mut by_name: std::collections::HashMap<String, ArrayD<f32>> =
            saved.tensors.into_iter().collect();
        let mut state = Vec::new();
        let mut missing = None;
        model.visit_trainable_params(|name, param| {
            if saved.step == 0 {
                return;
            }
            let tensors: Vec<ArrayD<f32>> = slots
                .iter()
                .filter_map(|slot| {
                    let key = format!("{name}.{slot}");
                    match by_name.remove(&key) {
                        Some(t) if t.shape() == param.value.shape() => Some(t),
                        _ => {
                            missing.get_or_insert(key);
                            None
                        }
                    }
                })
                .collect();
            state.push((name.to_string(), tensors));
        });
        if let Some(key) = missing {
            return Err(NnError::Config {
                what: "optimizer state",
                detail: format!("{key} is missing or mis-shaped"),
            });
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(NnError::Config {
                what: "optimizer state",
                detail: format!("{extra} belongs to no parameter"),
            });
        }
        self.step = saved.step;
        self.learning_rate = saved.learning_rate;
        self.state = state;
        Ok(())
    }
}

fn check_learning_rate(lr: f32) -> Result<(), NnError> {
    if lr.is_finite() && lr > 0.0 {
        Ok(())
    } else {
        Err(NnError::Config {
            what: "learning rate",
            detail: format!("{lr} must be a positive number"),
        })
    }
}

/// Parameters at least this large are updated on all threads (elementwise, so the bits are the
/// same): two-conv's 1600x128 weight takes 0.2 ms on one thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// One parameter's update, elementwise; `t` is the 1-based step. `slots` must hold the
/// rule's state (a checkpoint's may not).
fn update(
    rule: Rule,
    lr: f32,
    t: u64,
    p: &mut ArrayD<f32>,
    grad: &ArrayD<f32>,
    slots: &mut [ArrayD<f32>],
) -> Result<(), NnError> {
    let wrong_slots = |held: usize| NnError::Config {
        what: "optimizer state",
        detail: format!(
            "{held} state tensors per parameter, the rule needs {}",
            rule.slots().len()
        ),
    };
    let held = slots.len();
    match rule {
        Rule::Sgd {
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } => {
            if let [buf] = slots {
                let parallel = p.len() >= PARALLEL_MIN_ELEMENTS;
                let zip = Zip::from(p).and(grad).and(buf);
                let update = |p: &mut f32, &g: &f32, b: &mut f32| {
                    let g = g + weight_decay * *p;
                    *b = if t == 1 {
                        g
                    } else {
                        momentum * *b + (1.0 - dampening) * g
                    };
                    let step = if nesterov { g + momentum * *b } else { *b };
                    *p -= lr * step;
                };
                if parallel {
                    zip.par_for_each(update);
                } else {
                    zip.for_each(update);
                }
            } else {
                let parallel = p.len() >= PARALLEL_MIN_ELEMENTS;
                let zip = Zip::from(p).and(grad);
                let update = |p: &mut f32, &g: &f32| *p -= lr * (g + weight_decay * *p);
                if parallel {
                    zip.par_for_each(update);
                } else {
                    zip.for_each(update);
                }
            }
        }
        Rule::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
        } => {
            let [m, v] = slots else {
                return Err(wrong_slots(held));
            };
            let bias1 = 1.0 - f64::from(beta1).powi(t as i32);
            let bias2 = 1.0 - f64::from(beta2).powi(t as i32);
            let step = tensor::AdamStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                decoupled,
                step_size: (f64::from(lr) / bias1) as f32,
                bias2_sqrt: bias2.sqrt() as f32,
            };
            let slices = (
                p.as_slice_mut(),
                grad.as_slice(),
                m.as_slice_mut(),
                v.as_slice_mut(),
            );
            if let (Some(p), Some(g), Some(m), Some(v)) = slices {
                tensor::adam_update(&step, p, g, m, v)?;
                return Ok(());
            }
            // Not in standard layout (never for this crate's own parameters): value by value.
            let parallel = p.len() >= PARALLEL_MIN_ELEMENTS;
            let zip = Zip::from(p).and(grad).and(m).and(v);
            let update = |p: &mut f32, &g: &f32, m: &mut f32, v: &mut f32| step.apply(p, g, m, v);
            if parallel {
                zip.par_for_each(update);
            } else {
                zip.for_each(update);
            }
        }
        Rule::RmsProp {
            alpha,
            eps,
            weight_decay,
        } => {
            let [v] = slots else {
                return Err(wrong_slots(held));
            };
            Zip::from(p).and(grad).and(v).for_each(|p, &g, v| {
                let g = g + weight_decay * *p;
                *v = alpha * *v + (1.0 - alpha) * g * g;
                *p -= lr * g / (v.sqrt() + eps);
            });
        }
        Rule::Adagrad { eps, weight_decay } => {
            let [s] = slots else {
                return Err(wrong_slots(held));
            };
            Zip::from(p).and(grad).and(s).for_each(|p, &g, s| {
                let g = g + weight_decay * *p;
                *s += g * g;
                *p -= lr * g / (s.sqrt() + eps);
            });
        }
    }
    Ok(())
}
