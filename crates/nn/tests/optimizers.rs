//! Optimizers against PyTorch's update rules, state save and restore, and the guarantee that a
//! step changes every parameter or fails.

#![allow(clippy::unwrap_used)]

use ndarray::{Array1, Array4};
use nn::{
    Mode, ModelSpec, NnError, Optimizer, Rule, Sequential, Targets, preset, softmax_cross_entropy,
};

/// A model with exactly two scalars: `1.weight` [1, 1] and `1.bias` [1].
fn two_scalars() -> Sequential {
    let spec = ModelSpec::from_json(
        r#"{"name": "scalars", "input": [1, 1, 1], "layers": [{"type": "Flatten"}, {"type": "Dense", "units": 1}]}"#,
    )
    .unwrap();
    Sequential::new(spec, 0).unwrap()
}

fn set(model: &mut Sequential, values: [f32; 2], grads: Option<[f32; 2]>) {
    let mut i = 0;
    model
        .visit_params_mut(|_, p| {
            p.value.fill(values[i]);
            if let Some(g) = grads {
                p.grad.fill(g[i]);
                p.has_grad = true;
            }
            i += 1;
            Ok(())
        })
        .unwrap();
}

fn get(model: &Sequential) -> Vec<f32> {
    let mut out = Vec::new();
    model.visit_params(|_, p| {
        out.push(p.value[[0, 0].as_slice()[..p.value.ndim()].to_vec().as_slice()])
    });
    out
}

/// Expected values after two steps from p = [1, -2] with gradients [0.5, -0.25] then
/// [0.1, 0.3] and lr 0.1, computed by transcribing torch.optim's documented algorithms into
/// plain Python (float64):
///
/// ```python
/// def adam(b1, b2, eps, wd, decoupled):          # torch.optim.Adam / AdamW
///     p = [1.0, -2.0]; m = [0, 0]; v = [0, 0]
///     for t, g in enumerate([[0.5, -0.25], [0.1, 0.3]], 1):
///         for i in range(2):
///             d = g[i]
///             if decoupled: p[i] *= 1 - lr * wd
///             else: d += wd * p[i]
///             m[i] = b1 * m[i] + (1 - b1) * d; v[i] = b2 * v[i] + (1 - b2) * d * d
///             p[i] -= (lr / (1 - b1**t)) * m[i] / (sqrt(v[i]) / sqrt(1 - b2**t) + eps)
/// # SGD: d = g + wd*p; buf = d at t=1 else mom*buf + (1-damp)*d; p -= lr*(d + mom*buf if nesterov else buf)
/// # RMSprop: d = g + wd*p; v = alpha*v + (1-alpha)*d*d; p -= lr*d/(sqrt(v)+eps)
/// # Adagrad: d = g + wd*p; s += d*d; p -= lr*d/(sqrt(s)+eps)
/// ```
#[test]
fn two_steps_match_pytorchs_update_rules() {
    let cases: [(&str, Rule, [f64; 2]); 8] = [
        ("sgd", Rule::sgd(0.0), [0.94, -2.005]),
        (
            "sgd momentum 0.9, weight decay 0.01",
            Rule::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.01,
            },
            [0.892151, -1.976727],
        ),
        (
            "sgd nesterov 0.9",
            Rule::Sgd {
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 0.0,
            },
            [0.8455, -1.98925],
        ),
        (
            "adam",
            Rule::adam(),
            [0.8196959063846517, -1.914294476547747],
        ),
        (
            "adam weight decay 0.1",
            Rule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                decoupled: false,
            },
            [0.8136483454297575, -1.8525905496385555],
        ),
        (
            "adamw weight decay 0.1",
            Rule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                decoupled: true,
            },
            [0.8007959063646517, -1.875494476507747],
        ),
        (
            "rmsprop",
            Rule::rmsprop(),
            [-0.19706561679795428, -1.7698005613885273],
        ),
        (
            "adagrad",
            Rule::adagrad(),
            [0.8803883865100278, -1.9768221279800653],
        ),
    ];
    for (name, rule, expected) in cases {
        let mut model = two_scalars();
        let mut optimizer = Optimizer::new(rule, 0.1).unwrap();
        set(&mut model, [1.0, -2.0], Some([0.5, -0.25]));
        optimizer.step(&mut model).unwrap();
        let after_one = get(&model);
        set(&mut model, [after_one[0], after_one[1]], Some([0.1, 0.3]));
        optimizer.step(&mut model).unwrap();
        let got = get(&model);
        for (g, e) in got.iter().zip(expected) {
            assert!(
                (f64::from(*g) - e).abs() < 1e-6,
                "{name}: got {got:?}, PyTorch's rule gives {expected:?}"
            );
        }
    }
}

