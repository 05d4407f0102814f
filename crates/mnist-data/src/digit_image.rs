//! Any image of a digit (PNG, JPEG) brought to MNIST's form the way MNIST itself was made, and
//! robust to how people's images differ from MNIST's:
//!
//! 1. Transparency is composited onto the background: a transparent pixel is background whatever
//!    colour its hidden RGB holds (the background is taken to contrast with the opaque ink).
//! 2. Grayscale, white ink on black (inverted when the border is light, as paper is).
//! 3. The background is estimated (a grey-scale opening, wider than a stroke) and subtracted, so
//!    paper under uneven light becomes black; Otsu's threshold then separates ink from what is
//!    left of the paper and its noise, and the ink is stretched to full contrast.
//! 4. Cropped to the ink (its mass's 0.5% to 99.5% quantiles, so a speck of noise does not
//!    widen the box), scaled to fit a 20x20 box keeping the aspect ratio, and placed in 28x28
//!    with its centre of mass at the centre.
//!
//! An image that is already 28x28 (as MNIST's own images, and what Keras tutorials feed a
//! model) only gets steps 1 and 2: cleaning and scaling it again would blur a digit that is
//! already in form. The server and `predict` share this one function.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, Luma};
use ndarray::Array2;

use crate::error::DataError;

/// A 28x28 image with no pixel above this (after inversion) is blank.
const INK_THRESHOLD: u8 = 40;

/// Below this much contrast between ink and background (of 255) there is no digit to see.
const MIN_CONTRAST: u8 = 24;

/// Larger images are first scaled down to this on their longer side: plenty for a 20x20 box,
/// and it bounds the cost of cleaning a 48-megapixel photo.
const WORK_SIDE: u32 = 256;

/// An image file is at most this large (64 MiB); larger ones are refused before reading.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// An image is at most this wide and this high, checked from its header before decoding.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// At most this many pixels (a 48-megapixel photo fits), checked from the header too.
pub const MAX_IMAGE_PIXELS: u64 = 48_000_000;
/// The decoder may allocate at most this much (a 48-megapixel RGBA image is 192 MB).
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Reads an image file and returns it in MNIST's form, 28x28 bytes.
pub fn load_digit(path: &Path) -> Result<Array2<u8>, DataError> {
    let at = |problem: String| DataError::Image {
        path: path.to_path_buf(),
        problem,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| at(format!("cannot read: {e}")))?
        .len();
    if size > MAX_IMAGE_FILE_BYTES {
        return Err(at(format!(
            "{size} bytes, more than the limit of {MAX_IMAGE_FILE_BYTES} for an image file"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| at(format!("cannot read: {e}")))?;
    decode_digit(&bytes).map_err(at)
}

/// Decodes a PNG or JPEG held in memory (a file's or a request's bytes) and returns it in
/// MNIST's form. Its size is checked from the header before any pixel is decoded, so a small
/// file claiming a huge image (a decompression bomb) costs nothing.
pub fn decode_digit(bytes: &[u8]) -> Result<Array2<u8>, String> {
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("cannot read: {e}"))
    };
    let not_an_image = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => format!("refused before decoding: {l}"),
        other => format!("not a PNG or JPEG image this program can decode: {other}"),
    };
    let (w, h) = reader()?.into_dimensions().map_err(not_an_image)?;
    if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE || u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "the image is {w}x{h} pixels, more than the limit of {MAX_IMAGE_PIXELS} pixels and \
             {MAX_IMAGE_SIDE} on a side; refused before decoding"
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = reader()?;
    reader.limits(limits);
    let image = reader.decode().map_err(not_an_image)?;
    // Scaled down at once: the cleaning works at this size anyway, and the grey and
    // alpha-flattened copies of a large photo would otherwise each be as large as it.
    let image = if w.max(h) > WORK_SIDE {
        image.resize(WORK_SIDE, WORK_SIDE, FilterType::Triangle)
    } else {
        image
    };
    to_mnist_form(&flatten_alpha(&image))
}

