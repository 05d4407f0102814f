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
use sha2::{Digest, Sha256};

use crate::error::NnError;
use crate::model::Sequential;
use crate::optim::{Optimizer, OptimizerState};
use crate::spec::ModelSpec;

/// The `format` metadata value that marks this project's model files.
pub const FORMAT: &str = "mnist-cnn.model";
/// The format version this build writes. Version 2 added `tensors_sha256`; version 1 files
/// (written before it) still load, with every other check and without that one.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format version this build reads.
const OLDEST_READABLE_VERSION: u32 = 1;

/// A model or checkpoint file is at most this large: the largest model the limits allow with an
/// optimizer's two moment tensors, plus the largest header safetensors reads. The size is
/// checked before the file is read.
pub const MAX_FILE_BYTES: u64 = 3 * 4 * crate::plan::MAX_PARAMETERS as u64 + (100 << 20);

/// The metadata key of the hash that guards the tensors against corruption.
const INTEGRITY_KEY: &str = "tensors_sha256";

/// How raw pixels in [0, 1] become model inputs: `(x - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputNormalization {
    /// Subtracted.
    pub mean: f32,
    /// Divided by.
    pub std: f32,
}

impl InputNormalization {
    /// The normalization, or why it cannot be one: both finite, `std` above 0.
    pub fn checked(self) -> Result<InputNormalization, String> {
        if self.mean.is_finite() && self.std.is_finite() && self.std > 0.0 {
            Ok(self)
        } else {
            Err(format!(
                "invalid normalization (mean {}, std {}): both must be finite and std above 0",
                self.mean, self.std
            ))
        }
    }
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
    let at = problem_in(path);
    let opened = Opened::read(path, CHECKPOINT_FORMAT)?;
    let value = |key: &str| {
        opened
            .metadata
            .get(key)
            .ok_or_else(|| at(format!("the checkpoint has no {key}")))
    };
    let loop_state = value("loop_state")?.clone();
    let step: u64 = value("optimizer_step")?
        .parse()
        .map_err(|e| at(format!("optimizer_step: {e}")))?;
    let learning_rate: f32 = value("optimizer_learning_rate")?
        .parse()
        .map_err(|e| at(format!("optimizer_learning_rate: {e}")))?;
    let file = opened.tensors()?;
    let mut expected = model_tensors(model);
    let optimizer_names: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| n.starts_with(OPTIMIZER_PREFIX))
        .map(str::to_string)
        .collect();
    for name in &optimizer_names {
        // The optimizer checks their shapes against the parameters below.
        let view = file.tensor(name).map_err(|e| at(e.to_string()))?;
        expected.push((name.clone(), view.shape().to_vec()));
    }
    let mut tensors = read_tensors(path, &file, &expected)?;
    let optimizer_tensors = optimizer_names
        .iter()
        .filter_map(|name| {
            let slot = name.strip_prefix(OPTIMIZER_PREFIX)?;
            Some((slot.to_string(), tensors.remove(name)?))
        })
        .collect();
    // Check the optimizer state on a copy first, so that a failure changes nothing.
    let mut restored = optimizer.clone();
    restored
        .load_state(
            OptimizerState {
                step,
                learning_rate,
                tensors: optimizer_tensors,
            },
            model,
        )
        .map_err(|e| at(e.to_string()))?;
    move_into(model, tensors)?;
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
    let at = problem_in(path);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    model.visit_params(|name, p| tensors.push(encode(name, &p.value)));
    model.visit_buffers(|name, b| tensors.push(encode(name, b)));
    // A diverged model is refused here rather than saved for someone to load later.
    let mut non_finite = None;
    model.visit_params(|name, p| {
        if non_finite.is_none() && p.value.iter().any(|v| !v.is_finite()) {
            non_finite = Some(name.to_string());
        }
    });
    if let Some(name) = non_finite {
        return Err(at(format!(
            "not written: tensor {name} holds a NaN or infinite value (training diverged)"
        )));
    }
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
        n.checked().map_err(|e| at(format!("not written: {e}")))?;
        metadata.insert(
            "normalization".to_string(),
            serde_json::to_string(n).map_err(|e| at(e.to_string()))?,
        );
    }
    metadata.insert("training".to_string(), info.training.to_string());
    metadata.insert(
        INTEGRITY_KEY.to_string(),
        integrity_hash(tensors.iter().map(|(name, dtype, shape, data)| {
            (name.as_str(), *dtype, shape.as_slice(), data.as_slice())
        })),
    );
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

