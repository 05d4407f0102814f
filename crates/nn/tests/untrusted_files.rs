//! Specs and model files from strangers: every limit is enforced with a message naming the
//! layer or the file, corrupt or diverged files are refused, files of version 1 still load, and
//! thousands of mutated files end in `Ok` or `Err`, never a panic.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use ndarray::Array4;
use nn::{
    InputNormalization, Mode, ModelInfo, ModelSpec, Sequential, load_model, preset, save_model,
    summary,
};
use proptest::prelude::*;
use serde_json::Value;

fn info() -> ModelInfo {
    ModelInfo {
        normalization: Some(InputNormalization {
            mean: 0.1307,
            std: 0.3081,
        }),
        training: Value::Null,
    }
}

fn images() -> Array4<f32> {
    Array4::from_shape_fn((3, 1, 28, 28), |(n, _, h, w)| {
        ((n * 11 + h * 5 + w * 3) % 13) as f32 / 13.0
    })
}

/// Every layer kind, with BatchNorm's state, so plans and files cover them all.
const ALL_LAYERS: &str = r#"{"name": "all", "input": [1, 28, 28], "layers": [
    {"type": "Conv2d", "filters": 4, "kernel": [3, 3], "padding": "same"},
    {"type": "BatchNorm2d"}, {"type": "LeakyReLU"},
    {"type": "MaxPool2d", "kernel": [2, 2]},
    {"type": "Conv2d", "filters": 6, "kernel": [3, 3], "stride": [2, 2], "padding": {"explicit": [1, 0, 1, 0]}, "bias": false},
    {"type": "Tanh"}, {"type": "AvgPool2d", "kernel": [2, 2]}, {"type": "Flatten"},
    {"type": "Dense", "units": 16}, {"type": "BatchNorm1d"}, {"type": "Sigmoid"},
    {"type": "Dropout", "rate": 0.2}, {"type": "ReLU"}, {"type": "Dense", "units": 10, "bias": false},
    {"type": "Softmax"}]}"#;

fn all_layers() -> ModelSpec {
    ModelSpec::from_json(ALL_LAYERS).unwrap()
}

#[test]
fn the_plan_lists_exactly_the_tensors_and_shapes_a_built_model_has() {
    let mut specs: Vec<ModelSpec> = nn::PRESETS.iter().map(|p| preset(p).unwrap()).collect();
    specs.push(all_layers());
    for spec in specs {
        let plan = spec.plan().unwrap();
        let model = Sequential::new(spec.clone(), 3).unwrap();
        let mut built = Vec::new();
        model.visit_params(|name, p| built.push((name.to_string(), p.value.shape().to_vec())));
        model.visit_buffers(|name, b| built.push((name.to_string(), b.shape().to_vec())));
        let planned: Vec<_> = plan
            .tensors()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(planned, built, "{}", spec.name);
        assert_eq!(plan.counts, model.param_counts(), "{}", spec.name);
        let shapes = model.output_shapes(1);
        for (layer, shape) in plan.layers.iter().zip(&shapes) {
            assert_eq!(layer.output, shape[1..], "{}", spec.name);
        }
        assert_eq!(plan.classes(), 10);
    }
}

/// (spec JSON, what the error must say): each a number that used to panic, abort, wrap around
/// or allocate gigabytes (issue: untrusted files), now refused before any allocation.
const REFUSED_SPECS: &[(&str, &str)] = &[
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":1000000000,"kernel":[3,3]},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "layer 0 (Conv2d)",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[4294967296,3]},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "larger than the padded input",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[3,3],"padding":{"explicit":[9223372036854775808,0,0,0]}},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "layer 0 (Conv2d)",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[3,3],"padding":{"explicit":[18446744073709551615,18446744073709551615,0,0]}},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "overflows",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":32,"kernel":[3,3],"padding":{"explicit":[10000,10000,10000,10000]}},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "values per image",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":10000000},{"type":"Dense","units":10}]}"#,
        "limit of 100000000 parameters",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":9223372036854775808}]}"#,
        "layer 1 (Dense)",
    ),
    (
        r#"{"name":"x","input":[9223372036854775808,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "exceeds the limit",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[4294967296,3],"stride":[18446744073709551615,1],"padding":"same"},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "limit of 100000000 parameters",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"MaxPool2d","kernel":[2,2],"stride":[0,2]},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "at least 1",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"BatchNorm1d","eps":0.0},{"type":"Dense","units":10}]}"#,
        "eps 0 must be a positive number",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"BatchNorm1d","momentum":2.0},{"type":"Dense","units":10}]}"#,
        "momentum 2 must be in [0, 1]",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"LeakyReLU","negative_slope":1e39},{"type":"Dense","units":10}]}"#,
        "negative_slope",
    ),
    (
        r#"{"name":"x","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[3,3]}]}"#,
        "must end in one score per class",
    ),
    (
        r#"{"name":"x","input":[0,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
        "at least 1",
    ),
];

