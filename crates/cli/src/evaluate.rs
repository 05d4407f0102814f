//! Evaluation on a labelled set: loss, accuracy, the confusion matrix and per-class precision,
//! recall and F1.

use std::fmt::Write;

use mnist_data::{BatchOrder, Batches, LabeledImages, Normalization};
use ndarray::{Array2, Axis};
use nn::{Mode, Sequential, Targets, predictions, softmax_cross_entropy};
use serde::Serialize;

use crate::error::TrainError;

/// Precision, recall and F1 of one class.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ClassMetrics {
    /// Of the examples predicted as this class, the share that are.
    pub precision: f32,
    /// Of the examples of this class, the share predicted as it.
    pub recall: f32,
    /// Harmonic mean of precision and recall.
    pub f1: f32,
    /// Examples of this class.
    pub support: usize,
}

/// The results of evaluating a model on a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f32,
    /// Share of examples predicted correctly.
    pub accuracy: f32,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Per class.
    pub classes: Vec<ClassMetrics>,
    /// Misclassified examples as (index, true, predicted, confidence), most confident first.
    #[serde(skip)]
    pub mistakes: Vec<(usize, usize, usize, f32)>,
}

/// Labels are bytes, so a labelled set has at most this many classes.
const MAX_CLASSES: usize = 256;

/// Evaluates `model` on every example of `data`.
pub fn evaluate(
    model: &mut Sequential,
    data: &LabeledImages,
    normalization: &Normalization,
) -> Result<Evaluation, TrainError> {
    evaluate_ensemble(&mut [(model, normalization)], data)
}

/// Evaluates an ensemble on every example of `data`: each model's class probabilities (its
/// inputs normalized as it was trained), averaged. One model is evaluated as [`evaluate`]
/// does, its loss from the logits.
pub fn evaluate_ensemble(
    members: &mut [(&mut Sequential, &Normalization)],
    data: &LabeledImages,
) -> Result<Evaluation, TrainError> {
    let mut confusion: Vec<Vec<usize>> = Vec::new();
    let mut mistakes = Vec::new();
    let (mut loss_sum, mut index) = (0.0f64, 0usize);
    let mut batches = members
        .iter()
        .map(|(_, normalization)| Batches::new(data, 1000, BatchOrder::Sequential, normalization))
        .collect::<Result<Vec<_>, _>>()?;
    'batches: loop {
        let mut scores = Vec::with_capacity(members.len());
        let mut labels = None;
        for ((model, _), batches) in members.iter_mut().zip(&mut batches) {
            let Some(batch) = batches.next() else {
                break 'batches;
            };
            scores.push(model.forward(batch.images, Mode::Eval)?);
            labels = Some(batch.labels);
        }
        let Some(labels) = labels else {
            break;
        };
        let (n, k) = scores[0].dim();
        // Labels are bytes: a wider model is not a classifier of this data, and a confusion
        // matrix sized by its outputs alone could be gigabytes.
        if k > MAX_CLASSES || scores.iter().any(|s| s.dim() != (n, k)) {
            return Err(TrainError::Nn(nn::NnError::Config {
                what: "model for evaluation",
                detail: format!(
                    "{k} outputs, or models with different outputs; labels name at most \
                     {MAX_CLASSES} classes"
                ),
            }));
        }
        if confusion.is_empty() {
            confusion = vec![vec![0; k]; k];
        }
        // Each image's class probabilities and prediction; whether its loss is still to add.
        let (probabilities, predicted, losses) = match scores.as_slice() {
            [logits] => {
                let out =
                    softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0)?;
                loss_sum += f64::from(out.loss) * n as f64;
                // softmax - target = grad * N: the probability is grad * N + target.
                let mut p = out.grad * n as f32;
                for (mut row, &label) in p.rows_mut().into_iter().zip(labels.iter()) {
                    if let Some(v) = row.get_mut(usize::from(label)) {
                        *v += 1.0;
                    }
                }
                (p, predictions(logits.view()), false)
            }
            many => {
                let mut mean = Array2::<f32>::zeros((n, k));
                let mut p = Array2::<f32>::zeros((n, k));
                for logits in many {
                    tensor::softmax(logits.view(), Axis(1), p.view_mut())
                        .map_err(nn::NnError::from)?;
                    mean += &p;
                }
                mean /= many.len() as f32;
                let predicted = predictions(mean.view());
                (mean, predicted, true)
            }
        };
        for (row, ((p, &label), predicted)) in probabilities
            .rows()
            .into_iter()
            .zip(labels.iter())
            .zip(predicted)
            .enumerate()
        {
            let label = usize::from(label);
            if losses {
                let p_label = p.get(label).copied().unwrap_or(0.0);
                loss_sum -= f64::from(p_label.max(f32::MIN_POSITIVE)).ln();
            }
            if let Some(cell) = confusion.get_mut(label).and_then(|r| r.get_mut(predicted)) {
                *cell += 1;
            }
            if predicted != label {
                mistakes.push((index + row, label, predicted, p[predicted]));
            }
        }
        index += n;
    }
    mistakes.sort_by(|a, b| b.3.total_cmp(&a.3));
    let total: usize = confusion.iter().flatten().sum();
    let right: usize = (0..confusion.len()).map(|c| confusion[c][c]).sum();
    let classes = (0..confusion.len())
        .map(|c| {
            let support: usize = confusion[c].iter().sum();
            let predicted: usize = confusion.iter().map(|row| row[c]).sum();
            let hit = confusion[c][c] as f32;
            let precision = if predicted > 0 {
                hit / predicted as f32
            } else {
                0.0
            };
            let recall = if support > 0 {
                hit / support as f32
            } else {
                0.0
            };
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassMetrics {
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect();
    Ok(Evaluation {
        loss: (loss_sum / total.max(1) as f64) as f32,
        accuracy: right as f32 / total.max(1) as f32,
        confusion,
        classes,
        mistakes,
    })
}

impl Evaluation {
    /// The per-class table and the confusion matrix, as text.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "class  precision  recall     f1  support");
        for (c, m) in self.classes.iter().enumerate() {
            let _ = writeln!(
                out,
                "{c:>5}  {:>9.4}  {:>6.4}  {:>5.4}  {:>7}",
                m.precision, m.recall, m.f1, m.support
            );
        }
        let _ = writeln!(
            out,
            "\nconfusion matrix (rows: true class, columns: predicted)"
        );
        let _ = write!(out, "     ");
        for c in 0..self.confusion.len() {
            let _ = write!(out, "{c:>6}");
        }
        let _ = writeln!(out);
        for (c, row) in self.confusion.iter().enumerate() {
            let _ = write!(out, "{c:>5}");
            for &v in row {
                let _ = write!(out, "{v:>6}");
            }
            let _ = writeln!(out);
        }
        out
    }
}