/// Rebuilds a whole model from a file alone. Everything is checked before anything sized by
/// the file is allocated: the spec against the limits ([`ModelSpec::plan`]), then every stored
/// tensor's name, dtype and shape against the plan, then the tensors' hash; the weights are
/// then read straight into the layers, never initialized first.
pub fn load_model(path: &Path) -> Result<(Sequential, ModelInfo), NnError> {
    let at = problem_in(path);
    let opened = Opened::read(path, FORMAT)?;
    let spec_json = opened
        .metadata
        .get("spec")
        .ok_or_else(|| at("the metadata has no architecture spec".into()))?;
    let spec = ModelSpec::from_json(spec_json).map_err(|e| at(e.to_string()))?;
    let plan = spec.plan().map_err(|e| at(e.to_string()))?;
    let normalization = match opened.metadata.get("normalization") {
        Some(json) => Some(
            serde_json::from_str::<InputNormalization>(json)
                .map_err(|e| at(format!("invalid normalization: {e}")))?
                .checked()
                .map_err(&at)?,
        ),
        None => None,
    };
    let training = match opened.metadata.get("training") {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| at(format!("invalid training facts: {e}")))?
        }
        None => serde_json::Value::Null,
    };
    let file = opened.tensors()?;
    let expected: Vec<(String, Vec<usize>)> = plan
        .tensors()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let tensors = read_tensors(path, &file, &expected)?;
    let model = Sequential::with_tensors(spec, tensors).map_err(|e| at(e.to_string()))?;
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
    let opened = Opened::read(path, FORMAT)?;
    let file = opened.tensors()?;
    let tensors = read_tensors(path, &file, &model_tensors(model))?;
    move_into(model, tensors)
}

/// An error about the file at `path`.
fn problem_in(path: &Path) -> impl Fn(String) -> NnError + '_ {
    |problem| NnError::ModelFile {
        path: path.to_path_buf(),
        problem,
    }
}

/// A file of this project's format, read whole, its header parsed and its format checked.
struct Opened<'p> {
    path: &'p Path,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
    version: u32,
}