#[test]
fn numbers_that_break_a_limit_are_refused_naming_the_layer_before_anything_is_built() {
    for (json, needle) in REFUSED_SPECS {
        // Some are refused by the parser already (a number beyond u64), the rest by the plan.
        let error = match ModelSpec::from_json(json) {
            Err(e) => e.to_string(),
            Ok(spec) => {
                let planned = spec.plan().unwrap_err().to_string();
                let built = Sequential::new(spec.clone(), 0).unwrap_err().to_string();
                let summarized = summary(&spec, 0).unwrap_err().to_string();
                assert_eq!(planned, built);
                assert_eq!(planned, summarized);
                planned
            }
        };
        assert!(error.contains(needle), "{json}\n  said: {error}");
        assert!(!error.contains('\n'), "one line: {error}");
    }
}

#[test]
fn a_thousand_and_one_layers_are_refused() {
    let layers = vec![serde_json::json!({"type": "ReLU"}); 1000];
    let mut spec = serde_json::json!({"name": "deep", "input": [1, 2, 2], "layers": layers});
    spec["layers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "Flatten"}));
    let spec = ModelSpec::from_json(&spec.to_string()).unwrap();
    let error = spec.plan().unwrap_err().to_string();
    assert!(
        error.contains("1001 layers, more than the limit of 1000"),
        "{error}"
    );
}

#[test]
fn a_large_but_allowed_spec_is_summarized_without_building_it() {
    // 99.4 million parameters: building would allocate 400 MB; a summary allocates nothing of it
    // (the allocation itself is measured in untrusted_spec_allocation.rs).
    let spec = ModelSpec::from_json(
        r#"{"name":"wide","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":125000},{"type":"Dense","units":10}]}"#,
    )
    .unwrap();
    let text = summary(&spec, 0).unwrap();
    assert!(text.contains("Total params: 99,375,010"), "{text}");
    assert_eq!(
        spec.plan().unwrap().counts.trainable,
        784 * 125_000 + 125_000 + 1_250_000 + 10
    );
}

/// A saved model's bytes, and the spec and header split out for editing.
fn saved(spec: ModelSpec, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    save_model(&path, &Sequential::new(spec, 9).unwrap(), &info()).unwrap();
    path
}

/// The header JSON and the data bytes of a safetensors file.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string().into_bytes();
    // safetensors pads the header with spaces to a multiple of 8.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

#[test]
fn a_flipped_tensor_byte_is_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(preset("lenet5").unwrap(), dir.path(), "m.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 100;
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let error = load_model(&path).unwrap_err().to_string();
    assert!(
        error.contains("m.safetensors") && error.contains("the file is corrupt"),
        "{error}"
    );
}

#[test]
fn non_finite_weights_are_refused_when_saving_and_when_loading() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Sequential::new(preset("lenet5").unwrap(), 1).unwrap();
    model
        .visit_params_mut(|name, p| {
            if name == "3.weight" {
                p.value[[0, 0, 0, 0]] = f32::NAN;
            }
            Ok(())
        })
        .unwrap();
    let path = dir.path().join("nan.safetensors");
    let error = save_model(&path, &model, &info()).unwrap_err().to_string();
    assert!(error.contains("tensor 3.weight holds a NaN"), "{error}");
    assert!(!path.exists());

    // The same written by hand (a version 1 file, which has no hash to stop it first).
    let good = saved(preset("lenet5").unwrap(), dir.path(), "good.safetensors");
    let (mut header, mut data) = split(&std::fs::read(&good).unwrap());
    header["__metadata__"]["format_version"] = "1".into();
    let start = header["0.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    data[start..start + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&path, join(&header, &data)).unwrap();
    let error = load_model(&path).unwrap_err().to_string();
    assert!(
        error.contains("tensor 0.weight holds a NaN or infinite value"),
        "{error}"
    );
}

#[test]
fn a_normalization_that_is_not_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = Sequential::new(preset("lenet5").unwrap(), 1).unwrap();
    for (mean, std) in [
        (0.1, 0.0),
        (0.1, -1.0),
        (f32::NAN, 0.3),
        (0.1, f32::INFINITY),
    ] {
        let bad = ModelInfo {
            normalization: Some(InputNormalization { mean, std }),
            training: Value::Null,
        };
        let error = save_model(&dir.path().join("n.safetensors"), &model, &bad)
            .unwrap_err()
            .to_string();
        assert!(error.contains("invalid normalization"), "{error}");
    }
    let good = saved(preset("lenet5").unwrap(), dir.path(), "good.safetensors");
    let (mut header, data) = split(&std::fs::read(&good).unwrap());
    header["__metadata__"]["normalization"] = r#"{"mean":0.1,"std":0.0}"#.into();
    let path = dir.path().join("std0.safetensors");
    std::fs::write(&path, join(&header, &data)).unwrap();
    let error = load_model(&path).unwrap_err().to_string();
    assert!(
        error.contains("std0.safetensors") && error.contains("std above 0"),
        "{error}"
    );
}

