//! A model file saved here loads into the equivalent `torch.nn.Sequential` and gives the same
//! logits to 1e-4. Runs where a Python with torch and safetensors is found (`TORCH_PYTHON`, else
//! `python3`); elsewhere it says loudly that it was skipped.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::Command;

use ndarray::Array4;
use nn::{InputNormalization, Mode, ModelInfo, Sequential, preset, save_model};
use safetensors::tensor::{Dtype, TensorView};

fn python() -> Option<String> {
    let python = std::env::var("TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import torch, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

fn f32_bytes(values: impl Iterator<Item = f32>) -> Vec<u8> {
    values.flat_map(f32::to_le_bytes).collect()
}

#[test]
fn saved_models_give_pytorchs_logits() {
    let Some(python) = python() else {
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED saved_models_give_pytorchs_logits: no Python with torch and safetensors \
             (set TORCH_PYTHON; pip install torch safetensors) ***\n"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = Array4::from_shape_fn((16, 1, 28, 28), |(n, _, h, w)| {
        (((n * 31 + h * 17 + w * 7) % 23) as f32 / 23.0 - 0.13) / 0.31
    });
    // two-conv as initialized, and a model whose BatchNorm running statistics have moved.
    let with_state = nn::ModelSpec::from_json(
        r#"{"name": "bn", "input": [1, 28, 28], "layers": [
            {"type": "Conv2d", "filters": 4, "kernel": [5, 5], "padding": "same"},
            {"type": "BatchNorm2d"}, {"type": "LeakyReLU", "negative_slope": 0.1},
            {"type": "AvgPool2d", "kernel": [2, 2]}, {"type": "Flatten"},
            {"type": "Dense", "units": 32}, {"type": "BatchNorm1d"}, {"type": "Sigmoid"},
            {"type": "Dropout", "rate": 0.3}, {"type": "Dense", "units": 10}]}"#,
    )
    .unwrap();
    let mut moved = Sequential::new(with_state, 5).unwrap();
    moved.forward(input.clone(), Mode::Train).unwrap();
    for (name, mut model) in [
        (
            "two-conv",
            Sequential::new(preset("two-conv").unwrap(), 11).unwrap(),
        ),
        ("bn", moved),
    ] {
        let model_path = dir.path().join(format!("{name}.safetensors"));
        let io_path = dir.path().join(format!("{name}-io.safetensors"));
        let info = ModelInfo {
            normalization: Some(InputNormalization {
                mean: 0.1307,
                std: 0.3081,
            }),
            training: serde_json::Value::Null,
        };
        save_model(&model_path, &model, &info).unwrap();
        let logits = model.forward(input.clone(), Mode::Eval).unwrap();
        let input_bytes = f32_bytes(input.iter().copied());
        let logits_bytes = f32_bytes(logits.iter().copied());
        let tensors = vec![
            (
                "input",
                TensorView::new(Dtype::F32, input.shape().to_vec(), &input_bytes).unwrap(),
            ),
            (
                "logits",
                TensorView::new(Dtype::F32, logits.shape().to_vec(), &logits_bytes).unwrap(),
            ),
        ];
        std::fs::write(&io_path, safetensors::serialize(tensors, None).unwrap()).unwrap();
        compare(&python, &model_path, &io_path, name);
    }
}

fn compare(python: &str, model_path: &Path, io_path: &Path, name: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/torch/check_logits.py");
    let out = Command::new(python)
        .arg(script)
        .arg(model_path)
        .arg(io_path)
        .arg("1e-4")
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = writeln!(std::io::stderr(), "{name}: {}", report.trim());
    assert!(out.status.success(), "{name}: {report}");
}
