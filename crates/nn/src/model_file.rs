//! Model files: one `.safetensors` file holding the weights in PyTorch's layout and names, and in
//! its metadata the format name and version, the architecture spec, the input normalization and
//! facts about the training. See docs/model-format.md.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::NnError;
use crate::model::Sequential;
use crate::optim::{Optimizer, OptimizerState};
use crate::spec::ModelSpec;

/// The `format` metadata value that marks this project's model files.
pub const FORMAT: &str = "mnist-cnn.model";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// How raw pixels in [0, 1] become model inputs: `(x - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputNormalization {
    /// Subtracted.
    pub mean: f32,
    /// Divided by.
    pub std: f32,
}

/// Everything a model file holds besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// Normalization of the inputs the model was trained on.
    pub normalization: Option<InputNormalization>,
    /// Free-form facts about the training (epochs, optimizer, accuracy, ...).
    pub training: serde_json::Value,
}

/// The `format` metadata value of a training checkpoint (model, optimizer, loop state).
pub const CHECKPOINT_FORMAT: &str = "mnist-cnn.checkpoint";

/// Optimizer tensors in a checkpoint are named `optimizer.<parameter>.<slot>`.
const OPTIMIZER_PREFIX: &str = "optimizer.";

/// BatchNorm's batch counter, stored as PyTorch stores it: a 0-d int64 tensor.
const COUNTER_SUFFIX: &str = "num_batches_tracked";

/// Writes the model's weights and state, its spec and `info` to `path`, atomically.
pub fn save_model(path: &Path, model: &Sequential, info: &ModelInfo) -> Result<(), NnError> {
    write_tensors(path, FORMAT, model, None, info, None)
}

/// Writes a training checkpoint: the model as [`save_model`] does, the optimizer's state, and
/// `loop_state` (the training loop's own state, as JSON), atomically.
pub fn save_checkpoint(
    path: &Path,
    model: &Sequential,
    optimizer: &Optimizer,
    info: &ModelInfo,
    loop_state: &str,
) -> Result<(), NnError> {
    write_tensors(
        path,
        CHECKPOINT_FORMAT,
        model,
        Some(optimizer),
        info,
        Some(loop_state),
    )
}

/// Restores a checkpoint into `model` and `optimizer` (built as when the checkpoint was taken)
/// and returns the training loop's state; nothing changes unless everything matches.
pub fn load_checkpoint(
    path: &Path,
    model: &mut Sequential,
    optimizer: &mut Optimizer,
) -> Result<String, NnError> {
    let bytes = read(path)?;
    let at = |problem: String| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    };
    let metadata = checked_metadata(path, &bytes, CHECKPOINT_FORMAT)?;
    let number = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| at(format!("the checkpoint has no {key}")))
    };
    let loop_state = number("loop_state")?.clone();
    let step: u64 = number("optimizer_step")?
        .parse()
        .map_err(|e| at(format!("optimizer_step: {e}")))?;
    let learning_rate: f32 = number("optimizer_learning_rate")?
        .parse()
        .map_err(|e| at(format!("optimizer_learning_rate: {e}")))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| at(format!("not a safetensors checkpoint ({e})")))?;
    let mut tensors = Vec::new();
    for name in file.names() {
        if let Some(slot) = name.strip_prefix(OPTIMIZER_PREFIX) {
            let view = file.tensor(name).map_err(|e| at(e.to_string()))?;
            tensors.push((slot.to_string(), decode(name, &view).map_err(at)?));
        }
    }
    // Check the optimizer state on a copy first, so that a failure changes nothing.
    let mut restored = optimizer.clone();
    restored
        .load_state(
            OptimizerState {
                step,
                learning_rate,
                tensors,
            },
            model,
        )
        .map_err(|e| at(e.to_string()))?;
    fill(path, &bytes, model)?;
    *optimizer = restored;
    Ok(loop_state)
}

/// Writes the model's tensors (and an optimizer's) with the metadata of `format`.
fn write_tensors(
    path: &Path,
    format: &str,
    model: &Sequential,
    optimizer: Option<&Optimizer>,
    info: &ModelInfo,
    loop_state: Option<&str>,
) -> Result<(), NnError> {
    let at = |problem: String| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    model.visit_params(|name, p| tensors.push(encode(name, &p.value)));
    model.visit_buffers(|name, b| tensors.push(encode(name, b)));
    let mut metadata = HashMap::new();
    if let Some(optimizer) = optimizer {
        let state = optimizer.state();
        for (name, tensor) in &state.tensors {
            tensors.push(encode(&format!("{OPTIMIZER_PREFIX}{name}"), tensor));
        }
        metadata.insert("optimizer_step".to_string(), state.step.to_string());
        metadata.insert(
            "optimizer_learning_rate".to_string(),
            state.learning_rate.to_string(),
        );
    }
    if let Some(loop_state) = loop_state {
        metadata.insert("loop_state".to_string(), loop_state.to_string());
    }
    metadata.insert("format".to_string(), format.to_string());
    metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    metadata.insert(
        "spec".to_string(),
        serde_json::to_string(model.spec()).map_err(|e| at(e.to_string()))?,
    );
    if let Some(n) = &info.normalization {
        metadata.insert(
            "normalization".to_string(),
            serde_json::to_string(n).map_err(|e| at(e.to_string()))?,
        );
    }
    metadata.insert("training".to_string(), info.training.to_string());
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            Ok((name.as_str(), TensorView::new(*dtype, shape.clone(), data)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| at(e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| at(e.to_string()))?;
    write_atomically(path, &bytes).map_err(|e| at(format!("cannot write: {e}")))
}

/// Rebuilds a whole model from a file alone: its spec from the metadata, then its weights.
pub fn load_model(path: &Path) -> Result<(Sequential, ModelInfo), NnError> {
    let bytes = read(path)?;
    let metadata = checked_metadata(path, &bytes, FORMAT)?;
    let at = |problem: String| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    };
    let spec_json = metadata
        .get("spec")
        .ok_or_else(|| at("the metadata has no architecture spec".into()))?;
    let spec = ModelSpec::from_json(spec_json).map_err(|e| at(e.to_string()))?;
    // The seed does not matter: every weight is overwritten from the file.
    let mut model = Sequential::new(spec, 0).map_err(|e| at(e.to_string()))?;
    fill(path, &bytes, &mut model)?;
    let normalization = match metadata.get("normalization") {
        Some(json) => Some(
            serde_json::from_str(json).map_err(|e| at(format!("invalid normalization: {e}")))?,
        ),
        None => None,
    };
    let training = match metadata.get("training") {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| at(format!("invalid training facts: {e}")))?
        }
        None => serde_json::Value::Null,
    };
    Ok((
        model,
        ModelInfo {
            normalization,
            training,
        },
    ))
}

