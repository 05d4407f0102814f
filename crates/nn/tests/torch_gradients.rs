//! Loss and parameter gradients of whole models against PyTorch's, from a committed fixture
//! (`torch/gradients.safetensors`, written by `torch/make_gradient_fixture.py`, which says how:
//! PyTorch in float64 on fixed weights and a fixed batch). The loss, and each parameter's
//! gradient (its sum, its norm and a sample of up to 4096 entries), must match with a relative
//! error under 1e-4; a gradient that is zero in exact arithmetic (a convolution's bias before
//! BatchNorm) is measured against a hundredth of the model's largest gradient norm instead of
//! its own.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use ndarray::{Array1, Array4, ArrayD};
use nn::{LayerSpec, Mode, ModelSpec, Sequential, Targets, preset, softmax_cross_entropy};
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/torch/gradients.safetensors"
);

/// The fixture script's `fixed_values`: an integer hash of (index, salt) over 2^32, minus 0.5,
/// rounded once to f32 (the same bits as numpy's).
fn fixed_values(count: usize, salt: u64) -> Vec<f32> {
    (0..count as u64)
        .map(|i| {
            let h = (i * 2_654_435_761 + salt * 40_503) % (1 << 32);
            let h = ((h ^ (h >> 15)) * 2_246_822_519) % (1 << 32);
            (h as f64 / (1u64 << 32) as f64 - 0.5) as f32
        })
        .collect()
}

/// The fixture script's `parameter_values` for parameter `kind` ("weight" or "bias") of the
/// layer at `index` of the spec PyTorch built.
fn parameter_values(index: usize, kind: &str, shape: &[usize]) -> ArrayD<f32> {
    let salt = 10 * index as u64 + u64::from(kind != "weight");
    let u = fixed_values(shape.iter().product(), salt);
    let values: Vec<f32> = if kind == "weight" && shape.len() > 1 {
        let fan_in: usize = shape[1..].iter().product();
        let scale = 2.0f32 / (fan_in as f32).sqrt();
        u.iter().map(|v| v * scale).collect()
    } else if kind == "weight" {
        u.iter().map(|v| 1.0 + v * 0.2).collect()
    } else {
        u.iter().map(|v| v * 0.2).collect()
    };
    ArrayD::from_shape_vec(shape.to_vec(), values).unwrap()
}

fn scalar(file: &SafeTensors<'_>, name: &str) -> f64 {
    values(file, name)[0].into()
}

