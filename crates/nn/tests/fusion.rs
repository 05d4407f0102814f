//! A Conv2d that computes the ReLU and max pooling after it (or the pooling alone) gives the
//! same bits as the layers run one by one: outputs, every gradient, and the weights after
//! optimizer steps.

// Everything in this file is test code: an unwrap that fails is a failed test.
#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array2, Array4};
use nn::{Mode, Optimizer, Rule, Sequential, Targets, preset, softmax_cross_entropy};

fn params(model: &Sequential) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let mut all = Vec::new();
    model.visit_params(|name, p| {
        let bits = |a: &ndarray::ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect();
        all.push((name.to_string(), bits(&p.value), bits(&p.grad)));
    });
    all
}

fn logits_bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn fused_and_unfused_presets_train_to_the_same_bits() {
    // A fixed pseudo-random sequence (a 64-bit LCG), enough for inputs.
    let mut state = 5u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as u32
    };
    // 19 images: chunks of 3 with a partial last one.
    let images = Array4::from_shape_fn((19, 1, 28, 28), |_| next() as f32 / 8e6 - 1.0);
    let labels = Array1::from_shape_fn(19, |_| (next() % 10) as u8);
    for name in ["two-conv", "lenet5", "one-conv", "fast-cnn"] {
        let mut fused = Sequential::new(preset(name).unwrap(), 3).unwrap();
        let mut unfused = Sequential::new(preset(name).unwrap(), 3).unwrap();
        unfused.fuse_layers(false);
        assert_ne!(
            fused.computed_by(1),
            1,
            "{name}: layer 1 (ReLU or pooling) is fused"
        );
        assert_eq!(unfused.computed_by(1), 1);
        let mut optimizers = [
            Optimizer::new(Rule::adam(), 1e-2).unwrap(),
            Optimizer::new(Rule::adam(), 1e-2).unwrap(),
        ];
        for step in 0..3 {
            let mut logits = Vec::new();
            for (model, optimizer) in [&mut fused, &mut unfused].into_iter().zip(&mut optimizers) {
                model.zero_grad();
                let y = model.forward(images.clone(), Mode::Train).unwrap();
                let out =
                    softmax_cross_entropy(y.view(), Targets::Classes(labels.view()), 0.0).unwrap();
                model.backward(out.grad).unwrap();
                logits.push(logits_bits(&y));
                if step < 2 {
                    optimizer.step(model).unwrap();
                }
            }
            assert_eq!(logits[0], logits[1], "{name}: logits at step {step}");
            assert_eq!(params(&fused), params(&unfused), "{name}: step {step}");
        }
        let eval = |model: &mut Sequential| {
            logits_bits(&model.forward(images.clone(), Mode::Eval).unwrap())
        };
        assert_eq!(eval(&mut fused), eval(&mut unfused), "{name}: evaluation");
        // The gradients are not all zero: the comparison above compared something.
        assert!(
            params(&fused)
                .iter()
                .all(|(_, _, g)| g.iter().any(|&b| f32::from_bits(b) != 0.0))
        );
    }
}

#[test]
fn layer_outputs_end_in_the_scores_forward_gives_and_keep_the_fusion() {
    let mut model = nn::Sequential::new(nn::preset("two-conv").unwrap(), 4).unwrap();
    let images = ndarray::Array4::from_shape_fn((2, 1, 28, 28), |(n, _, h, w)| {
        ((n * 5 + h * 3 + w * 7) % 11) as f32 / 11.0
    });
    let scores = model.forward(images.clone(), nn::Mode::Eval).unwrap();
    let outputs = model.layer_outputs(images.clone()).unwrap();
    assert_eq!(outputs.len(), 10);
    assert_eq!(outputs[1].shape(), [2, 32, 26, 26]);
    assert!(outputs[1].iter().all(|&v| v >= 0.0), "after the ReLU");
    assert_eq!(outputs[9], scores.into_dyn());
    // Fused again: the next forward pass gives the same bits as before.
    assert_eq!(model.computed_by(2), 0);
    assert_eq!(
        model.forward(images, nn::Mode::Eval).unwrap().into_dyn(),
        outputs[9]
    );
}
