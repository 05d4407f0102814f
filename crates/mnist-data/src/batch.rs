//! Seeded mini-batches of normalized NCHW f32 images, gathered from byte images on demand.

use ndarray::{Array1, Array2, Array4, Axis};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augment::Augmentation;
use crate::error::DataError;
use crate::images::LabeledImages;
use crate::normalize::Normalization;
use crate::shuffle::{seeded_rng, shuffle};

/// The order in which an epoch visits the examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOrder {
    /// File order, for evaluation.
    Sequential,
    /// A permutation determined by `seed` and `epoch` alone, so any epoch can be replayed.
    Shuffled {
        /// The run's seed.
        seed: u64,
        /// The epoch number; each epoch gets its own permutation.
        epoch: u64,
    },
}

/// One mini-batch: images `[N, 1, H, W]`, normalized, and their labels `[N]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Normalized images, `[N, 1, H, W]`.
    pub images: Array4<f32>,
    /// Class labels, `[N]`.
    pub labels: Array1<u8>,
}

impl Batch {
    /// An empty batch, to be filled by [`Batches::next_into`].
    pub fn empty() -> Batch {
        Batch {
            images: Array4::zeros((0, 1, 0, 0)),
            labels: Array1::zeros(0),
        }
    }

    /// Number of examples in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// One epoch of mini-batches over a [`LabeledImages`]; the last batch may be smaller.
///
/// Only the visiting order (one `usize` per example) is made per epoch: pixels are copied and
/// normalized one batch at a time.
#[derive(Clone, Debug)]
pub struct Batches<'a> {
    data: &'a LabeledImages,
    order: Vec<usize>,
    batch_size: usize,
    table: [f32; 256],
    normalization: Normalization,
    position: usize,
    /// Random transforms and their generator, when augmenting.
    augmentation: Option<(Augmentation, ChaCha8Rng)>,
}

/// Images a task of the parallel lookup normalizes at least: a task's cost outweighs fewer.
const IMAGES_PER_TASK: usize = 16;

/// Keeps augmentation's random stream apart from the shuffle's, which uses the bare seed.
const AUGMENTATION_SEED_SALT: u64 = 0x6175_676d_656e_7421;

impl<'a> Batches<'a> {
    /// Batches of `batch_size` examples in `order`, normalized with `normalization`.
    pub fn new(
        data: &'a LabeledImages,
        batch_size: usize,
        order: BatchOrder,
        normalization: &Normalization,
    ) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::InvalidArgument(
                "batch size must be at least 1".into(),
            ));
        }
        let mut visit: Vec<usize> = (0..data.len()).collect();
        if let BatchOrder::Shuffled { seed, epoch } = order {
            shuffle(&mut visit, &mut seeded_rng(seed, epoch));
        }
        Ok(Batches {
            data,
            order: visit,
            batch_size,
            table: normalization.lookup_table(),
            normalization: *normalization,
            position: 0,
            augmentation: None,
        })
    }

    /// Applies random transforms to every image, drawn from a stream determined by `seed` and
    /// `epoch` alone (so a run and its replay transform identically).
    pub fn augmented(mut self, augmentation: Augmentation, seed: u64, epoch: u64) -> Self {
        let rng = seeded_rng(seed ^ AUGMENTATION_SEED_SALT, epoch);
        self.augmentation = Some((augmentation, rng));
        self
    }

    /// Number of batches in the epoch, the last one possibly partial.
    pub fn batch_count(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// Fills `batch` with the next mini-batch, reusing its buffers when the size allows;
    /// returns false at the end of the epoch.
    pub fn next_into(&mut self, batch: &mut Batch) -> bool {
        let end = (self.position + self.batch_size).min(self.order.len());
        if self.position >= end {
            return false;
        }
        let indices = &self.order[self.position..end];
        self.position = end;

        let (rows, cols) = (self.data.rows(), self.data.cols());
        let shape = (indices.len(), 1, rows, cols);
        if batch.images.dim() != shape {
            batch.images = Array4::zeros(shape);
            batch.labels = Array1::zeros(indices.len());
        }
        let images = self.data.images();
        for (&index, label) in indices.iter().zip(batch.labels.iter_mut()) {
            *label = self.data.labels()[index];
        }
        if self.augmentation.is_none()
            && let (Some(out), Some(source)) = (batch.images.as_slice_mut(), images.as_slice())
        {
            // The lookups in parallel, on flat slices: on one thread, while the other waited,
            // they took 4% of a fast-cnn training step.
            let table = &self.table;
            let pixels = rows * cols;
            out.par_chunks_mut(pixels)
                .zip(indices.par_iter())
                .with_min_len(IMAGES_PER_TASK)
                .for_each(|(out, &index)| {
                    let source = &source[index * pixels..(index + 1) * pixels];
                    for (o, &p) in out.iter_mut().zip(source) {
                        *o = table[usize::from(p)];
                    }
                });
            return true;
        }
        let mut scaled = Array2::<f32>::zeros((rows, cols));
        for (&index, mut out) in indices.iter().zip(batch.images.outer_iter_mut()) {
            let source = images.index_axis(Axis(0), index);
            match &mut self.augmentation {
                None => {
                    for (o, &p) in out.iter_mut().zip(source.iter()) {
                        *o = self.table[usize::from(p)];
                    }
                }
                Some((augmentation, rng)) => {
                    // Transform in [0, 1], then standardize.
                    scaled.zip_mut_with(&source, |s, &p| *s = f32::from(p) / 255.0);
                    let mut plane = out.index_axis_mut(Axis(0), 0);
                    augmentation.apply(scaled.view(), plane.view_mut(), rng);
                    let Normalization { mean, std } = self.normalization;
                    plane.mapv_inplace(|v| (v - mean) / std);
                }
            }
        }
        true
    }
}