#[test]
fn files_of_version_1_written_before_the_hash_still_load_with_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = all_layers();
    let path = saved(spec.clone(), dir.path(), "v2.safetensors");
    let (mut header, data) = split(&std::fs::read(&path).unwrap());
    let metadata = header["__metadata__"].as_object_mut().unwrap();
    metadata.remove("tensors_sha256");
    metadata.insert("format_version".into(), "1".into());
    let old = dir.path().join("v1.safetensors");
    std::fs::write(&old, join(&header, &data)).unwrap();
    let (mut new_model, _) = load_model(&path).unwrap();
    let (mut old_model, old_info) = load_model(&old).unwrap();
    assert_eq!(old_info, info());
    assert_eq!(
        old_model.forward(images(), Mode::Eval).unwrap(),
        new_model.forward(images(), Mode::Eval).unwrap()
    );
    // A version 2 file without its hash is not mistaken for an old one.
    header["__metadata__"]["format_version"] = "2".into();
    std::fs::write(&old, join(&header, &data)).unwrap();
    let error = load_model(&old).unwrap_err().to_string();
    assert!(error.contains("has no tensors_sha256"), "{error}");
}

#[test]
fn a_spec_whose_tensors_do_not_match_is_refused_before_it_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(preset("two-conv").unwrap(), dir.path(), "m.safetensors");
    let (mut header, data) = split(&std::fs::read(&path).unwrap());
    let mut spec: Value =
        serde_json::from_str(header["__metadata__"]["spec"].as_str().unwrap()).unwrap();
    // Issue: 2,000,000 units cost 3.8 GB and 13 s before the right error (now the parameter
    // limit refuses that many); 60,000 units are within the limits, and still built nothing.
    spec["layers"][7]["units"] = 60_000.into();
    header["__metadata__"]["spec"] = spec.to_string().into();
    std::fs::write(&path, join(&header, &data)).unwrap();
    let error = load_model(&path).unwrap_err().to_string();
    assert!(
        error.contains("tensor 7.weight has shape [128, 1600], the model expects [60000, 1600]"),
        "{error}"
    );
}

/// Numbers a hostile editor puts into JSON fields.
const HOSTILE_NUMBERS: [f64; 10] = [
    0.0,
    -1.0,
    1e9,
    4294967296.0,
    9.223372036854776e18,
    1.8446744073709552e19,
    1e300,
    0.5,
    3.0,
    65536.0,
];

