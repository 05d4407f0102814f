//! Losses and metrics: softmax cross-entropy fused on logits, categorical cross-entropy on
//! probabilities, and accuracy. Losses are means over the batch; each returns its gradient.

use ndarray::{Array2, ArrayView1, ArrayView2, Axis, Zip};

use crate::error::NnError;

/// What the model should have predicted.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// One class index per example (sparse labels).
    Classes(ArrayView1<'a, u8>),
    /// One probability distribution per example, `[N, classes]` (one-hot or soft).
    Probabilities(ArrayView2<'a, f32>),
}

/// A loss value and its gradient with respect to the model output.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// Mean over the batch.
    pub loss: f32,
    /// d loss / d output, `[N, classes]`.
    pub grad: Array2<f32>,
}

/// The target distribution `[N, K]`: one-hot or the given probabilities, smoothed toward
/// uniform by `label_smoothing` (PyTorch: `(1 - s) * target + s / K`).
fn target_distribution(
    targets: Targets<'_>,
    n: usize,
    k: usize,
    label_smoothing: f32,
) -> Result<Array2<f32>, NnError> {
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(NnError::Loss(format!(
            "label smoothing {label_smoothing} must be in [0, 1)"
        )));
    }
    let mut t = match targets {
        Targets::Classes(labels) => {
            if labels.len() != n {
                return Err(NnError::Loss(format!(
                    "{} labels for {n} outputs",
                    labels.len()
                )));
            }
            let mut t = Array2::zeros((n, k));
            for (i, &label) in labels.iter().enumerate() {
                let label = usize::from(label);
                if label >= k {
                    return Err(NnError::Loss(format!(
                        "label {label} at index {i} is outside the {k} classes"
                    )));
                }
                t[(i, label)] = 1.0;
            }
            t
        }
        Targets::Probabilities(p) => {
            if p.dim() != (n, k) {
                return Err(NnError::Loss(format!(
                    "targets of shape {:?} for outputs [{n}, {k}]",
                    p.shape()
                )));
            }
            p.to_owned()
        }
    };
    if label_smoothing > 0.0 {
        t.mapv_inplace(|v| (1.0 - label_smoothing) * v + label_smoothing / k as f32);
    }
    Ok(t)
}

/// Cross-entropy of softmax(logits) against the targets, computed stably from log-softmax:
/// `-mean_n sum_k t[n,k] * log_softmax(logits)[n,k]`; gradient `(softmax - t) / N`.
pub fn softmax_cross_entropy(
    logits: ArrayView2<'_, f32>,
    targets: Targets<'_>,
    label_smoothing: f32,
) -> Result<LossOutput, NnError> {
    let (n, k) = logits.dim();
    if n == 0 {
        return Err(NnError::Loss("empty batch".into()));
    }
    let t = target_distribution(targets, n, k, label_smoothing)?;
    let mut log_p = Array2::zeros((n, k));
    tensor::log_softmax(logits, Axis(1), log_p.view_mut())?;
    let total: f64 = Zip::from(&t)
        .and(&log_p)
        .fold(0.0, |s, &t, &lp| s - f64::from(t) * f64::from(lp));
    let scale = 1.0 / n as f32;
    let mut grad = log_p;
    Zip::from(&mut grad)
        .and(&t)
        .for_each(|g, &t| *g = (g.exp() - t) * scale);
    Ok(LossOutput {
        loss: (total / n as f64) as f32,
        grad,
    })
}

/// Probabilities are clipped to `[EPSILON, 1 - EPSILON]` before the logarithm, as Keras does,
/// so a confident wrong answer costs a large but finite loss.
pub const EPSILON: f32 = 1e-7;

/// Cross-entropy of probabilities (a Softmax output layer) against the targets, Keras'
/// `categorical_crossentropy`: `-mean_n sum_k t * log(clip(p))`; gradient `-t / clip(p) / N`.
pub fn categorical_cross_entropy(
    probs: ArrayView2<'_, f32>,
    targets: Targets<'_>,
    label_smoothing: f32,
) -> Result<LossOutput, NnError> {
    let (n, k) = probs.dim();
    if n == 0 {
        return Err(NnError::Loss("empty batch".into()));
    }
    let t = target_distribution(targets, n, k, label_smoothing)?;
    let clipped = probs.mapv(|p| p.clamp(EPSILON, 1.0 - EPSILON));
    let total: f64 = Zip::from(&t)
        .and(&clipped)
        .fold(0.0, |s, &t, &p| s - f64::from(t) * f64::from(p).ln());
    let scale = 1.0 / n as f32;
    let mut grad = t;
    Zip::from(&mut grad)
        .and(&clipped)
        .for_each(|g, &p| *g = -*g / p * scale);
    Ok(LossOutput {
        loss: (total / n as f64) as f32,
        grad,
    })
}

/// The predicted class of each row: the first index of its maximum.
pub fn predictions(scores: ArrayView2<'_, f32>) -> Vec<usize> {
    scores
        .rows()
        .into_iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 { (i, v) } else { best }
                })
                .0
        })
        .collect()
}

/// How many rows' predicted class equals the label.
pub fn correct(scores: ArrayView2<'_, f32>, labels: ArrayView1<'_, u8>) -> usize {
    predictions(scores)
        .into_iter()
        .zip(labels.iter())
        .filter(|&(p, &l)| p == usize::from(l))
        .count()
}

/// The share of rows whose predicted class equals the label.
pub fn accuracy(scores: ArrayView2<'_, f32>, labels: ArrayView1<'_, u8>) -> f32 {
    if labels.is_empty() {
        return 0.0;
    }
    correct(scores, labels) as f32 / labels.len() as f32
}
