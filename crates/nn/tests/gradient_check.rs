//! Central finite differences against every layer's backward pass and both losses.
//!
//! The scalar loss is `sum_i w_i * exp(0.3 * y_i)` with random weights w: not a plain sum, so
//! the upstream gradient differs from element to element. Inputs keep a distance from the kinks
//! of ReLU and max pooling larger than the finite-difference step.

#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array2, ArrayD, IxDyn};
use nn::layers::{
    Activation, ActivationKind, BatchNormConfig, Conv2dConfig, DenseConfig, Flatten, Pool2dConfig,
    PoolKind, Softmax,
};
use nn::{
    Init, Layer, Mode, PaddingSpec, Sequential, Targets, categorical_cross_entropy, layer_rng,
    preset, softmax_cross_entropy,
};

const STEP: f32 = 5e-3;

/// Pseudo-random values in [-1, 1) (SplitMix64).
struct Values(u64);

impl Values {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn array(&mut self, shape: &[usize]) -> ArrayD<f32> {
        ArrayD::from_shape_simple_fn(IxDyn(shape), || self.next())
    }

    /// Values whose pairwise distances, and distances from 0, all exceed 4 * STEP.
    fn separated(&mut self, shape: &[usize]) -> ArrayD<f32> {
        let len: usize = shape.iter().product();
        let mut ranks: Vec<usize> = (0..len).collect();
        for i in (1..len).rev() {
            let j = ((self.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
            ranks.swap(i, j);
        }
        let values = ranks
            .into_iter()
            .map(|r| (r as f32 - len as f32 / 2.0 + 0.5) * 0.05)
            .collect();
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }
}

fn loss(y: &ArrayD<f32>, w: &ArrayD<f32>) -> f64 {
    y.iter()
        .zip(w)
        .map(|(&y, &w)| f64::from(w) * (0.3 * f64::from(y)).exp())
        .sum()
}

fn loss_grad(y: &ArrayD<f32>, w: &ArrayD<f32>) -> ArrayD<f32> {
    let mut g = y.clone();
    g.zip_mut_with(w, |g, &w| {
        *g = (f64::from(w) * 0.3 * (0.3 * f64::from(*g)).exp()) as f32
    });
    g
}

fn assert_close(what: &str, numeric: f64, analytic: f32) {
    let a = f64::from(analytic);
    let tolerance = 2e-2 * numeric.abs().max(a.abs()) + 2e-3;
    assert!(
        (numeric - a).abs() <= tolerance,
        "{what}: numeric {numeric}, analytic {a}"
    );
}

/// Indices to probe: all of a small tensor, an even spread of a large one.
fn probes(len: usize) -> Vec<usize> {
    let step = (len / 40).max(1);
    (0..len).step_by(step).collect()
}

/// Checks the input gradient and every parameter gradient of `layer` at input `x`.
fn check_layer(name: &str, layer: &mut dyn Layer, x: ArrayD<f32>, values: &mut Values) {
    let y = layer.forward(x.clone(), Mode::Train).unwrap();
    let w = values.array(y.shape());
    for (_, p) in layer.params_mut() {
        p.zero_grad();
    }
    let dx = layer.backward(loss_grad(&y, &w), true).unwrap().unwrap();
    assert_eq!(dx.shape(), x.shape(), "{name}: dx shape");

    let at =
        |layer: &mut dyn Layer, x: ArrayD<f32>| loss(&layer.forward(x, Mode::Train).unwrap(), &w);
    for i in probes(x.len()) {
        let mut plus = x.clone();
        let mut minus = x.clone();
        plus.as_slice_mut().unwrap()[i] += STEP;
        minus.as_slice_mut().unwrap()[i] -= STEP;
        let numeric = (at(layer, plus) - at(layer, minus)) / (2.0 * f64::from(STEP));
        assert_close(
            &format!("{name} dx[{i}]"),
            numeric,
            dx.as_slice().unwrap()[i],
        );
    }
    let analytic: Vec<(String, ArrayD<f32>)> = layer
        .params()
        .iter()
        .map(|(n, p)| (n.to_string(), p.grad.clone()))
        .collect();
    for (k, (param_name, grad)) in analytic.iter().enumerate() {
        for i in probes(grad.len()) {
            let shift = |layer: &mut dyn Layer, delta: f32| {
                layer.params_mut()[k].1.value.as_slice_mut().unwrap()[i] += delta;
            };
            shift(layer, STEP);
            let up = at(layer, x.clone());
            shift(layer, -2.0 * STEP);
            let down = at(layer, x.clone());
            shift(layer, STEP);
            let numeric = (up - down) / (2.0 * f64::from(STEP));
            assert_close(
                &format!("{name} d{param_name}[{i}]"),
                numeric,
                grad.as_slice().unwrap()[i],
            );
        }
    }
}

#[test]
fn convolutions_in_every_padding_and_stride() {
    let mut values = Values(1);
    for (padding, stride, bias) in [
        (PaddingSpec::Valid, [1, 1], true),
        (PaddingSpec::Same, [1, 1], true),
        (PaddingSpec::Same, [2, 2], false),
        (PaddingSpec::Explicit([1, 0, 2, 1]), [2, 1], true),
    ] {
        let mut conv = Conv2dConfig {
            in_channels: 2,
            out_channels: 3,
            kernel: [3, 2],
            stride,
            padding,
            bias,
            init: Init::HeUniform,
        }
        .init(&mut layer_rng(5, 0))
        .unwrap();
        let x = values.array(&[3, 2, 6, 5]);
        check_layer(
            &format!("Conv2d {padding:?} stride {stride:?}"),
            &mut conv,
            x,
            &mut values,
        );
    }
}

#[test]
fn dense_flatten_and_pooling() {
    let mut values = Values(2);
    let mut dense = DenseConfig {
        in_features: 7,
        out_features: 4,
        bias: true,
        init: Init::GlorotNormal,
    }
    .init(&mut layer_rng(1, 0))
    .unwrap();
    check_layer("Dense", &mut dense, values.array(&[5, 7]), &mut values);
    check_layer(
        "Flatten",
        &mut Flatten::default(),
        values.array(&[2, 3, 2, 2]),
        &mut values,
    );
    let mut max = Pool2dConfig {
        kind: PoolKind::Max,
        kernel: [2, 2],
        stride: [2, 2],
    }
    .init()
    .unwrap();
    check_layer(
        "MaxPool2d",
        &mut max,
        values.separated(&[2, 2, 4, 6]),
        &mut values,
    );
    let mut overlapping = Pool2dConfig {
        kind: PoolKind::Max,
        kernel: [3, 3],
        stride: [1, 2],
    }
    .init()
    .unwrap();
    check_layer(
        "MaxPool2d 3x3 overlapping",
        &mut overlapping,
        values.separated(&[1, 2, 5, 7]),
        &mut values,
    );
    let mut avg = Pool2dConfig {
        kind: PoolKind::Average,
        kernel: [2, 3],
        stride: [1, 2],
    }
    .init()
    .unwrap();
    check_layer(
        "AvgPool2d",
        &mut avg,
        values.array(&[2, 2, 5, 7]),
        &mut values,
    );
}

#[test]
fn activations_and_softmax() {
    let mut values = Values(3);
    for kind in [
        ActivationKind::Relu,
        ActivationKind::LeakyRelu(0.1),
        ActivationKind::Sigmoid,
        ActivationKind::Tanh,
    ] {
        let x = values.separated(&[3, 2, 2, 3]);
        check_layer(
            &format!("{kind:?}"),
            &mut Activation::new(kind),
            x,
            &mut values,
        );
    }
    let x = values.array(&[4, 5]).mapv(|v| 3.0 * v);
    check_layer(
        "Softmax",
        &mut Softmax::default(),
        x.into_dyn(),
        &mut values,
    );
}

#[test]
fn batch_norm_in_training_mode() {
    let mut values = Values(4);
    let mut bn2 = BatchNormConfig {
        features: 3,
        rank: 4,
        eps: 1e-5,
        momentum: 0.1,
    }
    .init()
    .unwrap();
    // Non-trivial scale and shift, so their gradients matter in dx.
    for (_, p) in bn2.params_mut() {
        p.value.mapv_inplace(|v| v + 0.3);
    }
    check_layer(
        "BatchNorm2d",
        &mut bn2,
        values.array(&[4, 3, 3, 2]).mapv(|v| 2.0 * v + 1.0),
        &mut values,
    );
    let mut bn1 = BatchNormConfig {
        features: 5,
        rank: 2,
        eps: 1e-5,
        momentum: 0.1,
    }
    .init()
    .unwrap();
    check_layer("BatchNorm1d", &mut bn1, values.array(&[6, 5]), &mut values);
}

#[test]
fn both_losses_with_classes_probabilities_and_smoothing() {
    let mut values = Values(5);
    let logits = values
        .array(&[4, 6])
        .into_dimensionality()
        .unwrap()
        .mapv(|v: f32| 2.0 * v);
    let labels = Array1::from(vec![0u8, 5, 2, 2]);
    let soft = {
        let raw = values
            .array(&[4, 6])
            .mapv(|v| v.abs() + 0.1)
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        let sums = raw.sum_axis(ndarray::Axis(1));
        &raw / &sums.insert_axis(ndarray::Axis(1))
    };
    type LossFn =
        fn(ndarray::ArrayView2<'_, f32>, Targets<'_>, f32) -> Result<nn::LossOutput, nn::NnError>;
    let cases: [(&str, LossFn, Array2<f32>); 2] = [
        (
            "softmax_cross_entropy",
            softmax_cross_entropy,
            logits.clone(),
        ),
        // Probabilities well inside the clipping range.
        (
            "categorical_cross_entropy",
            categorical_cross_entropy,
            soft.mapv(|p| 0.5 * p + 0.05),
        ),
    ];
    for (name, f, input) in cases {
        for (targets, smoothing) in [
            (Targets::Classes(labels.view()), 0.0),
            (Targets::Classes(labels.view()), 0.1),
            (Targets::Probabilities(soft.view()), 0.0),
        ] {
            let out = f(input.view(), targets, smoothing).unwrap();
            for i in 0..input.len() {
                let (r, c) = (i / 6, i % 6);
                let mut plus = input.clone();
                let mut minus = input.clone();
                plus[(r, c)] += STEP;
                minus[(r, c)] -= STEP;
                let numeric = (f64::from(f(plus.view(), targets, smoothing).unwrap().loss)
                    - f64::from(f(minus.view(), targets, smoothing).unwrap().loss))
                    / (2.0 * f64::from(STEP));
                assert_close(
                    &format!("{name} smoothing {smoothing} [{r},{c}]"),
                    numeric,
                    out.grad[(r, c)],
                );
            }
        }
    }
}

#[test]
fn a_whole_small_model_end_to_end() {
    let spec = nn::ModelSpec::from_json(
        r#"{"name": "tiny", "input": [1, 8, 8], "layers": [
            {"type": "Conv2d", "filters": 3, "kernel": [3, 3], "padding": "same"},
            {"type": "BatchNorm2d"},
            {"type": "Tanh"},
            {"type": "AvgPool2d", "kernel": [2, 2]},
            {"type": "Flatten"},
            {"type": "Dense", "units": 5},
            {"type": "Sigmoid"},
            {"type": "Dense", "units": 4}
        ]}"#,
    )
    .unwrap();
    let mut model = Sequential::new(spec, 9).unwrap();
    let mut values = Values(6);
    let x = values
        .array(&[3, 1, 8, 8])
        .into_dimensionality::<ndarray::Ix4>()
        .unwrap();
    let labels = Array1::from(vec![1u8, 3, 0]);
    let loss_at = |model: &mut Sequential| {
        let logits = model.forward(x.clone(), Mode::Train).unwrap();
        f64::from(
            softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0)
                .unwrap()
                .loss,
        )
    };
    model.zero_grad();
    let logits = model.forward(x.clone(), Mode::Train).unwrap();
    let out = softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0).unwrap();
    model.backward(out.grad).unwrap();
    let mut analytic = Vec::new();
    model.visit_params(|name, p| analytic.push((name.to_string(), p.grad.clone())));
    for (k, (name, grad)) in analytic.iter().enumerate() {
        for i in probes(grad.len()).into_iter().take(8) {
            let shift = |model: &mut Sequential, delta: f32| {
                let mut index = 0;
                model
                    .visit_params_mut(|_, p| {
                        if index == k {
                            p.value.as_slice_mut().unwrap()[i] += delta;
                        }
                        index += 1;
                        Ok(())
                    })
                    .unwrap();
            };
            shift(&mut model, 1e-2);
            let up = loss_at(&mut model);
            shift(&mut model, -2e-2);
            let down = loss_at(&mut model);
            shift(&mut model, 1e-2);
            assert_close(
                &format!("model {name}[{i}]"),
                (up - down) / 2e-2,
                grad.as_slice().unwrap()[i],
            );
        }
    }
    // The presets build and run too.
    for name in nn::PRESETS {
        let mut m = Sequential::new(preset(name).unwrap(), 1).unwrap();
        let y = m
            .forward(ndarray::Array4::zeros((2, 1, 28, 28)), Mode::Eval)
            .unwrap();
        assert_eq!(y.dim(), (2, 10), "{name}");
    }
}