/// The image in grey levels, its transparency composited onto a background that contrasts with
/// its opaque pixels: white behind dark ink, black behind light ink. A drawing exported with a
/// transparent background (a browser canvas, most drawing apps) hides arbitrary RGB behind
/// alpha 0, often black: read without alpha it would be blank or inverted.
pub fn flatten_alpha(image: &DynamicImage) -> GrayImage {
    if !image.color().has_alpha() {
        return image.to_luma8();
    }
    let rgba = image.to_luma_alpha8();
    let (mut ink, mut weight) = (0.0f64, 0.0f64);
    for p in rgba.pixels() {
        let a = f64::from(p[1]) / 255.0;
        ink += a * f64::from(p[0]);
        weight += a;
    }
    let background = if weight > 0.0 && ink / weight < 128.0 {
        255.0
    } else {
        0.0
    };
    GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = f32::from(p[1]) / 255.0;
        Luma([(a * f32::from(p[0]) + (1.0 - a) * background).round() as u8])
    })
}

/// A grayscale image of one digit in MNIST's form.
pub fn to_mnist_form(gray: &GrayImage) -> Result<Array2<u8>, String> {
    let (w, h) = gray.dimensions();
    if w == 0 || h == 0 {
        return Err("the image is empty".into());
    }
    // The background is what the border mostly is: light means dark ink on paper.
    let border: Vec<u8> = (0..w)
        .flat_map(|x| [gray.get_pixel(x, 0)[0], gray.get_pixel(x, h - 1)[0]])
        .chain((0..h).flat_map(|y| [gray.get_pixel(0, y)[0], gray.get_pixel(w - 1, y)[0]]))
        .collect();
    let light_background =
        border.iter().map(|&v| u32::from(v)).sum::<u32>() / border.len() as u32 > 127;
    let ink = GrayImage::from_fn(w, h, |x, y| {
        let v = gray.get_pixel(x, y)[0];
        Luma([if light_background { 255 - v } else { v }])
    });
    if (w, h) == (28, 28) {
        if ink.pixels().all(|p| p[0] <= INK_THRESHOLD) {
            return Err("no digit found: the image is blank".into());
        }
        return Ok(Array2::from_shape_fn((28, 28), |(r, c)| {
            ink.get_pixel(c as u32, r as u32)[0]
        }));
    }

    let clean = clean_ink(&ink)?;
    let (x0, x1) = ink_span(&clean, true);
    let (y0, y1) = ink_span(&clean, false);
    let crop = image::imageops::crop_imm(&clean, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();

    // Fit the longer side to 20 pixels (MNIST's box), keeping the aspect ratio.
    let (cw, ch) = crop.dimensions();
    let scale = 20.0 / cw.max(ch) as f32;
    let (sw, sh) = (
        ((cw as f32 * scale).round() as u32).max(1),
        ((ch as f32 * scale).round() as u32).max(1),
    );
    let small = image::imageops::resize(&crop, sw, sh, FilterType::Triangle);

    // Into 28x28 with the centre of mass at (14, 14) (MNIST: 13.5 in pixel-centre coordinates).
    let mass: f32 = small.pixels().map(|p| f32::from(p[0])).sum();
    let (my, mx) = if mass > 0.0 {
        small
            .enumerate_pixels()
            .fold((0.0, 0.0), |(my, mx), (x, y, p)| {
                let v = f32::from(p[0]) / mass;
                (my + y as f32 * v, mx + x as f32 * v)
            })
    } else {
        (sh as f32 / 2.0, sw as f32 / 2.0)
    };
    let (top, left) = ((13.5 - my).round() as i64, (13.5 - mx).round() as i64);
    let mut out = Array2::<u8>::zeros((28, 28));
    for (x, y, p) in small.enumerate_pixels() {
        let (r, c) = (top + i64::from(y), left + i64::from(x));
        if (0..28).contains(&r) && (0..28).contains(&c) {
            out[(r as usize, c as usize)] = p[0];
        }
    }
    Ok(out)
}

/// Ink (bright on black) with the background removed and full contrast: the image scaled down
/// to at most [`WORK_SIDE`], its background estimated by a grey-scale opening (a minimum, then
/// a maximum, over a window wider than a stroke) and subtracted, lightly smoothed, then
/// thresholded with Otsu's method (below it, black) and scaled so the ink's 99th percentile is
/// white.
fn clean_ink(ink: &GrayImage) -> Result<GrayImage, String> {
    let (w, h) = ink.dimensions();
    let scale = (WORK_SIDE as f32 / w.max(h) as f32).min(1.0);
    let work = if scale < 1.0 {
        let (sw, sh) = (
            ((w as f32 * scale).round() as u32).max(1),
            ((h as f32 * scale).round() as u32).max(1),
        );
        image::imageops::resize(ink, sw, sh, FilterType::Triangle)
    } else {
        ink.clone()
    };
    let (w, h) = work.dimensions();
    // Strokes are far thinner than a sixth of the image; paper's shading is far wider.
    let radius = (w.min(h) / 6).max(2);
    let background = filter(&filter(&work, radius, u8::min), radius, u8::max);
    let raw = GrayImage::from_fn(w, h, |x, y| {
        Luma([work.get_pixel(x, y)[0].saturating_sub(background.get_pixel(x, y)[0])])
    });
    let smooth = image::imageops::blur(&raw, 0.7);
    let mut histogram = [0u64; 256];
    for p in smooth.pixels() {
        histogram[usize::from(p[0])] += 1;
    }
    let threshold = otsu(&histogram);
    let brightest = (0..256).rev().find(|&v| histogram[v] > 0).unwrap_or(0) as u8;
    if brightest < MIN_CONTRAST {
        return Err("no digit found: the image is blank".into());
    }
    // The 99th percentile of the ink above the threshold becomes white.
    let above: u64 = histogram[usize::from(threshold) + 1..].iter().sum();
    let mut seen = 0;
    let mut top = brightest;
    for v in (usize::from(threshold) + 1..256).rev() {
        seen += histogram[v];
        if seen * 100 >= above {
            top = v as u8;
            break;
        }
    }
    // Ink keeps its grey levels (a stroke's soft edges, which MNIST has too), scaled up;
    // everything at or below the threshold is background.
    let top = f32::from(top.max(1));
    Ok(GrayImage::from_fn(w, h, |x, y| {
        let v = smooth.get_pixel(x, y)[0];
        let stretched = if v > threshold {
            (f32::from(v) / top * 255.0).min(255.0)
        } else {
            0.0
        };
        Luma([stretched.round() as u8])
    }))
}

/// A separable square filter of radius `r` taking `pick` (min or max) over each window; pixels
/// beyond the edge do not count.
fn filter(image: &GrayImage, r: u32, pick: fn(u8, u8) -> u8) -> GrayImage {
    let (w, h) = image.dimensions();
    let (w, h, r) = (w as usize, h as usize, r as usize);
    let mut rows = vec![0u8; w * h];
    for (y, row) in image.as_raw().chunks_exact(w).enumerate() {
        rows[y * w..(y + 1) * w].copy_from_slice(&running(row, r, pick));
    }
    let mut out = vec![0u8; w * h];
    let mut column = vec![0u8; h];
    for x in 0..w {
        for (y, v) in column.iter_mut().enumerate() {
            *v = rows[y * w + x];
        }
        for (y, v) in running(&column, r, pick).into_iter().enumerate() {
            out[y * w + x] = v;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).unwrap_or_else(|| image.clone())
}

/// `pick` over every window `[i - r, i + r]` of `line`, in three operations per value whatever
/// `r` (van Herk, 1992; Gil and Werman, 1993): running results from the start and from the end
/// of blocks of the window's length, two of which cover any window exactly.
fn running(line: &[u8], r: usize, pick: fn(u8, u8) -> u8) -> Vec<u8> {
    let identity = if pick(0, 255) == 0 { 255 } else { 0 };
    let (n, k) = (line.len(), 2 * r + 1);
    let m = (n + 2 * r).div_ceil(k) * k;
    let mut padded = vec![identity; m];
    padded[r..r + n].copy_from_slice(line);
    let (mut from_start, mut from_end) = (padded.clone(), padded.clone());
    for i in 1..m {
        if i % k != 0 {
            from_start[i] = pick(from_start[i - 1], padded[i]);
        }
    }
    for i in (0..m - 1).rev() {
        if (i + 1) % k != 0 {
            from_end[i] = pick(from_end[i + 1], padded[i]);
        }
    }
    (0..n)
        .map(|i| pick(from_end[i], from_start[i + k - 1]))
        .collect()
}

/// Otsu's threshold: the grey level that maximizes the variance between the pixels at or below
/// it and those above (Otsu, "A threshold selection method from gray-level histograms", 1979).
fn otsu(histogram: &[u64; 256]) -> u8 {
    let total: u64 = histogram.iter().sum();
    let sum: f64 = histogram
        .iter()
        .enumerate()
        .map(|(v, &n)| v as f64 * n as f64)
        .sum();
    let (mut weight_below, mut sum_below) = (0u64, 0.0f64);
    let (mut best, mut best_variance) = (0u8, -1.0f64);
    for (v, &n) in histogram.iter().enumerate() {
        weight_below += n;
        sum_below += v as f64 * n as f64;
        let weight_above = total - weight_below;
        if weight_below == 0 || weight_above == 0 {
            continue;
        }
        let mean_below = sum_below / weight_below as f64;
        let mean_above = (sum - sum_below) / weight_above as f64;
        let variance =
            weight_below as f64 * weight_above as f64 * (mean_below - mean_above).powi(2);
        if variance > best_variance {
            (best, best_variance) = (v as u8, variance);
        }
    }
    best
}

/// The first and last column (or row) holding the 0.5% to 99.5% quantiles of the ink's mass.
fn ink_span(image: &GrayImage, columns: bool) -> (u32, u32) {
    let (w, h) = image.dimensions();
    let len = if columns { w } else { h };
    let mass: Vec<u64> = (0..len)
        .map(|i| {
            let across = if columns { h } else { w };
            (0..across)
                .map(|j| {
                    let (x, y) = if columns { (i, j) } else { (j, i) };
                    u64::from(image.get_pixel(x, y)[0])
                })
                .sum()
        })
        .collect();
    let total: u64 = mass.iter().sum();
    let (mut first, mut last, mut seen) = (0, len - 1, 0u64);
    let mut first_found = false;
    for (i, &m) in mass.iter().enumerate() {
        seen += m;
        if !first_found && seen * 200 > total {
            first = i as u32;
            first_found = true;
        }
        if seen * 200 >= total * 199 {
            last = i as u32;
            break;
        }
    }
    (first, last.max(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thick "1": a vertical bar, drawn dark on light paper in a large off-centre canvas.
    fn paper_one() -> GrayImage {
        GrayImage::from_fn(120, 90, |x, y| {
            Luma([if (70..82).contains(&x) && (10..80).contains(&y) {
                20
            } else {
                235
            }])
        })
    }

    #[test]
    fn a_photo_like_digit_is_inverted_boxed_and_centred() {
        let digit = to_mnist_form(&paper_one()).unwrap();
        // The bar was 70 tall: scaled to 20 rows, centred vertically.
        let rows: Vec<usize> = (0..28)
            .filter(|&r| digit.row(r).iter().any(|&v| v > 128))
            .collect();
        assert!((19..=21).contains(&rows.len()), "{rows:?}");
        let mass: f32 = digit.iter().map(|&v| f32::from(v)).sum();
        let cy = digit
            .indexed_iter()
            .map(|((r, _), &v)| r as f32 * f32::from(v))
            .sum::<f32>()
            / mass;
        let cx = digit
            .indexed_iter()
            .map(|((_, c), &v)| c as f32 * f32::from(v))
            .sum::<f32>()
            / mass;
        assert!(
            (cy - 13.5).abs() <= 0.6 && (cx - 13.5).abs() <= 0.6,
            "centre ({cy}, {cx})"
        );
        // Ink is white on black, as in MNIST.
        assert_eq!(digit[(0, 0)], 0);
    }

    #[test]
    fn a_28x28_image_is_taken_as_it_is_or_inverted() {
        let mnist_like = GrayImage::from_fn(28, 28, |x, y| Luma([((x * 7 + y * 3) % 200) as u8]));
        let as_is = to_mnist_form(&mnist_like).unwrap();
        assert_eq!(as_is[(2, 5)], mnist_like.get_pixel(5, 2)[0]);
        assert_eq!(as_is[(27, 1)], mnist_like.get_pixel(1, 27)[0]);
        let paper = GrayImage::from_fn(28, 28, |x, _| Luma([if x == 14 { 0 } else { 255 }]));
        let inverted = to_mnist_form(&paper).unwrap();
        assert_eq!((inverted[(3, 14)], inverted[(3, 13)]), (255, 0));
    }

    proptest::proptest! {
        /// The running minimum and maximum against the plain window, on random lines and radii.
        #[test]
        fn the_running_min_and_max_match_a_naive_window(
            line in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..80),
            r in 0usize..50,
            max in proptest::prelude::any::<bool>(),
        ) {
            let pick: fn(u8, u8) -> u8 = if max { u8::max } else { u8::min };
            let naive: Vec<u8> = (0..line.len())
                .map(|i| {
                    let (lo, hi) = (i.saturating_sub(r), (i + r).min(line.len() - 1));
                    line[lo..=hi].iter().copied().fold(if max { 0 } else { 255 }, pick)
                })
                .collect();
            proptest::prop_assert_eq!(running(&line, r, pick), naive);
        }
    }

    #[test]
    fn a_transparent_background_is_background_whatever_its_hidden_colour() {
        // Black ink drawn on a transparent canvas whose hidden RGB is black too, as a browser
        // canvas exports it: read without alpha, the whole image is black.
        let rgba = image::RgbaImage::from_fn(60, 60, |x, y| {
            let ink = (25..35).contains(&x) && (8..52).contains(&y);
            image::Rgba(if ink { [0, 0, 0, 255] } else { [0, 0, 0, 0] })
        });
        let digit = to_mnist_form(&flatten_alpha(&DynamicImage::ImageRgba8(rgba))).unwrap();
        assert!(digit[(14, 14)] > 200 && digit[(0, 0)] == 0, "{digit:?}");
        // White ink on transparency (a dark-mode drawing) is composited onto black instead.
        let rgba = image::RgbaImage::from_fn(60, 60, |x, y| {
            let ink = (25..35).contains(&x) && (8..52).contains(&y);
            image::Rgba(if ink {
                [255, 255, 255, 255]
            } else {
                [255, 255, 255, 0]
            })
        });
        let digit = to_mnist_form(&flatten_alpha(&DynamicImage::ImageRgba8(rgba))).unwrap();
        assert!(digit[(14, 14)] > 200 && digit[(0, 0)] == 0, "{digit:?}");
    }

    #[test]
    fn otsu_splits_two_groups_between_them() {
        let mut histogram = [0u64; 256];
        histogram[20] = 900;
        histogram[200] = 100;
        let t = otsu(&histogram);
        assert!((20..200).contains(&t), "{t}");
    }

    #[test]
    fn a_blank_image_is_an_error() {
        let blank = GrayImage::from_pixel(30, 30, Luma([250]));
        assert!(to_mnist_form(&blank).unwrap_err().contains("blank"));
    }
}