impl<'p> Opened<'p> {
    /// Reads `path` (refusing a file over [`MAX_FILE_BYTES`] before reading it) and checks
    /// that it is a file of `format` in a version this build reads.
    fn read(path: &'p Path, format: &str) -> Result<Opened<'p>, NnError> {
        let at = problem_in(path);
        let size = fs::metadata(path)
            .map_err(|e| at(format!("cannot read: {e}")))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(at(format!(
                "{size} bytes, more than the {MAX_FILE_BYTES} a model file of the largest \
                 model allowed can hold"
            )));
        }
        let bytes = fs::read(path).map_err(|e| at(format!("cannot read: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| at(format!("not a safetensors model file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
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
        let version = match version.parse::<u32>() {
            Ok(v) if (OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&v) => v,
            Ok(v) if v > FORMAT_VERSION => {
                return Err(at(format!(
                    "model format version {v} is newer than this program reads (versions \
                     {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); upgrade the program"
                )));
            }
            _ => {
                return Err(at(format!(
                    "model format version {version} is not supported (this program reads \
                     versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}); re-train or convert \
                     the model"
                )));
            }
        };
        Ok(Opened {
            path,
            bytes,
            metadata,
            version,
        })
    }

    /// The tensors, their layout validated by safetensors and, from version 2 on, their bytes
    /// checked against the hash written with them.
    fn tensors(&self) -> Result<SafeTensors<'_>, NnError> {
        let at = problem_in(self.path);
        let file = SafeTensors::deserialize(&self.bytes)
            .map_err(|e| at(format!("not a safetensors model file ({e})")))?;
        if self.version >= 2 {
            let stored = self
                .metadata
                .get(INTEGRITY_KEY)
                .ok_or_else(|| at(format!("the metadata has no {INTEGRITY_KEY}")))?;
            let actual = integrity_hash(
                file.tensors()
                    .iter()
                    .map(|(name, view)| (name.as_str(), view.dtype(), view.shape(), view.data())),
            );
            if *stored != actual {
                return Err(at(
                    "the file is corrupt: its tensors do not match the hash written with them \
                     (tensors_sha256)"
                        .into(),
                ));
            }
        }
        Ok(file)
    }
}

/// SHA-256 over every tensor's name, dtype, shape and bytes, in name order (so independent of
/// where the serializer placed them), as lowercase hex.
fn integrity_hash<'a>(
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, dtype, shape, data) in sorted {
        // Each field prefixed by its length, so no two lists of tensors hash the same bytes.
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        let dtype = format!("{dtype:?}");
        hasher.update((dtype.len() as u64).to_le_bytes());
        hasher.update(dtype.as_bytes());
        hasher.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            hasher.update((d as u64).to_le_bytes());
        }
        hasher.update((data.len() as u64).to_le_bytes());
        hasher.update(data);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name and shape of every tensor `model` stores, in its visitors' order.
fn model_tensors(model: &Sequential) -> Vec<(String, Vec<usize>)> {
    let mut expected = Vec::new();
    model.visit_params(|name, p| expected.push((name.to_string(), p.value.shape().to_vec())));
    model.visit_buffers(|name, b| expected.push((name.to_string(), b.shape().to_vec())));
    expected
}

/// Decodes exactly the `expected` tensors after checking, from the header alone, that each is
/// present with its shape and a dtype it can have, and that the file holds no other tensor
/// (optimizer state aside). Values must be finite.
fn read_tensors(
    path: &Path,
    file: &SafeTensors<'_>,
    expected: &[(String, Vec<usize>)],
) -> Result<HashMap<String, ArrayD<f32>>, NnError> {
    let at = problem_in(path);
    for (name, shape) in expected {
        let view = file
            .tensor(name)
            .map_err(|_| at(format!("tensor {name} is missing")))?;
        if view.shape() != shape.as_slice() {
            return Err(at(format!(
                "tensor {name} has shape {:?}, the model expects {shape:?}",
                view.shape()
            )));
        }
        expected_dtype(name, view.dtype()).map_err(&at)?;
    }
    let wanted: std::collections::HashSet<&str> =
        expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&str> = file
        .names()
        .into_iter()
        .filter(|n| !wanted.contains(n) && !n.starts_with(OPTIMIZER_PREFIX))
        .collect();
    extra.sort();
    if let Some(extra) = extra.first() {
        return Err(at(format!("tensor {extra} is not part of the model")));
    }
    let mut tensors = HashMap::with_capacity(expected.len());
    for (name, _) in expected {
        let view = file.tensor(name).map_err(|e| at(e.to_string()))?;
        let value = decode(name, &view).map_err(&at)?;
        if value.iter().any(|v| !v.is_finite()) {
            return Err(at(format!("tensor {name} holds a NaN or infinite value")));
        }
        tensors.insert(name.clone(), value);
    }
    Ok(tensors)
}

/// Moves checked tensors into the model's parameters and state.
fn move_into(
    model: &mut Sequential,
    mut tensors: HashMap<String, ArrayD<f32>>,
) -> Result<(), NnError> {
    let mut take = |name: &str, target: &mut ArrayD<f32>| {
        if let Some(value) = tensors.remove(name) {
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

/// Whether tensor `name` may be stored as `dtype`: BatchNorm's counter is I64, the rest F32.
fn expected_dtype(name: &str, dtype: Dtype) -> Result<(), String> {
    let want = if name.ends_with(COUNTER_SUFFIX) {
        Dtype::I64
    } else {
        Dtype::F32
    };
    if dtype == want {
        Ok(())
    } else {
        Err(format!("tensor {name} is {dtype:?}, expected {want:?}"))
    }
}

fn decode(name: &str, view: &TensorView<'_>) -> Result<ArrayD<f32>, String> {
    expected_dtype(name, view.dtype())?;
    let values: Vec<f32> = match view.dtype() {
        Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
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
