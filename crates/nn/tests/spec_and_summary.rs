//! Presets, JSON specs, summaries and Dropout's two modes.

#![allow(clippy::unwrap_used)]

use ndarray::{ArrayD, IxDyn};
use nn::layers::DropoutConfig;
use nn::{Layer, Mode, ModelSpec, PRESETS, Sequential, layer_rng, preset, summary};

#[test]
fn presets_have_the_tutorials_parameter_counts() {
    // Counts as Keras reports them for the same architectures (see the issue's list).
    let expected = [
        ("two-conv", 225_034),
        ("one-conv", 542_230),
        ("one-conv-dropout", 693_962),
        ("lenet5", 61_706),
        ("bn-cnn", 872_426),
        // Counted by hand: 144 + 64 + 4,608 + 128 + 8,010 (BatchNorm: 2 trainable, 2 running
        // per channel).
        ("fast-cnn", 12_954),
    ];
    for (name, count) in expected {
        let model = Sequential::new(preset(name).unwrap(), 0).unwrap();
        let counts = model.param_counts();
        // Keras counts BatchNorm's running statistics too, as non-trainable.
        assert_eq!(counts.trainable + counts.non_trainable, count, "{name}");
        let statistics = match name {
            "bn-cnn" => 896,
            "fast-cnn" => 96,
            _ => 0,
        };
        assert_eq!(counts.non_trainable, statistics, "{name}");
    }
    assert_eq!(PRESETS.len(), expected.len());
    assert!(preset("three-conv").is_none());
}

#[test]
fn specs_round_trip_through_json_and_print_themselves() {
    for name in PRESETS {
        let spec = preset(name).unwrap();
        let json = spec.to_json();
        assert_eq!(ModelSpec::from_json(&json).unwrap(), spec, "{name}");
        // The built model reports the spec it was built from.
        let model = Sequential::new(spec.clone(), 0).unwrap();
        let rebuilt: Vec<_> = model.layers().iter().map(|l| l.spec()).collect();
        assert_eq!(rebuilt, spec.layers, "{name}");
    }
    assert_eq!(
        preset("lenet5").unwrap().to_string(),
        "lenet5: input 1x28x28 -> Conv2d(6, 5x5, same) -> ReLU -> MaxPool2d(2x2) -> Conv2d(16, 5x5) \
         -> ReLU -> MaxPool2d(2x2) -> Flatten -> Dense(120) -> ReLU -> Dense(84) -> ReLU -> Dense(10)"
    );
}

