//! Model files: save then load gives bit-identical outputs; every kind of wrong file is refused
//! with a message naming the file and the tensor.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use ndarray::Array4;
use nn::{
    InputNormalization, Mode, ModelInfo, ModelSpec, Sequential, load_model, load_weights, preset,
    save_model,
};
use safetensors::tensor::{Dtype, TensorView};

fn images() -> Array4<f32> {
    Array4::from_shape_fn((5, 1, 28, 28), |(n, _, h, w)| {
        ((n * 13 + h * 7 + w * 3) % 17) as f32 / 17.0 - 0.3
    })
}

fn info() -> ModelInfo {
    ModelInfo {
        normalization: Some(InputNormalization {
            mean: 0.1307,
            std: 0.3081,
        }),
        training: serde_json::json!({"epochs": 1, "optimizer": "adam"}),
    }
}

/// A model with BatchNorm whose running statistics have moved, so state matters too.
fn trained_bn_model() -> Sequential {
    let spec = ModelSpec::from_json(
        r#"{"name": "bn", "input": [1, 28, 28], "layers": [
            {"type": "Conv2d", "filters": 4, "kernel": [3, 3], "stride": [2, 2]}, {"type": "BatchNorm2d"},
            {"type": "ReLU"}, {"type": "Flatten"}, {"type": "Dense", "units": 10}]}"#,
    )
    .unwrap();
    let mut model = Sequential::new(spec, 4).unwrap();
    model.forward(images(), Mode::Train).unwrap();
    model
}

#[test]
fn save_then_load_gives_bit_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for (name, mut model) in [
        (
            "two-conv",
            Sequential::new(preset("two-conv").unwrap(), 7).unwrap(),
        ),
        ("bn", trained_bn_model()),
    ] {
        let path = dir.path().join(format!("{name}.safetensors"));
        let expected = model.forward(images(), Mode::Eval).unwrap();
        save_model(&path, &model, &info()).unwrap();

        let (mut whole, loaded_info) = load_model(&path).unwrap();
        assert_eq!(loaded_info, info());
        assert_eq!(whole.spec(), model.spec());
        assert_eq!(
            whole.forward(images(), Mode::Eval).unwrap(),
            expected,
            "{name}: whole model"
        );

        let mut fresh = Sequential::new(model.spec().clone(), 999).unwrap();
        assert_ne!(fresh.forward(images(), Mode::Eval).unwrap(), expected);
        load_weights(&path, &mut fresh).unwrap();
        assert_eq!(
            fresh.forward(images(), Mode::Eval).unwrap(),
            expected,
            "{name}: weights only"
        );
    }
}

#[test]
fn files_are_pytorch_named_and_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_model(&path, &trained_bn_model(), &info()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = file.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "0.bias",
            "0.weight",
            "1.bias",
            "1.num_batches_tracked",
            "1.running_mean",
            "1.running_var",
            "1.weight",
            "4.bias",
            "4.weight"
        ]
    );
    assert_eq!(file.tensor("0.weight").unwrap().shape(), [4, 1, 3, 3]);
    assert_eq!(file.tensor("4.weight").unwrap().shape(), [10, 4 * 13 * 13]);
    let counter = file.tensor("1.num_batches_tracked").unwrap();
    assert_eq!((counter.dtype(), counter.shape()), (Dtype::I64, &[][..]));
    assert_eq!(counter.data(), 1i64.to_le_bytes());
}

/// Writes a safetensors file with these tensors (all f32 zeros) and metadata.
fn write_file(path: &Path, tensors: &[(&str, Vec<usize>)], metadata: &[(&str, &str)]) {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, s)| vec![0u8; 4 * s.iter().product::<usize>()])
        .collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            (
                n.to_string(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// Writes one kind of wrong file at the given path.
type MakeFile<'a> = Box<dyn Fn(&Path) + 'a>;

#[test]
fn wrong_files_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let spec = preset("lenet5").unwrap();
    let spec_json = spec.to_json();
    let good = dir.path().join("good.safetensors");
    let reference = Sequential::new(spec.clone(), 1).unwrap();
    save_model(&good, &reference, &info()).unwrap();
    let mut all: Vec<(String, Vec<usize>)> = Vec::new();
    reference.visit_params(|n, p| all.push((n.to_string(), p.value.shape().to_vec())));
    let named = |skip: &str| -> Vec<(&str, Vec<usize>)> {
        all.iter()
            .filter(|(n, _)| n != skip)
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect()
    };
    let meta = |version: &'static str| {
        vec![
            ("format", "mnist-cnn.model"),
            ("format_version", version),
            ("spec", spec_json.as_str()),
        ]
    };

    let mut cases: Vec<(&str, MakeFile, &str)> = vec![
        (
            "missing",
            Box::new(|p: &Path| write_file(p, &named("3.bias"), &meta("1"))),
            "tensor 3.bias is missing",
        ),
        (
            "extra",
            Box::new(|p: &Path| {
                let mut t = named("");
                t.push(("12.weight", vec![2, 2]));
                write_file(p, &t, &meta("1"))
            }),
            "tensor 12.weight is not part of the model",
        ),
        (
            "misshaped",
            Box::new(|p: &Path| {
                let mut t = named("0.weight");
                t.push(("0.weight", vec![6, 1, 3, 3]));
                write_file(p, &t, &meta("1"))
            }),
            "tensor 0.weight has shape [6, 1, 3, 3], the model expects [6, 1, 5, 5]",
        ),
        (
            "newer",
            Box::new(|p: &Path| write_file(p, &named(""), &meta("3"))),
            "version 3 is newer",
        ),
        (
            "older",
            Box::new(|p: &Path| write_file(p, &named(""), &meta("0"))),
            "version 0 is not supported",
        ),
        (
            "foreign",
            Box::new(|p: &Path| write_file(p, &named(""), &[("format", "pt")])),
            "not a file of this project's format",
        ),
        (
            "bare",
            Box::new(|p: &Path| write_file(p, &named(""), &[])),
            "without this project's metadata",
        ),
        (
            "garbage",
            Box::new(|p: &Path| std::fs::write(p, b"definitely not a model").unwrap()),
            "not a safetensors model file",
        ),
        (
            "truncated",
            Box::new(|p: &Path| {
                let bytes = std::fs::read(dir.path().join("good.safetensors")).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap()
            }),
            "not a safetensors model file",
        ),
    ];
    cases.push(("absent", Box::new(|_: &Path| {}), "cannot read"));
    for (name, make, needle) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        make(&path);
        let mut model = Sequential::new(spec.clone(), 5).unwrap();
        let before = model.forward(images(), Mode::Eval).unwrap();
        let err = load_weights(&path, &mut model).unwrap_err().to_string();
        assert!(
            err.contains(needle) && err.contains(&format!("{name}.safetensors")),
            "{name}: {err}"
        );
        // A failed load leaves the model as it was.
        assert_eq!(
            model.forward(images(), Mode::Eval).unwrap(),
            before,
            "{name}"
        );
        if !matches!(name, "missing" | "extra" | "misshaped") {
            let err = load_model(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{name} (whole model): {err}");
        }
    }
}

#[test]
fn saving_is_atomic_and_leaves_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let model = Sequential::new(preset("lenet5").unwrap(), 1).unwrap();
    save_model(&path, &model, &info()).unwrap();
    save_model(&path, &model, &info()).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["m.safetensors"]);
    // Into a directory that does not exist: an error naming the file, nothing written.
    let err = save_model(
        &dir.path().join("no/such/dir/m.safetensors"),
        &model,
        &info(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("m.safetensors"), "{err}");
}
