//! Trained models as ONNX files: the graph takes `input`, float32 pixels in 0..1 of shape
//! `[N, C, H, W]` (N symbolic), applies the model's input normalization, runs every layer, and
//! gives `logits` and `probabilities`. Opset [`OPSET`], IR version [`IR_VERSION`]; the layer
//! mapping is in docs/model-format.md. Protobuf encoding is prost's.
//!
//! ```no_run
//! let (model, info) = nn::load_model(std::path::Path::new("final.safetensors"))?;
//! onnx_export::write_onnx(std::path::Path::new("model.onnx"), &model, &info)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Architecture invariant: the exporter reads a `Sequential` and its spec and writes bytes; it
//! runs nothing. Whether the graph computes what the model computes is checked against
//! onnxruntime in this crate's tests.

mod error;
mod graph;
mod proto;

use std::path::Path;

use nn::{ModelInfo, Sequential};
use prost::Message;

pub use error::ExportError;
pub use graph::{INPUT, LOGITS, PROBABILITIES};

/// The ONNX operator set the graph uses (every operator here has this version's semantics).
pub const OPSET: i64 = 13;
/// The ONNX IR version of the file: 7, the IR of the ONNX release that introduced opset 13.
pub const IR_VERSION: i64 = 7;
/// The `producer_name` written into every file.
pub const PRODUCER: &str = "mnist-cnn";

/// The ONNX file of `model`, whose normalization and training facts `info` holds.
pub fn export_onnx(model: &Sequential, info: &ModelInfo) -> Result<Vec<u8>, ExportError> {
    let normalization = info.normalization.ok_or(ExportError::NoNormalization)?;
    let graph = graph::graph(model, normalization)?;
    let metadata = [
        (
            "spec",
            serde_json::to_string(model.spec()).unwrap_or_default(),
        ),
        (
            "normalization",
            serde_json::to_string(&normalization).unwrap_or_default(),
        ),
        ("training", training_summary(&info.training)),
    ];
    let file = proto::ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some(PRODUCER.to_string()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        domain: None,
        model_version: Some(1),
        doc_string: Some(format!(
            "{}; input: float32 pixels in 0..1, [N, C, H, W]; outputs: logits, probabilities",
            model.spec()
        )),
        graph: Some(graph),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| proto::StringStringEntryProto {
                key: Some(key.to_string()),
                value: Some(value),
            })
            .collect(),
    };
    Ok(file.encode_to_vec())
}

/// Writes the ONNX file of `model` to `path` atomically (temporary file, then rename).
pub fn write_onnx(path: &Path, model: &Sequential, info: &ModelInfo) -> Result<(), ExportError> {
    let bytes = export_onnx(model, info)?;
    nn::write_atomically(path, &bytes).map_err(|error| ExportError::Write {
        path: path.to_path_buf(),
        error,
    })
}

/// The training facts worth carrying into the ONNX file: the run's configuration and results,
/// without the per-epoch history.
fn training_summary(training: &serde_json::Value) -> String {
    let mut summary = training.clone();
    if let Some(map) = summary.as_object_mut() {
        map.remove("history");
    }
    summary.to_string()
}
