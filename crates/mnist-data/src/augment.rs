//! Data augmentation for digits: a seeded random rotation, scaling and translation of each
//! image, resampled bilinearly about the image centre (Keras' ImageDataGenerator with
//! rotation_range, zoom_range and width/height_shift_range), optionally followed by an elastic
//! distortion (Simard, Steinkraus and Platt, 2003). No flips: digits are not symmetric.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;

/// How far each random transform may go (all zero: the identity); each image draws its own
/// values uniformly within the ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augmentation {
    /// Rotation in degrees, drawn from [-degrees, degrees].
    pub degrees: f32,
    /// Scale factor drawn from [1 - zoom, 1 + zoom].
    pub zoom: f32,
    /// Shift in pixels along each axis, drawn from [-shift, shift].
    pub shift: f32,
    /// Elastic distortion, if any: each pixel moves by a smoothed random field.
    pub elastic: Option<Elastic>,
}

/// An elastic distortion: a displacement field of uniform noise in [-1, 1] per pixel and axis,
/// smoothed by a Gaussian of standard deviation `sigma` pixels and scaled by `alpha` pixels
/// (Simard et al. use alpha 34 and sigma 4 on MNIST).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elastic {
    /// Scale of the displacement, in pixels.
    pub alpha: f32,
    /// Smoothness of the displacement field, in pixels.
    pub sigma: f32,
}

impl Augmentation {
    /// The tutorial's settings: 10 degrees, 10% zoom, 2 pixels of shift.
    pub const TUTORIAL: Augmentation = Augmentation {
        degrees: 10.0,
        zoom: 0.1,
        shift: 2.0,
        elastic: None,
    };

    /// Writes a randomly transformed copy of `image` (pixel values as f32) into `out`.
    pub fn apply(
        &self,
        image: ArrayView2<'_, f32>,
        mut out: ArrayViewMut2<'_, f32>,
        rng: &mut ChaCha8Rng,
    ) {
        let mut uniform = |range: f32| (unit(rng) * 2.0 - 1.0) * range;
        let angle = uniform(self.degrees).to_radians();
        let scale = 1.0 + uniform(self.zoom);
        let (dy, dx) = (uniform(self.shift), uniform(self.shift));
        let (rows, cols) = image.dim();
        let (cy, cx) = ((rows as f32 - 1.0) / 2.0, (cols as f32 - 1.0) / 2.0);
        let (sin, cos) = angle.sin_cos();
        let field = self.elastic.map(|e| e.field(rows, cols, rng));
        // Each output pixel samples the input at the inverse transform of its position, moved
        // by the elastic field.
        for ((r, c), o) in out.indexed_iter_mut() {
            let (y, x) = (r as f32 - cy - dy, c as f32 - cx - dx);
            let mut sy = (cos * y - sin * x) / scale + cy;
            let mut sx = (sin * y + cos * x) / scale + cx;
            if let Some((fy, fx)) = &field {
                sy += fy[(r, c)];
                sx += fx[(r, c)];
            }
            *o = bilinear(&image, sy, sx);
        }
    }
}

impl Elastic {
    /// A random displacement field (rows, cols) for each axis.
    fn field(&self, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> (Array2<f32>, Array2<f32>) {
        let mut noise = || Array2::from_shape_simple_fn((rows, cols), || unit(rng) * 2.0 - 1.0);
        let (fy, fx) = (noise(), noise());
        (self.smooth(&fy), self.smooth(&fx))
    }

    /// Gaussian blur of a field (separable, zero outside the image), scaled by alpha.
    fn smooth(&self, field: &Array2<f32>) -> Array2<f32> {
        let radius = (3.0 * self.sigma).ceil().max(1.0) as isize;
        let kernel: Vec<f32> = (-radius..=radius)
            .map(|d| (-(d * d) as f32 / (2.0 * self.sigma * self.sigma)).exp())
            .collect();
        let total: f32 = kernel.iter().sum();
        let blur = |a: &Array2<f32>, (dr, dc): (isize, isize)| {
            let (rows, cols) = (a.nrows() as isize, a.ncols() as isize);
            Array2::from_shape_fn(a.dim(), |(r, c)| {
                let sum: f32 = kernel
                    .iter()
                    .zip(-radius..=radius)
                    .map(|(&k, d)| {
                        let (rr, cc) = (r as isize + d * dr, c as isize + d * dc);
                        if (0..rows).contains(&rr) && (0..cols).contains(&cc) {
                            k * a[(rr as usize, cc as usize)]
                        } else {
                            0.0
                        }
                    })
                    .sum();
                sum / total
            })
        };
        blur(&blur(field, (1, 0)), (0, 1)).mapv(|v| v * self.alpha)
    }
}

/// The image value at a fractional position, zero outside it.
fn bilinear(image: &ArrayView2<'_, f32>, y: f32, x: f32) -> f32 {
    let (y0, x0) = (y.floor(), x.floor());
    let (fy, fx) = (y - y0, x - x0);
    let at = |r: f32, c: f32| -> f32 {
        if r < 0.0 || c < 0.0 {
            return 0.0;
        }
        image.get((r as usize, c as usize)).copied().unwrap_or(0.0)
    };
    at(y0, x0) * (1.0 - fy) * (1.0 - fx)
        + at(y0, x0 + 1.0) * (1.0 - fy) * fx
        + at(y0 + 1.0, x0) * fy * (1.0 - fx)
        + at(y0 + 1.0, x0 + 1.0) * fy * fx
}

/// A uniform f32 in [0, 1) from the top 24 bits of one draw.
fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shuffle::seeded_rng;
    use ndarray::Array2;

