//! `evaluate_ensemble`: one model gives `evaluate`'s figures; several average their class
//! probabilities, each model's inputs normalized its own way (checked against a direct
//! computation in f64).

#![allow(clippy::unwrap_used)]

use cli::{evaluate, evaluate_ensemble};
use mnist_data::{LabeledImages, Normalization};
use ndarray::{Array1, Array3, Array4};
use nn::{Mode, Sequential, preset};

/// 300 pseudo-random 28x28 images (more than a batch of 1000 would hold is not needed: the
/// batching is `evaluate`'s) with labels 0-9.
fn images() -> LabeledImages {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 56) as u8
    };
    let pixels = Array3::from_shape_simple_fn((300, 28, 28), &mut next);
    let labels = Array1::from_shape_fn(300, |i| (i * 7 % 10) as u8);
    LabeledImages::new(pixels, labels).unwrap()
}

/// Each image's class probabilities under `model`, in f64.
fn probabilities(
    model: &mut Sequential,
    data: &LabeledImages,
    norm: &Normalization,
) -> Vec<Vec<f64>> {
    let x = Array4::from_shape_fn((data.len(), 1, 28, 28), |(n, _, h, w)| {
        (f32::from(data.images()[(n, h, w)]) / 255.0 - norm.mean) / norm.std
    });
    let logits = model.forward(x, Mode::Eval).unwrap();
    logits
        .rows()
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = row.iter().map(|&v| f64::from(v - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.iter().map(|e| e / sum).collect()
        })
        .collect()
}

#[test]
fn an_ensemble_averages_its_models_probabilities() {
    let data = images();
    let norms = [
        Normalization {
            mean: 0.1,
            std: 0.3,
        },
        Normalization {
            mean: 0.5,
            std: 0.25,
        },
    ];
    let mut models = [
        Sequential::new(preset("lenet5").unwrap(), 1).unwrap(),
        Sequential::new(preset("fast-cnn").unwrap(), 2).unwrap(),
    ];

    // One model: the same figures as `evaluate`.
    let alone = evaluate(&mut models[0], &data, &norms[0]).unwrap();
    let [first, second] = &mut models;
    let one = evaluate_ensemble(&mut [(first, &norms[0])], &data).unwrap();
    assert_eq!(alone, one);

    // Two: the average of the probabilities, computed here directly.
    let p0 = probabilities(first, &data, &norms[0]);
    let p1 = probabilities(second, &data, &norms[1]);
    let (mut right, mut loss) = (0usize, 0.0f64);
    for (i, (a, b)) in p0.iter().zip(&p1).enumerate() {
        let mean: Vec<f64> = a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect();
        let best = (0..10)
            .max_by(|&x, &y| mean[x].total_cmp(&mean[y]))
            .unwrap();
        let label = usize::from(data.labels()[i]);
        right += usize::from(best == label);
        loss -= mean[label].ln();
    }
    let both = evaluate_ensemble(&mut [(first, &norms[0]), (second, &norms[1])], &data).unwrap();
    assert_eq!(both.accuracy, right as f32 / 300.0);
    let want = loss / 300.0;
    assert!(
        (f64::from(both.loss) - want).abs() < 1e-4 * want,
        "{} against {want}",
        both.loss
    );
    // Untrained models disagree: the average is neither model's answer.
    let second_alone = evaluate(second, &data, &norms[1]).unwrap();
    assert_ne!(both.confusion, one.confusion);
    assert_ne!(both.confusion, second_alone.confusion);
}
