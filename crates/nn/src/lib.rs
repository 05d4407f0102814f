//! Neural networks with hand-written backpropagation: layers, losses, optimizers, schedules,
//! architectures as data, summaries and model files, on the `tensor` crate's kernels.
//!
//! ```
//! use nn::{Mode, Optimizer, Rule, Sequential, Targets, preset, softmax_cross_entropy};
//! use ndarray::{Array1, Array4};
//!
//! let mut model = Sequential::new(preset("lenet5").unwrap(), 42)?;
//! let mut optimizer = Optimizer::new(Rule::adam(), 1e-3)?;
//! let images = Array4::<f32>::zeros((8, 1, 28, 28));
//! let labels = Array1::<u8>::from_elem(8, 3);
//! model.zero_grad();
//! let logits = model.forward(images, Mode::Train)?;
//! let loss = softmax_cross_entropy(logits.view(), Targets::Classes(labels.view()), 0.0)?;
//! model.backward(loss.grad)?;
//! optimizer.step(&mut model)?;
//! # Ok::<(), nn::NnError>(())
//! ```
//!
//! Architecture invariant: `nn` knows nothing about files of images or the command line; it
//! takes arrays and gives arrays.

mod build;
mod error;
mod init;
mod layer;
pub mod layers;
mod loss;
mod model;
mod model_file;
mod optim;
mod param;
mod plan;
mod profile;
mod schedule;
mod spec;
mod summary;

pub use error::NnError;
pub use init::{Init, epoch_layer_rng, fans, initialize, layer_rng};
pub use layer::{Fusion, Layer, Mode, PoolWindow};
pub use loss::{
    EPSILON, LossOutput, Targets, accuracy, categorical_cross_entropy, correct, predictions,
    softmax_cross_entropy,
};
pub use model::{ParamCounts, Sequential};
pub use model_file::{
    CHECKPOINT_FORMAT, FORMAT, FORMAT_VERSION, InputNormalization, MAX_FILE_BYTES, ModelInfo,
    load_checkpoint, load_model, load_weights, save_checkpoint, save_model, write_atomically,
};
pub use optim::{Optimizer, OptimizerState, Rule};
pub use param::Param;
pub use plan::{
    FlopCount, LayerPlan, MAX_ACTIVATIONS_PER_IMAGE, MAX_INPUT_CHANNELS, MAX_INPUT_SIDE,
    MAX_LAYERS, MAX_PARAMETERS, ModelPlan, TensorPlan,
};
pub use profile::LayerTimes;
pub use schedule::{ReduceOnPlateau, Schedule};
pub use spec::{LayerSpec, ModelSpec, PRESETS, PaddingSpec, preset};
pub use summary::{detailed_summary, group_digits, human_bytes, summary};