    fn digit() -> Array2<f32> {
        Array2::from_shape_fn((28, 28), |(r, c)| {
            if (6..22).contains(&r) && (12..16).contains(&c) {
                1.0
            } else {
                0.0
            }
        })
    }

    #[test]
    fn no_augmentation_is_the_identity() {
        let none = Augmentation {
            degrees: 0.0,
            zoom: 0.0,
            shift: 0.0,
            elastic: None,
        };
        let mut out = Array2::zeros((28, 28));
        none.apply(digit().view(), out.view_mut(), &mut seeded_rng(1, 0));
        assert_eq!(out, digit());
    }

    #[test]
    fn transforms_are_seeded_bounded_and_keep_the_ink() {
        let (image, mut a, mut b) = (digit(), Array2::zeros((28, 28)), Array2::zeros((28, 28)));
        Augmentation::TUTORIAL.apply(image.view(), a.view_mut(), &mut seeded_rng(5, 0));
        Augmentation::TUTORIAL.apply(image.view(), b.view_mut(), &mut seeded_rng(5, 0));
        assert_eq!(a, b);
        assert_ne!(a, image);
        assert!(a.iter().all(|&v| (0.0..=1.0 + 1e-6).contains(&v)));
        // Rotation and a 10% zoom keep the amount of ink within the zoom's area change.
        let (ink, moved) = (image.sum(), a.sum());
        assert!((moved / ink - 1.0).abs() < 0.25, "ink {ink} -> {moved}");
    }

    #[test]
    fn elastic_distortion_is_seeded_smooth_and_keeps_the_digit() {
        let elastic = Augmentation {
            degrees: 0.0,
            zoom: 0.0,
            shift: 0.0,
            elastic: Some(Elastic {
                alpha: 8.0,
                sigma: 4.0,
            }),
        };
        let image = digit();
        let (mut a, mut b) = (Array2::zeros((28, 28)), Array2::zeros((28, 28)));
        elastic.apply(image.view(), a.view_mut(), &mut seeded_rng(3, 0));
        elastic.apply(image.view(), b.view_mut(), &mut seeded_rng(3, 0));
        assert_eq!(a, b);
        assert_ne!(a, image);
        // A smooth field bends the stroke but keeps most of its ink near where it was.
        let ink_kept: f32 = a.iter().zip(image.iter()).map(|(&x, &y)| x.min(y)).sum();
        assert!(
            ink_kept > 0.3 * image.sum(),
            "kept {ink_kept} of {}",
            image.sum()
        );
        let field = Elastic {
            alpha: 1.0,
            sigma: 4.0,
        }
        .field(28, 28, &mut seeded_rng(4, 0))
        .0;
        // Smoothed uniform noise: neighbours differ far less than independent draws would.
        let step: f32 = (0..27)
            .map(|r| (field[(r + 1, 10)] - field[(r, 10)]).abs())
            .sum::<f32>()
            / 27.0;
        let spread = field.iter().map(|v| v.abs()).sum::<f32>() / field.len() as f32;
        assert!(step < spread, "step {step}, spread {spread}");
    }

    #[test]
    fn a_pure_shift_moves_the_stroke() {
        let shift = Augmentation {
            degrees: 0.0,
            zoom: 0.0,
            shift: 3.0,
            elastic: None,
        };
        let mut out = Array2::zeros((28, 28));
        shift.apply(digit().view(), out.view_mut(), &mut seeded_rng(2, 0));
        let centre = |a: &Array2<f32>| {
            a.indexed_iter()
                .map(|((_, c), &v)| c as f32 * v)
                .sum::<f32>()
                / a.sum()
        };
        let moved = centre(&out) - centre(&digit());
        assert!(moved.abs() <= 3.0 + 1e-3, "{moved}");
    }
}
