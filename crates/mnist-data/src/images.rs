//! A set of same-sized grayscale images with class labels, kept as bytes until a batch is made.

use ndarray::{Array1, Array3, Array4, ArrayView1, ArrayView2, ArrayView3, Axis};

use crate::error::DataError;
use crate::normalize::Normalization;
use crate::shuffle::{seeded_rng, shuffle};

/// Images `[N, H, W]` as bytes and one class label per image.
///
/// Pixels stay `u8` (a quarter of the memory of f32) and are normalized per batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledImages {
    images: Array3<u8>,
    labels: Array1<u8>,
}

/// How to carve a validation set off a training set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValidationSplit {
    /// The last `fraction` of the examples, in file order, as Keras' `validation_split` does.
    Last {
        /// Share of examples for validation, in `[0, 1)`.
        fraction: f64,
    },
    /// A seeded random `fraction` of the examples.
    Shuffled {
        /// Share of examples for validation, in `[0, 1)`.
        fraction: f64,
        /// Seed of the random choice.
        seed: u64,
    },
}

impl LabeledImages {
    /// Pairs images `[N, H, W]` with N labels.
    pub fn new(images: Array3<u8>, labels: Array1<u8>) -> Result<Self, DataError> {
        if images.len_of(Axis(0)) != labels.len() {
            return Err(DataError::InvalidArgument(format!(
                "{} images but {} labels",
                images.len_of(Axis(0)),
                labels.len()
            )));
        }
        // Standard layout lets `pixels()` hand out one slice and batches copy whole images.
        let images = images.as_standard_layout().into_owned();
        Ok(LabeledImages { images, labels })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Rows per image (H).
    pub fn rows(&self) -> usize {
        self.images.len_of(Axis(1))
    }

    /// Columns per image (W).
    pub fn cols(&self) -> usize {
        self.images.len_of(Axis(2))
    }

    /// All images, `[N, H, W]`.
    pub fn images(&self) -> ArrayView3<'_, u8> {
        self.images.view()
    }

    /// One image, `[H, W]`.
    pub fn image(&self, index: usize) -> ArrayView2<'_, u8> {
        self.images.index_axis(Axis(0), index)
    }

    /// All pixels of all images in row-major order.
    pub fn pixels(&self) -> &[u8] {
        self.images
            .as_slice()
            .unwrap_or_else(|| unreachable!("constructed in standard layout"))
    }

    /// The class label of every image (sparse labels; see [`crate::one_hot`] for one-hot).
    pub fn labels(&self) -> ArrayView1<'_, u8> {
        self.labels.view()
    }

    /// How many examples carry each label `0..classes`; labels at or over `classes` are ignored.
    pub fn label_histogram(&self, classes: usize) -> Vec<usize> {
        let mut counts = vec![0; classes];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(usize::from(label)) {
                *count += 1;
            }
        }
        counts
    }

    /// The examples at `indices`, in that order, copied.
    pub fn select(&self, indices: &[usize]) -> Result<LabeledImages, DataError> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(DataError::InvalidArgument(format!(
                "example index {bad} is out of range for {} examples",
                self.len()
            )));
        }
        Ok(LabeledImages {
            images: self.images.select(Axis(0), indices),
            labels: self.labels.select(Axis(0), indices),
        })
    }

    /// Splits into (training, validation) sets.
    pub fn split(&self, how: ValidationSplit) -> Result<(LabeledImages, LabeledImages), DataError> {
        let (ValidationSplit::Last { fraction } | ValidationSplit::Shuffled { fraction, .. }) = how;
        if !(0.0..1.0).contains(&fraction) {
            return Err(DataError::InvalidArgument(format!(
                "validation fraction {fraction} must be at least 0 and below 1"
            )));
        }
        // Keras: split_at = ceil(n * (1 - fraction)).
        let train_count = ((self.len() as f64) * (1.0 - fraction)).ceil() as usize;
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let ValidationSplit::Shuffled { seed, .. } = how {
            shuffle(&mut order, &mut seeded_rng(seed, 0));
        }
        let (train, validation) = order.split_at_mut(train_count.min(self.len()));
        // Each part keeps file order, so which examples land where is all the seed decides.
        train.sort_unstable();
        validation.sort_unstable();
        Ok((self.select(train)?, self.select(validation)?))
    }

    /// All images as one normalized `[N, 1, H, W]` f32 array (what `x / 255` gives in Keras).
    pub fn to_nchw(&self, normalization: &Normalization) -> Array4<f32> {
        let table = normalization.lookup_table();
        let (n, h, w) = self.images.dim();
        self.images
            .mapv(|p| table[usize::from(p)])
            .into_shape_with_order((n, 1, h, w))
            .unwrap_or_else(|e| unreachable!("same element count: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> LabeledImages {
        let images = Array3::from_shape_fn((n, 2, 3), |(i, r, c)| (i * 6 + r * 3 + c) as u8);
        let labels = Array1::from_shape_fn(n, |i| (i % 10) as u8);
        LabeledImages::new(images, labels).unwrap()
    }

    #[test]
    fn last_split_takes_the_tail_like_keras() {
        let data = numbered(10);
        let (train, val) = data
            .split(ValidationSplit::Last { fraction: 0.25 })
            .unwrap();
        // ceil(10 * 0.75) = 8 training examples.
        assert_eq!(train.len(), 8);
        assert_eq!(val.labels().to_vec(), vec![8, 9]);
        assert_eq!(val.image(0), data.image(8));
    }

    #[test]
    fn shuffled_split_is_seeded_disjoint_and_complete() {
        let data = numbered(40);
        let split = |seed| {
            data.split(ValidationSplit::Shuffled {
                fraction: 0.25,
                seed,
            })
            .unwrap()
        };
        let (train, val) = split(3);
        assert_eq!((train.len(), val.len()), (30, 10));
        assert_eq!(split(3), (train.clone(), val.clone()));
        assert_ne!(split(4).1, val);
        // Pixel (0, 0) of example i is 6 * i: it identifies the example.
        let mut ids: Vec<u8> = train.images().outer_iter().map(|im| im[(0, 0)]).collect();
        ids.extend(val.images().outer_iter().map(|im| im[(0, 0)]));
        ids.sort_unstable();
        assert_eq!(ids, (0..40).map(|i| (i * 6) as u8).collect::<Vec<_>>());
    }

    #[test]
    fn split_rejects_impossible_fractions() {
        let data = numbered(4);
        for fraction in [1.0, 1.5, -0.1, f64::NAN] {
            assert!(matches!(
                data.split(ValidationSplit::Last { fraction }),
                Err(DataError::InvalidArgument(_))
            ));
        }
        let (train, val) = data.split(ValidationSplit::Last { fraction: 0.0 }).unwrap();
        assert_eq!((train.len(), val.len()), (4, 0));
    }

    #[test]
    fn to_nchw_normalizes_in_logical_order() {
        let data = numbered(2);
        let x = data.to_nchw(&Normalization::UNIT_SCALE);
        assert_eq!(x.dim(), (2, 1, 2, 3));
        assert_eq!(x[(1, 0, 1, 2)], 11.0 / 255.0);
    }
}