impl Iterator for Batches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let mut batch = Batch::empty();
        self.next_into(&mut batch).then_some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn numbered(n: usize) -> LabeledImages {
        // Every pixel of example i is i, so a batch tells which examples it holds.
        let images = Array3::from_shape_fn((n, 2, 2), |(i, _, _)| i as u8);
        let labels = Array1::from_shape_fn(n, |i| (i % 10) as u8);
        LabeledImages::new(images, labels).unwrap()
    }

    fn visited(batches: Batches<'_>) -> Vec<Vec<u8>> {
        batches
            .map(|b| {
                assert!(
                    b.images
                        .outer_iter()
                        .zip(b.labels.iter())
                        .all(|(im, &label)| { im.iter().all(|&p| p.round() as u8 % 10 == label) })
                );
                b.images
                    .outer_iter()
                    .map(|im| im[(0, 0, 0)].round() as u8)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn sequential_batches_cover_every_example_once_with_a_partial_tail() {
        let data = numbered(10);
        let batches = Batches::new(
            &data,
            4,
            BatchOrder::Sequential,
            &Normalization {
                mean: 0.0,
                std: 1.0 / 255.0,
            },
        )
        .unwrap();
        assert_eq!(batches.batch_count(), 3);
        assert_eq!(
            visited(batches),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );
    }

    #[test]
    fn shuffled_batches_are_a_seeded_permutation_per_epoch() {
        let data = numbered(50);
        let norm = Normalization {
            mean: 0.0,
            std: 1.0 / 255.0,
        };
        let epoch = |seed, epoch| {
            visited(Batches::new(&data, 7, BatchOrder::Shuffled { seed, epoch }, &norm).unwrap())
        };
        let first = epoch(1, 0);
        assert_eq!(first, epoch(1, 0));
        assert_ne!(first, epoch(1, 1));
        assert_ne!(first, epoch(2, 0));
        let mut all: Vec<u8> = first.concat();
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<u8>>());
    }

    #[test]
    fn next_into_reuses_and_resizes_the_buffer() {
        let data = numbered(5);
        let mut batches =
            Batches::new(&data, 3, BatchOrder::Sequential, &Normalization::UNIT_SCALE).unwrap();
        let mut batch = Batch::empty();
        assert!(batches.next_into(&mut batch));
        assert_eq!(batch.images.dim(), (3, 1, 2, 2));
        assert!(batches.next_into(&mut batch));
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.images[(1, 0, 1, 1)], 4.0 / 255.0);
        assert!(!batches.next_into(&mut batch));
    }

    #[test]
    fn augmented_batches_are_seeded_and_keep_order_and_labels() {
        let images = Array3::from_shape_fn((6, 28, 28), |(i, r, c)| {
            if (8..20).contains(&r) && c == 10 + i {
                255
            } else {
                0
            }
        });
        let data = LabeledImages::new(images, Array1::from_shape_fn(6, |i| i as u8)).unwrap();
        let order = BatchOrder::Shuffled { seed: 3, epoch: 1 };
        let norm = Normalization::UNIT_SCALE;
        let plain: Vec<Batch> = Batches::new(&data, 4, order, &norm).unwrap().collect();
        let augmented = |seed| -> Vec<Batch> {
            Batches::new(&data, 4, order, &norm)
                .unwrap()
                .augmented(crate::Augmentation::TUTORIAL, seed, 1)
                .collect()
        };
        let (a, b, c) = (augmented(9), augmented(9), augmented(10));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for (p, a) in plain.iter().zip(&a) {
            assert_eq!(p.labels, a.labels);
            assert_ne!(p.images, a.images);
        }
    }

    #[test]
    fn zero_batch_size_is_an_error() {
        let data = numbered(3);
        let err =
            Batches::new(&data, 0, BatchOrder::Sequential, &Normalization::UNIT_SCALE).unwrap_err();
        assert!(err.to_string().contains("batch size"));
    }
}