/// Replaces the `target`-th number (in document order) inside `value` with `with`; returns how
/// many numbers it passed.
fn replace_number(value: &mut Value, target: usize, with: &Value, seen: &mut usize) {
    match value {
        Value::Number(_) => {
            if *seen == target {
                *value = with.clone();
            }
            *seen += 1;
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| replace_number(v, target, with, seen)),
        Value::Object(map) => map
            .values_mut()
            .for_each(|v| replace_number(v, target, with, seen)),
        _ => {}
    }
}

/// Loads `bytes` as a model file: it must load or be refused with one line naming the file.
fn must_load_or_refuse(dir: &Path, bytes: &[u8]) {
    let path = dir.join("mutant.safetensors");
    std::fs::write(&path, bytes).unwrap();
    if let Err(error) = load_model(&path) {
        let error = error.to_string();
        assert!(error.contains("mutant.safetensors"), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }
}

fn lenet_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::read(saved(
            preset("lenet5").unwrap(),
            dir.path(),
            "m.safetensors",
        ))
        .unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_bytes_load_or_are_refused(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = lenet_bytes().to_vec();
        // Flip bytes, most often in the header where the structure is.
        let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (i, (at, bits)) in flips.iter().enumerate() {
            let span = if i % 2 == 0 { header_len } else { bytes.len() };
            let at = at.index(span);
            bytes[at] ^= bits | 1;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        must_load_or_refuse(dir.path(), &bytes);
    }

    #[test]
    fn hostile_numbers_in_the_spec_or_the_header_load_or_are_refused(which in 0usize..200, number in prop::sample::select(HOSTILE_NUMBERS.to_vec()), in_spec in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let (mut header, data) = split(lenet_bytes());
        let with = serde_json::Number::from_f64(number)
            .map(|n| if number.fract() == 0.0 && (0.0..1.9e19).contains(&number) { Value::from(number as u64) } else { Value::Number(n) })
            .unwrap();
        if in_spec {
            let mut spec: Value = serde_json::from_str(header["__metadata__"]["spec"].as_str().unwrap()).unwrap();
            replace_number(&mut spec, which, &with, &mut 0);
            header["__metadata__"]["spec"] = spec.to_string().into();
        } else {
            // Shapes and data offsets of the tensors.
            replace_number(&mut header, which, &with, &mut 0);
        }
        must_load_or_refuse(dir.path(), &join(&header, &data));
    }
}

/// A lenet5 checkpoint after one Adam step, so it holds optimizer state.
fn checkpoint_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        let (model, mut optimizer) = fresh_training();
        let mut model = model;
        model.zero_grad();
        let logits = model.forward(images(), Mode::Train).unwrap();
        let labels = ndarray::Array1::<u8>::from_elem(3, 4);
        let loss =
            nn::softmax_cross_entropy(logits.view(), nn::Targets::Classes(labels.view()), 0.0)
                .unwrap();
        model.backward(loss.grad).unwrap();
        optimizer.step(&mut model).unwrap();
        nn::save_checkpoint(&path, &model, &optimizer, &info(), "{\"epochs_done\":1}").unwrap();
        std::fs::read(&path).unwrap()
    })
}

fn fresh_training() -> (Sequential, nn::Optimizer) {
    (
        Sequential::new(preset("lenet5").unwrap(), 2).unwrap(),
        nn::Optimizer::new(nn::Rule::adam(), 1e-3).unwrap(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn mutated_checkpoints_restore_or_are_refused_leaving_the_model_unchanged(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = checkpoint_bytes().to_vec();
        let header_len = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (i, (at, bits)) in flips.iter().enumerate() {
            let span = if i % 2 == 0 { header_len } else { bytes.len() };
            bytes[at.index(span)] ^= bits | 1;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let path = dir.path().join("mutant.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let (mut model, mut optimizer) = fresh_training();
        let before = model.forward(images(), Mode::Eval).unwrap();
        if let Err(error) = nn::load_checkpoint(&path, &mut model, &mut optimizer) {
            let error = error.to_string();
            prop_assert!(error.contains("mutant.safetensors") && !error.contains('\n'), "{}", error);
            prop_assert_eq!(model.forward(images(), Mode::Eval).unwrap(), before);
        }
    }
}