#[test]
fn bad_specs_say_what_is_wrong() {
    let cases = [
        (
            r#"{"name": "x", "input": [1, 28, 28], "layers": [{"type": "Dense", "units": 10}]}"#,
            "Flatten",
        ),
        (
            r#"{"name": "x", "input": [1, 4, 4], "layers": [{"type": "Conv2d", "filters": 2, "kernel": [5, 5]}]}"#,
            "larger than the padded input",
        ),
        (
            r#"{"name": "x", "input": [1, 28, 28], "layers": [{"type": "Conv3d"}]}"#,
            "unknown variant",
        ),
        (
            r#"{"name": "x", "input": [1, 28, 28], "layers": [{"type": "Dropout", "rate": 1.0}]}"#,
            "rate",
        ),
        (
            r#"{"name": "x", "input": [1, 28, 28], "layers": []}"#,
            "no layers",
        ),
    ];
    for (json, needle) in cases {
        let err = ModelSpec::from_json(json)
            .and_then(|s| Sequential::new(s, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{json}: {err}");
    }
}

#[test]
fn summary_is_keras_style() {
    let text = summary(&preset("two-conv").unwrap(), 0).unwrap();
    for needle in [
        "Model: \"two-conv\"",
        "0 (Conv2d)",
        "(None, 32, 26, 26)",
        "320",
        "(None, 1600)",
        "204,928",
        "Total params: 225,034 (879.04 KB)",
        "Trainable params: 225,034 (879.04 KB)",
        "Non-trainable params: 0 (0.00 B)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn batch_norm_counts_its_running_statistics_as_non_trainable() {
    let spec = ModelSpec::from_json(
        r#"{"name": "bn", "input": [1, 6, 6], "layers": [
            {"type": "Conv2d", "filters": 4, "kernel": [3, 3]}, {"type": "BatchNorm2d"},
            {"type": "Flatten"}, {"type": "Dense", "units": 2}]}"#,
    )
    .unwrap();
    let counts = Sequential::new(spec, 0).unwrap().param_counts();
    // conv 4*9+4, bn gamma+beta 8, dense 64*2+2; running mean and var 8.
    assert_eq!((counts.trainable, counts.non_trainable), (40 + 8 + 130, 8));
}

#[test]
fn dropout_is_the_identity_in_evaluation_and_keeps_the_scale_in_training() {
    let mut dropout = DropoutConfig { rate: 0.2 }.init(layer_rng(7, 0)).unwrap();
    let x = ArrayD::from_elem(IxDyn(&[100, 1000]), 1.0f32);
    assert_eq!(dropout.forward(x.clone(), Mode::Eval).unwrap(), x);
    let y = dropout.forward(x.clone(), Mode::Train).unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count();
    // Each element kept with probability 0.8 (100,000 draws: sd 126), scaled by 1 / 0.8.
    assert!((79_000..=81_000).contains(&kept), "kept {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.25).abs() < 1e-6));
    let mean = y.sum() / y.len() as f32;
    assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    // Backward passes the gradient through the same mask.
    let dy = ArrayD::from_elem(IxDyn(&[100, 1000]), 2.0f32);
    let dx = dropout.backward(dy, true).unwrap().unwrap();
    assert!(dx.iter().zip(&y).all(|(&g, &v)| g == 2.0 * v));
}

#[test]
fn optimizers_describe_themselves() {
    use nn::Rule;
    assert_eq!(Rule::adam().to_string(), "Adam betas (0.9, 0.999) eps 1e-8");
    assert_eq!(
        Rule::adamw().to_string(),
        "AdamW betas (0.9, 0.999) eps 1e-8 weight decay 0.01"
    );
    let sgd = Rule::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        nesterov: true,
        weight_decay: 5e-4,
    };
    assert_eq!(
        sgd.to_string(),
        "SGD momentum 0.9 nesterov weight decay 0.0005"
    );
    assert_eq!(Rule::adagrad().to_string(), "Adagrad eps 1e-10");
}

/// The FLOP count of the bound (docs/benchmarks.md), against the layer shapes worked by hand:
/// two-conv's multiply-adds per image are conv 1->32 on 26x26 (26*26*32*9), conv 32->64 on
/// 11x11 (11*11*64*288), dense 1600->128 and 128->10; the first layer has no input gradient.
#[test]
fn flops_per_image_follow_the_counting_rule() {
    let macs: [u64; 4] = [26 * 26 * 32 * 9, 11 * 11 * 64 * 288, 1600 * 128, 128 * 10];
    let forward = 2 * macs.iter().sum::<u64>();
    let count = preset("two-conv")
        .unwrap()
        .plan()
        .unwrap()
        .flops_per_image();
    assert_eq!(count.forward, forward);
    assert_eq!(count.training, 3 * forward - 2 * macs[0]);
    // The issue's figure for an epoch: 924 GFLOP.
    let epoch = count.training as f64 * 60_000.0 / 1e9;
    assert!((epoch - 923.8).abs() < 0.1, "{epoch}");
    // BatchNorm's weight is not a multiply-add over inputs: a spec with it counts the same.
    let bn = nn::ModelSpec::from_json(
        r#"{"name": "bn", "input": [1, 8, 8], "layers": [
            {"type": "Conv2d", "filters": 4, "kernel": [3, 3]}, {"type": "BatchNorm2d"},
            {"type": "Flatten"}, {"type": "Dense", "units": 10}]}"#,
    )
    .unwrap();
    let count = bn.plan().unwrap().flops_per_image();
    let macs = [6 * 6 * 4 * 9, 144 * 10];
    assert_eq!(count.forward, 2 * (macs[0] + macs[1]));
    assert_eq!(count.training, 2 * 2 * macs[0] + 3 * 2 * macs[1]);
}