/// The saliency map (`Sequential::input_gradient`) against central differences of the score,
/// the model in evaluation: BatchNorm with moved statistics, Dropout, convolutions, both
/// poolings, LeakyReLU, Tanh.
#[test]
fn input_gradient_matches_finite_differences_of_the_score() {
    let spec = nn::ModelSpec::from_json(
        r#"{"name": "saliency", "input": [1, 8, 8], "layers": [
            {"type": "Conv2d", "filters": 3, "kernel": [3, 3], "padding": "same"},
            {"type": "BatchNorm2d"}, {"type": "LeakyReLU", "negative_slope": 0.2},
            {"type": "AvgPool2d", "kernel": [2, 2]},
            {"type": "Conv2d", "filters": 4, "kernel": [2, 2]}, {"type": "Tanh"},
            {"type": "MaxPool2d", "kernel": [3, 3]},
            {"type": "Flatten"}, {"type": "Dense", "units": 6}, {"type": "BatchNorm1d"},
            {"type": "Dropout", "rate": 0.5}, {"type": "Dense", "units": 3}, {"type": "Softmax"}]}"#,
    )
    .unwrap();
    let mut model = nn::Sequential::new(spec, 7).unwrap();
    // Move BatchNorm's running statistics well away from 0 and 1, and its scales from 1, so
    // that getting either wrong shows.
    let batch = ndarray::Array4::from_shape_fn((4, 1, 8, 8), |(n, _, h, w)| {
        (((n * 7 + h * 3 + w * 5) % 13) as f32 / 6.0 - 1.0) * 4.0
    });
    for _ in 0..20 {
        model.forward(batch.clone(), nn::Mode::Train).unwrap();
    }
    model
        .visit_params_mut(|name, p| {
            if name == "1.weight" || name == "9.weight" {
                p.value
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = 0.5 + i as f32 * 0.7);
            }
            Ok(())
        })
        .unwrap();
    let x = ndarray::Array4::from_shape_fn((1, 1, 8, 8), |(_, _, h, w)| {
        ((h * 5 + w * 3) % 11) as f32 / 5.0 - 1.0
    });
    let class = 1;
    let gradient = model.input_gradient(x.clone(), class).unwrap();
    assert_eq!(gradient.shape(), [1, 1, 8, 8]);
    let mut score = |x: &ndarray::Array4<f32>| {
        f64::from(model.forward(x.clone(), nn::Mode::Eval).unwrap()[[0, class]])
    };
    let h = 1e-2f32;
    let mut checked = 0;
    for i in 0..8 {
        for j in 0..8 {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[[0, 0, i, j]] += h;
            down[[0, 0, i, j]] -= h;
            let numeric = (score(&up) - score(&down)) / (2.0 * f64::from(h));
            let analytic = f64::from(gradient[[0, 0, i, j]]);
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 2e-2 * numeric.abs().max(analytic.abs()),
                "pixel ({i}, {j}): numeric {numeric}, analytic {analytic}"
            );
            checked += usize::from(analytic != 0.0);
        }
    }
    assert!(checked > 10, "only {checked} pixels have a gradient");
}
