//! Training end to end: a golden loss trace on a fixed tiny batch, and one real epoch of MNIST.

#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array4};
use nn::{Mode, Optimizer, Rule, Sequential, Targets, correct, preset, softmax_cross_entropy};

/// Eight fixed "images" (a diagonal stroke whose position is the label) and their labels.
fn tiny_batch() -> (Array4<f32>, Array1<u8>) {
    let labels = Array1::from(vec![0u8, 1, 2, 3, 4, 5, 6, 7]);
    let images = Array4::from_shape_fn((8, 1, 28, 28), |(n, _, h, w)| {
        if (h + w) % 28 == 3 * n || (h * 3 + n) % 28 == w {
            1.0
        } else {
            0.0
        }
    });
    (images, labels)
}

fn train_steps(rule: Rule, lr: f32, steps: usize) -> Vec<f32> {
    let (images, labels) = tiny_batch();
    let mut model = Sequential::new(preset("lenet5").unwrap(), 2024).unwrap();
    let mut optimizer = Optimizer::new(rule, lr).unwrap();
    (0..steps)
        .map(|_| {
            model.zero_grad();
            let logits = model.forward(images.clone(), Mode::Train).unwrap();
            let out =
                softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0).unwrap();
            model.backward(out.grad).unwrap();
            optimizer.step(&mut model).unwrap();
            out.loss
        })
        .collect()
}

/// The loss of the first steps of lenet5 (seed 2024) on the fixed batch, Adam 1e-3 and SGD
/// 0.05 with momentum 0.9. Recorded from this implementation (x86_64, any thread count; the
/// kernels are deterministic) when the golden test was written: it guards against regressions
/// only. The outside reference is `torch_gradients.rs` (PyTorch's loss and gradients of every
/// preset); here the first loss is also checked against ln(10), the loss of a near-uniform
/// prediction from PyTorch's default initialization, and training must make the loss fall.
#[test]
fn golden_loss_trace() {
    let adam = train_steps(Rule::adam(), 1e-3, 6);
    let sgd = train_steps(Rule::sgd(0.9), 0.05, 6);
    assert!((adam[0] - 10f32.ln()).abs() < 0.05, "{adam:?}");
    assert!(
        adam[5] < adam[0] - 0.03 && sgd[5] < sgd[0] - 0.02,
        "{adam:?} {sgd:?}"
    );
    let recorded_adam: [f32; 6] = GOLDEN_ADAM;
    let recorded_sgd: [f32; 6] = GOLDEN_SGD;
    for (got, want) in adam
        .iter()
        .chain(&sgd)
        .zip(recorded_adam.iter().chain(&recorded_sgd))
    {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "got {adam:?} / {sgd:?}"
        );
    }
}

const GOLDEN_ADAM: [f32; 6] = [
    2.2913983, 2.2784495, 2.2668085, 2.2551851, 2.2421274, 2.2252247,
];
const GOLDEN_SGD: [f32; 6] = [
    2.2913983, 2.2889252, 2.2845278, 2.27852, 2.2713299, 2.263471,
];

/// The bar: two-conv, Adam 1e-3, batch 64, one epoch over the 60,000 training images
/// reaches at least 98% on the 10,000 test images.
#[test]
fn real_mnist_two_conv_one_epoch_reaches_98_percent() {
    let Some(dir) =
        mnist_data::testing::real_data_or_skip("real_mnist_two_conv_one_epoch_reaches_98_percent")
    else {
        return;
    };
    let data = mnist_data::load_dir(&dir, &mnist_data::LoadOptions::default()).unwrap();
    let norm = mnist_data::Normalization::fit(&data.train);
    let mut model = Sequential::new(preset("two-conv").unwrap(), 1).unwrap();
    let mut optimizer = Optimizer::new(Rule::adam(), 1e-3).unwrap();
    let start = std::time::Instant::now();
    let order = mnist_data::BatchOrder::Shuffled { seed: 1, epoch: 0 };
    for batch in mnist_data::Batches::new(&data.train, 64, order, &norm).unwrap() {
        model.zero_grad();
        let logits = model.forward(batch.images, Mode::Train).unwrap();
        let out = softmax_cross_entropy(logits.view(), Targets::Classes(batch.labels.view()), 0.0)
            .unwrap();
        assert!(out.loss.is_finite());
        model.backward(out.grad).unwrap();
        optimizer.step(&mut model).unwrap();
    }
    let train_seconds = start.elapsed().as_secs_f64();
    let mut right = 0;
    for batch in
        mnist_data::Batches::new(&data.test, 1000, mnist_data::BatchOrder::Sequential, &norm)
            .unwrap()
    {
        let logits = model.forward(batch.images, Mode::Eval).unwrap();
        right += correct(logits.view(), batch.labels.view());
    }
    let accuracy = right as f64 / data.test.len() as f64;
    eprintln!("two-conv, 1 epoch: test accuracy {accuracy:.4}, epoch {train_seconds:.1} s");
    assert!(accuracy >= 0.98, "test accuracy {accuracy}");
}
