//! A small synthetic dataset in MNIST's layout, shared by the tests.

use std::path::Path;

use mnist_data::{Encoding, IdxArray, write_idx_file};
use ndarray::{ArrayD, IxDyn};

/// `n` images per split where class k is a bright vertical bar at columns 2k+4..2k+6, with a
/// little pseudo-random noise: learnable in one epoch.
pub fn synthetic_dataset(dir: &Path, train: usize, test: usize) {
    for (prefix, n, salt) in [("train", train, 1usize), ("t10k", test, 7)] {
        let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + salt) % 10) as u8).collect();
        let pixels: Vec<u8> = (0..n * 784)
            .map(|j| {
                let (i, p) = (j / 784, j % 784);
                let (row, col) = (p / 28, p % 28);
                let k = usize::from(labels[i]);
                let bar = (2 * k + 4..2 * k + 6).contains(&col) && (4..24).contains(&row);
                let noise = ((j * 2654435761) >> 7) % 40;
                if bar { 200 + noise as u8 } else { noise as u8 }
            })
            .collect();
        let images = IdxArray::U8(ArrayD::from_shape_vec(IxDyn(&[n, 28, 28]), pixels).unwrap());
        let labels = IdxArray::U8(ArrayD::from_shape_vec(IxDyn(&[n]), labels).unwrap());
        write_idx_file(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &images,
            Encoding::Gzip,
        )
        .unwrap();
        write_idx_file(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &labels,
            Encoding::Gzip,
        )
        .unwrap();
    }
}
