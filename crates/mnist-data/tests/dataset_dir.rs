//! Loading directories in MNIST's layout: spellings, every consistency error, and the real data.

use std::path::Path;

use mnist_data::testing::real_data_or_skip;
use mnist_data::{
    BatchOrder, Batches, DataError, Encoding, IdxArray, LoadOptions, Normalization, Split,
    ValidationSplit, load_dir, load_split, one_hot, write_idx_file,
};
use ndarray::{ArrayD, IxDyn};

fn u8_array(shape: &[usize], fill: impl Fn(usize) -> u8) -> IdxArray {
    let len = shape.iter().product();
    IdxArray::U8(
        ArrayD::from_shape_vec(IxDyn(shape), (0..len).map(fill).collect())
            .expect("shape matches length"),
    )
}

/// Writes a tiny dataset of `n` 28x28 images (label i % 10) per split under MNIST's names.
fn write_split(dir: &Path, prefix: &str, n: usize, encoding: Encoding) {
    let suffix = if encoding == Encoding::Gzip {
        ".gz"
    } else {
        ""
    };
    write_idx_file(
        &dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
        &u8_array(&[n, 28, 28], |i| (i % 256) as u8),
        encoding,
    )
    .expect("write test images");
    write_idx_file(
        &dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
        &u8_array(&[n], |i| (i % 10) as u8),
        encoding,
    )
    .expect("write test labels");
}

#[test]
fn loads_gz_and_raw_files_and_the_dotted_spelling() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 12, Encoding::Gzip);
    write_split(dir.path(), "t10k", 5, Encoding::Raw);
    let data = load_dir(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (12, 5));
    assert_eq!(data.train.labels()[11], 1);

    // train-images.idx3-ubyte, as some archives spell it.
    for kind in ["images-idx3", "labels-idx1"] {
        let (stem, format) = kind.split_once('-').unwrap();
        std::fs::rename(
            dir.path().join(format!("t10k-{kind}-ubyte")),
            dir.path().join(format!("t10k-{stem}.{format}-ubyte")),
        )
        .unwrap();
    }
    assert_eq!(
        load_split(dir.path(), Split::Test, &LoadOptions::default())
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn any_image_size_and_class_count_load_when_options_allow() {
    let dir = tempfile::tempdir().unwrap();
    write_idx_file(
        &dir.path().join("train-images-idx3-ubyte"),
        &u8_array(&[3, 5, 7], |i| i as u8),
        Encoding::Raw,
    )
    .unwrap();
    write_idx_file(
        &dir.path().join("train-labels-idx1-ubyte"),
        &u8_array(&[3], |i| 20 + i as u8),
        Encoding::Raw,
    )
    .unwrap();
    let options = LoadOptions {
        classes: 26,
        image_size: None,
    };
    let train = load_split(dir.path(), Split::Train, &options).unwrap();
    assert_eq!((train.rows(), train.cols()), (5, 7));
}

#[test]
fn a_missing_file_names_the_directory_and_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 3, Encoding::Raw);
    let err = load_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            DataError::MissingFile {
                wanted: "test images",
                ..
            }
        ),
        "{message}"
    );
    assert!(message.contains("t10k-images-idx3-ubyte.gz"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn image_and_label_counts_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 4, Encoding::Raw);
    write_idx_file(
        &dir.path().join("train-labels-idx1-ubyte"),
        &u8_array(&[3], |_| 0),
        Encoding::Raw,
    )
    .unwrap();
    let err = load_split(dir.path(), Split::Train, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::CountMismatch {
                images: 4,
                labels: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("train-labels-idx1-ubyte"), "{err}");
}

#[test]
fn labels_outside_the_classes_are_rejected_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 4, Encoding::Raw);
    write_idx_file(
        &dir.path().join("train-labels-idx1-ubyte"),
        &u8_array(&[4], |i| if i == 2 { 10 } else { 1 }),
        Encoding::Raw,
    )
    .unwrap();
    let err = load_split(dir.path(), Split::Train, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::LabelOutOfRange {
                index: 2,
                label: 10,
                classes: 10,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn images_of_the_wrong_size_type_or_rank_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 2, Encoding::Raw);
    let images = dir.path().join("train-images-idx3-ubyte");
    let load = || load_split(dir.path(), Split::Train, &LoadOptions::default()).unwrap_err();

    write_idx_file(&images, &u8_array(&[2, 32, 32], |_| 0), Encoding::Raw).unwrap();
    let err = load();
    assert!(
        matches!(
            err,
            DataError::ImageSize {
                rows: 32,
                cols: 32,
                expected_rows: 28,
                ..
            }
        ),
        "{err}"
    );

    write_idx_file(
        &images,
        &IdxArray::F32(ArrayD::zeros(IxDyn(&[2, 28, 28]))),
        Encoding::Raw,
    )
    .unwrap();
    let err = load();
    assert!(
        err.to_string().contains("holds f32 elements, expected u8"),
        "{err}"
    );

    write_idx_file(&images, &u8_array(&[2, 784], |_| 0), Encoding::Raw).unwrap();
    let err = load();
    assert!(err.to_string().contains("expected 3 dimensions"), "{err}");
}

#[test]
fn a_corrupt_gz_in_the_directory_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_split(dir.path(), "train", 50, Encoding::Gzip);
    let path = dir.path().join("train-images-idx3-ubyte.gz");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 0x55; // inside the CRC-32 trailer
    std::fs::write(&path, bytes).unwrap();
    let err = load_split(dir.path(), Split::Train, &LoadOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("train-images-idx3-ubyte.gz") && message.contains("corrupt gzip"),
        "{message}"
    );
}

/// The real MNIST, when fetched: sizes, the test set's label histogram, and the pixel statistics
/// every tutorial quotes (mean 0.1307, std 0.3081 after scaling to [0, 1]).
#[test]
fn real_mnist_has_its_published_shape_and_statistics() {
    let Some(dir) = real_data_or_skip("real_mnist_has_its_published_shape_and_statistics") else {
        return;
    };
    let data = load_dir(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(data.train.images().dim(), (60_000, 28, 28));
    assert_eq!(data.test.images().dim(), (10_000, 28, 28));
    assert_eq!(
        data.test.label_histogram(10),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(data.train.label_histogram(10).iter().sum::<usize>(), 60_000);

    let norm = Normalization::fit(&data.train);
    assert!((norm.mean - 0.1307).abs() < 5e-5, "mean {}", norm.mean);
    assert!((norm.std - 0.3081).abs() < 5e-5, "std {}", norm.std);

    // Keras' validation_split=0.1 and a first shuffled, standardized batch.
    let (train, validation) = data
        .train
        .split(ValidationSplit::Last { fraction: 0.1 })
        .unwrap();
    assert_eq!((train.len(), validation.len()), (54_000, 6_000));
    let batch = Batches::new(
        &train,
        64,
        BatchOrder::Shuffled { seed: 0, epoch: 0 },
        &norm,
    )
    .unwrap()
    .next()
    .unwrap();
    assert_eq!(batch.images.dim(), (64, 1, 28, 28));
    let targets = one_hot(batch.labels.view(), 10).unwrap();
    assert_eq!(targets.sum(), 64.0);
}