/// Fills an existing model's weights and state from a file; fails, leaving the model unchanged,
/// on the first missing, extra or mis-shaped tensor, naming it.
pub fn load_weights(path: &Path, model: &mut Sequential) -> Result<(), NnError> {
    let bytes = read(path)?;
    checked_metadata(path, &bytes, FORMAT)?;
    fill(path, &bytes, model)
}

fn read(path: &Path) -> Result<Vec<u8>, NnError> {
    fs::read(path).map_err(|e| NnError::ModelFile {
        path: path.to_path_buf(),
        problem: format!("cannot read: {e}"),
    })
}

/// The metadata of a file of this `format` and version, or why the file is not one.
fn checked_metadata(
    path: &Path,
    bytes: &[u8],
    format: &str,
) -> Result<HashMap<String, String>, NnError> {
    let at = |problem: String| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    };
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| at(format!("not a safetensors model file ({e})")))?;
    let metadata = metadata.metadata().clone().unwrap_or_default();
    match metadata.get("format") {
        Some(f) if f == format => {}
        Some(other) => {
            return Err(at(format!(
                "a safetensors file of format {other:?}, not a file of this project's format {format:?}"
            )));
        }
        None => {
            return Err(at(format!(
                "a safetensors file without this project's metadata (format {format:?}); to load bare weights into a model, build the model and load weights only"
            )));
        }
    }
    let version = metadata
        .get("format_version")
        .map(String::as_str)
        .unwrap_or("missing");
    match version.parse::<u32>() {
        Ok(FORMAT_VERSION) => Ok(metadata),
        Ok(v) if v > FORMAT_VERSION => Err(at(format!(
            "model format version {v} is newer than this program reads (version {FORMAT_VERSION}); upgrade the program"
        ))),
        _ => Err(at(format!(
            "model format version {version} is not supported (this program reads version {FORMAT_VERSION}); re-train or convert the model"
        ))),
    }
}

/// Copies every tensor of the file into the model after checking them all.
fn fill(path: &Path, bytes: &[u8], model: &mut Sequential) -> Result<(), NnError> {
    let at = |problem: String| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    };
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| at(format!("not a safetensors model file ({e})")))?;
    let mut staged: HashMap<String, ArrayD<f32>> = HashMap::new();
    let mut check = |name: &str, expected: &[usize]| -> Result<(), NnError> {
        let view = file
            .tensor(name)
            .map_err(|_| at(format!("tensor {name} is missing")))?;
        if view.shape() != expected {
            return Err(at(format!(
                "tensor {name} has shape {:?}, the model expects {expected:?}",
                view.shape()
            )));
        }
        staged.insert(name.to_string(), decode(name, &view).map_err(at)?);
        Ok(())
    };
    let mut result = Ok(());
    model.visit_params(|name, p| {
        if result.is_ok() {
            result = check(name, p.value.shape());
        }
    });
    model.visit_buffers(|name, b| {
        if result.is_ok() {
            result = check(name, b.shape());
        }
    });
    result?;
    if let Some(extra) = file
        .names()
        .into_iter()
        .find(|n| !staged.contains_key(*n) && !n.starts_with(OPTIMIZER_PREFIX))
    {
        return Err(at(format!(
            "tensor {extra} is not part of the model {}",
            model.spec().name
        )));
    }
    let mut take = |name: &str, target: &mut ArrayD<f32>| {
        if let Some(value) = staged.remove(name) {
            *target = value;
        }
        Ok(())
    };
    model.visit_params_mut(|name, p| take(name, &mut p.value))?;
    model.visit_buffers_mut(|name, b| take(name, b))
}

/// A tensor as (name, dtype, shape, little-endian bytes).
fn encode(name: &str, a: &ArrayD<f32>) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    if name.ends_with(COUNTER_SUFFIX) {
        let bytes = a.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
        return (name.to_string(), Dtype::I64, a.shape().to_vec(), bytes);
    }
    // Logical row-major order, whatever the memory layout.
    let bytes = a.iter().flat_map(|v| v.to_le_bytes()).collect();
    (name.to_string(), Dtype::F32, a.shape().to_vec(), bytes)
}

fn decode(name: &str, view: &TensorView<'_>) -> Result<ArrayD<f32>, String> {
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::I64 if name.ends_with(COUNTER_SUFFIX) => view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => return Err(format!("tensor {name} is {other:?}, expected F32")),
    };
    ArrayD::from_shape_vec(IxDyn(view.shape()), values).map_err(|e| format!("tensor {name}: {e}"))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a crash
/// leaves the old file or none, never a partly written one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut temp = builder.tempfile_in(dir)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
