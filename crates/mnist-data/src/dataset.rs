//! Loading a dataset directory in MNIST's layout: train and test images and labels, gz or raw.

use std::path::{Path, PathBuf};

use ndarray::{Array, Array1, Array3, Dimension, Ix1, Ix3};

use crate::error::{DataError, IdxError};
use crate::idx::read_idx_file;
use crate::images::LabeledImages;

/// A dataset's training and test sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The training examples (60,000 for MNIST).
    pub train: LabeledImages,
    /// The test examples (10,000 for MNIST).
    pub test: LabeledImages,
}

/// What a loaded dataset must satisfy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Labels must lie in `0..classes`.
    pub classes: usize,
    /// Images must be this many `(rows, cols)`, when set.
    pub image_size: Option<(usize, usize)>,
}

impl Default for LoadOptions {
    /// MNIST's: 10 classes, 28x28 images.
    fn default() -> Self {
        LoadOptions {
            classes: 10,
            image_size: Some((28, 28)),
        }
    }
}

/// The files of one split, by the file-name prefix MNIST uses for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `train-*`.
    Train,
    /// `t10k-*`.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// The canonical file names of MNIST's four files, without `.gz`, in fetch order.
pub const MNIST_FILE_NAMES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads the training and test sets from `dir`, checking them against `options`.
pub fn load_dir(dir: &Path, options: &LoadOptions) -> Result<Dataset, DataError> {
    // The 47 MB training images dominate: decode them on a second thread meanwhile.
    std::thread::scope(|scope| {
        let train = scope.spawn(|| load_split(dir, Split::Train, options));
        let test = load_split(dir, Split::Test, options);
        let train = train
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok(Dataset {
            train: train?,
            test: test?,
        })
    })
}

/// Loads one split's images and labels from `dir`.
pub fn load_split(
    dir: &Path,
    split: Split,
    options: &LoadOptions,
) -> Result<LabeledImages, DataError> {
    let images_path = find_file(dir, split, "images", "idx3")?;
    let labels_path = find_file(dir, split, "labels", "idx1")?;
    let images = read_images(&images_path, options)?;
    let labels = read_labels(&labels_path, options)?;
    if images.dim().0 != labels.len() {
        return Err(DataError::CountMismatch {
            images_path,
            images: images.dim().0,
            labels_path,
            labels: labels.len(),
        });
    }
    LabeledImages::new(images, labels)
}

/// Finds a split's file under any of the spellings in use: `train-images-idx3-ubyte` (the
/// mirrors') or `train-images.idx3-ubyte` (some archives'), each raw or `.gz`.
pub fn find_file(
    dir: &Path,
    split: Split,
    kind: &'static str,
    format: &str,
) -> Result<PathBuf, DataError> {
    let prefix = split.prefix();
    let candidates: Vec<String> = [
        format!("{prefix}-{kind}-{format}-ubyte"),
        format!("{prefix}-{kind}.{format}-ubyte"),
    ]
    .into_iter()
    .flat_map(|name| [format!("{name}.gz"), name])
    .collect();
    candidates
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| DataError::MissingFile {
            dir: dir.to_path_buf(),
            wanted: match (split, kind) {
                (Split::Train, "images") => "training images",
                (Split::Train, _) => "training labels",
                (Split::Test, "images") => "test images",
                (Split::Test, _) => "test labels",
            },
            candidates,
        })
}

/// The u8 array of an IDX file with the number of dimensions `D` has, whose axes mean `meaning`.
fn read_u8<D: Dimension>(path: &Path, meaning: &'static str) -> Result<Array<u8, D>, DataError> {
    let in_file = |e| DataError::in_file(path, e);
    let array = read_idx_file(path)?.into_u8().map_err(in_file)?;
    let shape = array.shape().to_vec();
    array.into_dimensionality::<D>().map_err(|_| {
        in_file(IdxError::WrongRank {
            expected: D::NDIM.unwrap_or(shape.len()),
            shape,
            meaning,
        })
    })
}

fn read_images(path: &Path, options: &LoadOptions) -> Result<Array3<u8>, DataError> {
    let images = read_u8::<Ix3>(path, "images, rows, columns")?;
    let (_, rows, cols) = images.dim();
    if let Some((expected_rows, expected_cols)) = options.image_size
        && (rows, cols) != (expected_rows, expected_cols)
    {
        return Err(DataError::ImageSize {
            path: path.to_path_buf(),
            rows,
            cols,
            expected_rows,
            expected_cols,
        });
    }
    Ok(images)
}

fn read_labels(path: &Path, options: &LoadOptions) -> Result<Array1<u8>, DataError> {
    let labels = read_u8::<Ix1>(path, "labels")?;
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &label)| usize::from(label) >= options.classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label,
            classes: options.classes,
        });
    }
    Ok(labels)
}
