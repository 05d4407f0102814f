//! Exported files checked against the real thing: onnx's checker in full-check mode, then
//! onnxruntime's outputs against this project's on the same inputs, for every preset, an
//! architecture using every layer kind, and a trained two-conv on all 10,000 MNIST test images.
//!
//! Needs a Python with `onnxruntime`, `onnx` and `numpy`: `ONNX_PYTHON`, else the virtual
//! environment `.ci/run` makes at `target/onnx-venv`. Without one the tests say SKIPPED loudly
//! and pass, unless `MNIST_REQUIRE_ONNX` is set, as CI sets it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use mnist_data::{LabeledImages, LoadOptions, Normalization, load_split};
use ndarray::{Array2, Array4, Axis};
use nn::{InputNormalization, Mode, ModelInfo, ModelSpec, Sequential, preset};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python that imports onnxruntime, onnx and numpy, or `None` after a loud skip notice.
fn python(test: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("ONNX_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([workspace().join("target/onnx-venv/bin/python")])
        .collect();
    for python in candidates {
        let works = Command::new(&python)
            .args(["-c", "import onnxruntime, onnx, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            return Some(python);
        }
    }
    let required = std::env::var("MNIST_REQUIRE_ONNX").is_ok_and(|v| v != "0");
    assert!(
        !required,
        "{test}: no Python with onnxruntime, onnx and numpy (ONNX_PYTHON or target/onnx-venv), \
         and MNIST_REQUIRE_ONNX is set"
    );
    eprintln!(
        "\n*** SKIPPED {test}: no Python with onnxruntime, onnx and numpy (set ONNX_PYTHON, or \
         python3 -m venv target/onnx-venv && target/onnx-venv/bin/pip install onnxruntime onnx \
         numpy) ***\n"
    );
    None
}

/// What onnxruntime said about one exported model.
#[derive(Debug, serde::Deserialize)]
struct Comparison {
    max_logit_diff: f32,
    max_probability_diff: f32,
    argmax_agree: usize,
    images: usize,
    opset: Vec<i64>,
    ir_version: i64,
    producer: String,
    metadata: Vec<String>,
}

fn write_f32(path: &Path, values: impl Iterator<Item = f32>) {
    let bytes: Vec<u8> = values.flat_map(f32::to_le_bytes).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Exports `model`, runs it in onnxruntime on `pixels` (0..1) and compares with our forward
/// pass on the same pixels normalized as the graph normalizes them.
fn compare(
    python: &Path,
    model: &mut Sequential,
    normalization: InputNormalization,
    pixels: &Array4<f32>,
) -> Comparison {
    let dir = tempfile::tempdir().unwrap();
    let info = ModelInfo {
        normalization: Some(normalization),
        training: serde_json::json!({"epochs_run": 1, "history": [1, 2, 3]}),
    };
    let onnx = dir.path().join("model.onnx");
    onnx_export::write_onnx(&onnx, model, &info).unwrap();
    // As the graph's Sub and Div nodes compute it, in f32.
    let normalized = pixels.mapv(|x| (x - normalization.mean) / normalization.std);
    let mut logits = Array2::<f32>::zeros((0, 0));
    for chunk in normalized.axis_chunks_iter(Axis(0), 1000) {
        let part = model.forward(chunk.to_owned(), Mode::Eval).unwrap();
        logits = if logits.is_empty() {
            part
        } else {
            ndarray::concatenate(Axis(0), &[logits.view(), part.view()]).unwrap()
        };
    }
    let mut probabilities = Array2::zeros(logits.raw_dim());
    tensor::softmax(logits.view(), Axis(1), probabilities.view_mut()).unwrap();
    let paths = ["inputs.f32", "logits.f32", "probabilities.f32"].map(|n| dir.path().join(n));
    write_f32(&paths[0], pixels.iter().copied());
    write_f32(&paths[1], logits.iter().copied());
    write_f32(&paths[2], probabilities.iter().copied());
    let shape = pixels
        .shape()
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>();
    let output = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_onnx.py"))
        .arg(&onnx)
        .arg(&paths[0])
        .args(&shape)
        .args([&paths[1], &paths[2]])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}: {}",
        model.spec().name,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Pixels in 0..1 of the first `n` test images when the real data is here, else a pattern.
fn pixels(test: Option<&LabeledImages>, n: usize) -> Array4<f32> {
    match test {
        Some(test) => Array4::from_shape_fn((n, 1, 28, 28), |(i, _, r, c)| {
            f32::from(test.image(i)[(r, c)]) / 255.0
        }),
        None => Array4::from_shape_fn((n, 1, 28, 28), |(i, _, r, c)| {
            ((i * 7 + r * 13 + c * 3) % 29) as f32 / 29.0
        }),
    }
}

fn test_set() -> Option<LabeledImages> {
    let dir = mnist_data::testing::real_data_or_skip("onnxruntime (real test images)")?;
    Some(load_split(&dir, mnist_data::Split::Test, &LoadOptions::default()).unwrap())
}

/// Every layer kind: padded, strided and plain convolutions with and without bias, both
/// poolings, BatchNorm in both ranks with moved statistics, every activation, Dropout and a
/// final Softmax.
const ALL_LAYERS: &str = r#"{"name": "all-layers", "input": [1, 28, 28], "layers": [
    {"type": "Conv2d", "filters": 8, "kernel": [3, 3], "padding": "same"},
    {"type": "BatchNorm2d"}, {"type": "LeakyReLU", "negative_slope": 0.1},
    {"type": "MaxPool2d", "kernel": [2, 2]},
    {"type": "Conv2d", "filters": 6, "kernel": [3, 3], "stride": [2, 2], "padding": {"explicit": [1, 0, 1, 0]}, "bias": false},
    {"type": "Tanh"}, {"type": "AvgPool2d", "kernel": [3, 3], "stride": [2, 2]},
    {"type": "Conv2d", "filters": 4, "kernel": [2, 2]}, {"type": "ReLU"},
    {"type": "Flatten"},
    {"type": "Dense", "units": 16}, {"type": "BatchNorm1d"}, {"type": "Sigmoid"},
    {"type": "Dropout", "rate": 0.3}, {"type": "Dense", "units": 10, "bias": false},
    {"type": "Softmax"}]}"#;

const NORMALIZATION: InputNormalization = InputNormalization {
    mean: 0.1307,
    std: 0.3081,
};

#[test]
fn every_preset_and_every_layer_kind_run_the_same_in_onnxruntime() {
    let Some(python) = python("every_preset_and_every_layer_kind") else {
        return;
    };
    let test = test_set();
    let x = pixels(test.as_ref(), 64);
    let mut models: Vec<Sequential> = nn::PRESETS
        .iter()
        .map(|name| Sequential::new(preset(name).unwrap(), 5).unwrap())
        .collect();
    let mut all = Sequential::new(ModelSpec::from_json(ALL_LAYERS).unwrap(), 5).unwrap();
    // Move BatchNorm's running statistics away from 0 and 1, so they matter.
    let normalized = x.mapv(|p| (p - NORMALIZATION.mean) / NORMALIZATION.std);
    all.forward(normalized, Mode::Train).unwrap();
    models.push(all);
    for model in &mut models {
        let result = compare(&python, model, NORMALIZATION, &x);
        println!(
            "{}: max |logit difference| {:.2e}, max |probability difference| {:.2e}, {} of {} classes agree",
            model.spec().name,
            result.max_logit_diff,
            result.max_probability_diff,
            result.argmax_agree,
            result.images
        );
        assert!(result.max_probability_diff < 1e-5, "{result:?}");
        assert!(result.max_logit_diff < 1e-4, "{result:?}");
        assert_eq!(result.argmax_agree, result.images, "{result:?}");
        assert_eq!((result.opset.as_slice(), result.ir_version), (&[13][..], 7));
        assert_eq!(result.producer, "mnist-cnn");
        assert_eq!(result.metadata, ["normalization", "spec", "training"]);
    }
}

#[test]
fn a_trained_two_conv_agrees_with_onnxruntime_on_all_10000_test_images() {
    let Some(python) = python("a_trained_two_conv_agrees") else {
        return;
    };
    let Some(dir) = mnist_data::testing::real_data_or_skip("a_trained_two_conv_agrees") else {
        return;
    };
    let data = mnist_data::load_dir(&dir, &LoadOptions::default()).unwrap();
    let normalization = Normalization::fit(&data.train);
    let mut model = Sequential::new(preset("two-conv").unwrap(), 1).unwrap();
    let mut optimizer = nn::Optimizer::new(nn::Rule::adam(), 1e-3).unwrap();
    // One epoch, as the training loop runs it: batches of 64 in a seeded order.
    let batches = mnist_data::Batches::new(
        &data.train,
        64,
        mnist_data::BatchOrder::Shuffled { seed: 1, epoch: 0 },
        &normalization,
    )
    .unwrap();
    for batch in batches {
        model.zero_grad();
        let logits = model.forward(batch.images, Mode::Train).unwrap();
        let loss = nn::softmax_cross_entropy(
            logits.view(),
            nn::Targets::Classes(batch.labels.view()),
            0.0,
        )
        .unwrap();
        model.backward(loss.grad).unwrap();
        optimizer.step(&mut model).unwrap();
    }
    let x = pixels(Some(&data.test), data.test.len());
    let result = compare(
        &python,
        &mut model,
        InputNormalization {
            mean: normalization.mean,
            std: normalization.std,
        },
        &x,
    );
    println!(
        "trained two-conv on {} test images: max |probability difference| {:.2e}, max |logit difference| {:.2e}, {} classes agree",
        result.images, result.max_probability_diff, result.max_logit_diff, result.argmax_agree
    );
    assert_eq!(result.images, 10_000);
    assert!(result.max_probability_diff < 1e-5, "{result:?}");
    assert_eq!(result.argmax_agree, 10_000, "{result:?}");
}

#[test]
fn a_model_without_normalization_is_refused_not_exported_differently() {
    let model = Sequential::new(preset("lenet5").unwrap(), 1).unwrap();
    let info = ModelInfo {
        normalization: None,
        training: serde_json::Value::Null,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    let error = onnx_export::write_onnx(&path, &model, &info)
        .unwrap_err()
        .to_string();
    assert!(error.contains("no input normalization"), "{error}");
    assert!(!path.exists());
}
