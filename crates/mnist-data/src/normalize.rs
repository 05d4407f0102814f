//! Pixel normalization: bytes in 0..=255 to `(x / 255 - mean) / std` as f32.

use crate::images::LabeledImages;

/// The affine map from a pixel byte to a model input: `(byte / 255 - mean) / std`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalization {
    /// Mean subtracted after scaling to [0, 1].
    pub mean: f32,
    /// Standard deviation divided by after subtracting the mean.
    pub std: f32,
}

impl Normalization {
    /// Scaling to [0, 1] only, as the Keras tutorials do with `x / 255`.
    pub const UNIT_SCALE: Normalization = Normalization {
        mean: 0.0,
        std: 1.0,
    };

    /// Standardization with the mean and standard deviation of these images' pixels after
    /// scaling to [0, 1]. Fit it on the training split only, never on validation or test data.
    pub fn fit(images: &LabeledImages) -> Normalization {
        // Exact and order-independent: a histogram of the 256 byte values, summed in f64.
        let mut histogram = [0u64; 256];
        for &pixel in images.pixels() {
            histogram[usize::from(pixel)] += 1;
        }
        let count: u64 = histogram.iter().sum();
        if count == 0 {
            return Normalization::UNIT_SCALE;
        }
        let n = count as f64;
        let scaled = |value: usize| value as f64 / 255.0;
        let mean = (0..256)
            .map(|v| histogram[v] as f64 * scaled(v))
            .sum::<f64>()
            / n;
        let variance = (0..256)
            .map(|v| histogram[v] as f64 * (scaled(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let std = variance.sqrt();
        Normalization {
            mean: mean as f32,
            // A constant image set has no spread to divide by; leave it centred but unscaled.
            std: if std > 0.0 { std as f32 } else { 1.0 },
        }
    }

    /// The model input for one pixel byte.
    pub fn apply(&self, pixel: u8) -> f32 {
        (f32::from(pixel) / 255.0 - self.mean) / self.std
    }

    /// The model input for each of the 256 byte values, so a batch is a table lookup per pixel.
    pub fn lookup_table(&self) -> [f32; 256] {
        std::array::from_fn(|byte| self.apply(byte as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array3};

    #[test]
    fn fit_matches_a_direct_computation() {
        let pixels: Vec<u8> = (0..600u32).map(|i| ((i * 37) % 256) as u8).collect();
        let images = LabeledImages::new(
            Array3::from_shape_vec((6, 10, 10), pixels.clone()).unwrap(),
            Array1::zeros(6),
        )
        .unwrap();
        let norm = Normalization::fit(&images);
        let values: Vec<f64> = pixels.iter().map(|&p| f64::from(p) / 255.0).collect();
        let mean = values.iter().sum::<f64>() / 600.0;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 600.0).sqrt();
        assert!((f64::from(norm.mean) - mean).abs() < 1e-6);
        assert!((f64::from(norm.std) - std).abs() < 1e-6);
        let table = norm.lookup_table();
        assert_eq!(table[200], norm.apply(200));
        assert!((table[0] - (-mean / std) as f32).abs() < 1e-5);
    }

    #[test]
    fn unit_scale_maps_bytes_to_zero_one() {
        assert_eq!(Normalization::UNIT_SCALE.apply(0), 0.0);
        assert_eq!(Normalization::UNIT_SCALE.apply(255), 1.0);
    }
}