fn values(file: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// `|got - want| <= 1e-4 * max(|want|, floor)`.
fn close(got: f64, want: f64, floor: f64) -> bool {
    (got - want).abs() <= 1e-4 * want.abs().max(floor)
}

#[test]
fn every_gradient_of_each_architecture_matches_pytorchs() {
    let bytes = std::fs::read(FIXTURE).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap();
    let specs: HashMap<String, ModelSpec> =
        serde_json::from_str::<HashMap<String, _>>(&metadata["specs"])
            .unwrap()
            .into_iter()
            .map(|(name, spec): (String, serde_json::Value)| {
                (name, ModelSpec::from_json(&spec.to_string()).unwrap())
            })
            .collect();
    let strides: HashMap<String, usize> = serde_json::from_str(&metadata["strides"]).unwrap();
    let batch: usize = metadata["batch"].parse().unwrap();
    assert_eq!(specs.len(), nn::PRESETS.len() + 1, "{:?}", specs.keys());
    let mut failures = Vec::new();
    let mut compared = 0;
    let mut worst = 0f64;
    let mut worst_name = String::new();
    for (arch, spec) in &specs {
        if let Some(preset) = preset(arch) {
            assert_eq!(&preset, spec, "the fixture's {arch} is not the preset");
        }
        // Dropout in evaluation is the identity: PyTorch's gradients are those of the same
        // model without it. `torch_index[k]` is PyTorch's index of our layer k.
        let mut ours = spec.clone();
        let torch_index: Vec<usize> = (0..spec.layers.len())
            .filter(|&i| !matches!(spec.layers[i], LayerSpec::Dropout { .. }))
            .collect();
        ours.layers = torch_index
            .iter()
            .map(|&i| spec.layers[i].clone())
            .collect();
        let template = Sequential::new(ours.clone(), 0).unwrap();
        let mut tensors = HashMap::new();
        template.visit_params(|name, param| {
            let (layer, kind) = name.split_once('.').unwrap();
            let index = torch_index[layer.parse::<usize>().unwrap()];
            let values = parameter_values(index, kind, param.value.shape());
            tensors.insert(name.to_string(), values);
        });
        template.visit_buffers(|name, buffer| {
            tensors.insert(name.to_string(), buffer.clone());
        });
        let mut model = Sequential::with_tensors(ours, tensors).unwrap();
        let images: Vec<f32> = fixed_values(batch * 28 * 28, 1000)
            .into_iter()
            .map(|v| v + 0.5)
            .collect();
        let images = Array4::from_shape_vec((batch, 1, 28, 28), images).unwrap();
        let labels = Array1::from_shape_fn(batch, |n| (n % 10) as u8);
        model.zero_grad();
        let logits = model.forward(images, Mode::Train).unwrap();
        let out =
            softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0).unwrap();
        model.backward(out.grad).unwrap();
        let want = scalar(&file, &format!("{arch}.loss"));
        if !close(out.loss.into(), want, 0.0) {
            failures.push(format!("{arch} loss: {} against {want}", out.loss));
        }
        // The largest gradient norm of the model: a hundredth of it is the scale for gradients
        // that are zero in
        // exact arithmetic (a convolution's bias before BatchNorm, whose batch mean cancels
        // it), where PyTorch's float64 leaves 1e-17 and float32 1e-9.
        let prefix = format!("{arch}.grad.");
        let scale = file
            .names()
            .into_iter()
            .filter(|n| n.starts_with(&prefix) && n.ends_with(".norm"))
            .map(|n| scalar(&file, n))
            .fold(0f64, f64::max);
        model.visit_params(|name, param| {
            let (layer, kind) = name.split_once('.').unwrap();
            let torch_name = format!("{}.{kind}", torch_index[layer.parse::<usize>().unwrap()]);
            let key = format!("{arch}.grad.{torch_name}");
            let grad: Vec<f64> = param.grad.iter().map(|&g| f64::from(g)).collect();
            let sum: f64 = grad.iter().sum();
            let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
            let (want_sum, want_norm) = (
                scalar(&file, &format!("{key}.sum")),
                scalar(&file, &format!("{key}.norm")),
            );
            let sample = values(&file, &format!("{key}.sample"));
            // A sum cancels: its error is measured against the norm times the entries' count.
            let sum_floor = want_norm.max(1e-2 * scale) * (grad.len() as f64).sqrt();
            if !close(sum, want_sum, sum_floor) || !close(norm, want_norm, 1e-2 * scale) {
                failures.push(format!(
                    "{arch} {name}: sum {sum} norm {norm}, PyTorch {want_sum} {want_norm}"
                ));
            }
            let stride = strides[&format!("{arch}.{torch_name}")];
            let taken: Vec<f64> = grad.iter().step_by(stride).copied().collect();
            assert_eq!(taken.len(), sample.len(), "{key}: sample length");
            compared += taken.len();
            // The relative error of the tensor (as `torch.testing` and gradient checks measure
            // it): single entries that cancel to near zero carry float32's rounding of the
            // terms they cancel, not of themselves.
            let (mut error, mut size) = (0.0, 0.0);
            for (&got, &want) in taken.iter().zip(&sample) {
                error += (got - f64::from(want)).powi(2);
                size += f64::from(want).powi(2);
            }
            let floor = (1e-2 * scale).powi(2) * sample.len() as f64 / grad.len() as f64;
            let relative = (error / size.max(floor).max(f64::MIN_POSITIVE)).sqrt();
            if relative > worst {
                worst = relative;
                worst_name = format!("{arch} {name}");
            }
            if relative >= 1e-4 {
                failures.push(format!("{arch} {name}: relative error {relative:.2e}"));
            }
        });
    }
    println!(
        "{compared} gradient entries compared, largest relative error {worst:.2e} ({worst_name})"
    );
    assert!(compared > 10_000, "only {compared} entries compared");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
