//! MNIST-style datasets: IDX files (gzip or raw) to normalized NCHW mini-batches.
//!
//! Read any IDX file with [`read_idx_file`], load a directory in MNIST's layout with
//! [`load_dir`], carve off a validation set with [`LabeledImages::split`], fit a
//! [`Normalization`] on the training split, and iterate seeded [`Batches`].
//!
//! ```no_run
//! use mnist_data::{load_dir, BatchOrder, Batches, LoadOptions, Normalization, ValidationSplit};
//!
//! let data = load_dir("data/mnist".as_ref(), &LoadOptions::default())?;
//! let (train, validation) = data.train.split(ValidationSplit::Last { fraction: 0.1 })?;
//! let normalization = Normalization::fit(&train);
//! for batch in Batches::new(&train, 64, BatchOrder::Shuffled { seed: 1, epoch: 0 }, &normalization)? {
//!     assert_eq!(batch.images.shape()[1..], [1, 28, 28]);
//! }
//! # Ok::<(), mnist_data::DataError>(())
//! ```

mod atomic_file;
mod augment;
mod batch;
mod dataset;
mod digit_image;
mod error;
mod idx;
mod images;
mod normalize;
mod one_hot;
mod shuffle;
pub mod testing;

pub use augment::{Augmentation, Elastic};
pub use batch::{Batch, BatchOrder, Batches};
pub use dataset::{Dataset, LoadOptions, MNIST_FILE_NAMES, Split, find_file, load_dir, load_split};
pub use digit_image::{
    MAX_IMAGE_FILE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, decode_digit, flatten_alpha,
    load_digit, to_mnist_form,
};
pub use error::{DataError, IdxError};
pub use idx::{
    ElementType, Encoding, IdxArray, read_idx, read_idx_file, write_idx, write_idx_file,
};
pub use images::{LabeledImages, ValidationSplit};
pub use normalize::Normalization;
pub use one_hot::one_hot;
pub use shuffle::{seeded_rng, shuffle};