#[test]
fn a_step_without_gradients_is_an_error_naming_the_parameter() {
    let mut model = two_scalars();
    let mut optimizer = Optimizer::new(Rule::adam(), 1e-3).unwrap();
    let err = optimizer.step(&mut model).unwrap_err();
    assert!(
        matches!(&err, NnError::MissingGradient(name) if name == "1.weight"),
        "{err}"
    );
}

#[test]
fn impossible_learning_rates_are_refused() {
    for lr in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(Optimizer::new(Rule::adam(), lr).is_err(), "{lr}");
    }
}

/// One training step of a real model with each optimizer changes every parameter.
#[test]
fn one_step_changes_every_parameter() {
    for rule in [
        Rule::sgd(0.9),
        Rule::adam(),
        Rule::adamw(),
        Rule::rmsprop(),
        Rule::adagrad(),
    ] {
        let mut model = Sequential::new(preset("one-conv-dropout").unwrap(), 3).unwrap();
        let images = Array4::from_shape_fn((4, 1, 28, 28), |(n, _, h, w)| {
            ((n * 7 + h * 3 + w) % 11) as f32 / 11.0
        });
        let labels = Array1::from(vec![1u8, 7, 3, 9]);
        let mut before = Vec::new();
        model.visit_params(|name, p| before.push((name.to_string(), p.value.clone())));
        model.zero_grad();
        let logits = model.forward(images, Mode::Train).unwrap();
        let loss =
            softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0).unwrap();
        model.backward(loss.grad).unwrap();
        let mut optimizer = Optimizer::new(rule, 1e-2).unwrap();
        optimizer.step(&mut model).unwrap();
        let mut i = 0;
        model.visit_params(|name, p| {
            let (_, old) = &before[i];
            let changed = p.value.iter().zip(old).filter(|(a, b)| a != b).count();
            assert!(changed > 0, "{rule:?}: {name} did not change at all");
            // Every element whose update is representable next to its value must have moved
            // (these rules step by at least lr * |g| for |g| < 1); a gradient below f32
            // resolution, or exactly 0 behind a ReLU that never fired, may leave it in place.
            for ((new, old), &g) in p.value.iter().zip(old).zip(&p.grad) {
                if 1e-2 * g.abs() > old.abs() * 1e-6 + 1e-30 {
                    assert_ne!(
                        new, old,
                        "{rule:?}: {name} has gradient {g} but did not move"
                    );
                }
            }
            i += 1;
        });
    }
}

#[test]
fn state_round_trips_and_continues_identically() {
    let run = |split: bool| {
        let mut model = two_scalars();
        let mut optimizer = Optimizer::new(Rule::adam(), 0.05).unwrap();
        let grads = [[0.5, -0.25], [0.1, 0.3], [-0.2, 0.4]];
        let mut values = [1.0f32, -2.0];
        for (t, g) in grads.iter().enumerate() {
            set(&mut model, values, Some(*g));
            if split && t == 2 {
                // Save, then continue with a fresh optimizer restored from the state.
                let state = optimizer.state();
                assert_eq!(state.tensors.len(), 4);
                optimizer = Optimizer::new(Rule::adam(), 0.05).unwrap();
                optimizer.load_state(state, &model).unwrap();
            }
            optimizer.step(&mut model).unwrap();
            let got = get(&model);
            values = [got[0], got[1]];
        }
        values
    };
    assert_eq!(run(false), run(true));
}
