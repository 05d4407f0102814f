//! Any image of a digit (PNG, JPEG) brought to MNIST's form the way MNIST itself was made:
//! grayscale, white ink on black (inverted when the background is light), cropped to the ink,
//! scaled to fit a 20x20 box keeping the aspect ratio, and placed in 28x28 with its centre of
//! mass at the centre. An image that is already 28x28 (as MNIST's own images, and what Keras
//! tutorials feed a model) is only inverted if its background is light: cropping and scaling it
//! again would blur a digit that is already in form.

use std::path::Path;

use image::imageops::FilterType;
use image::{GrayImage, Luma};
use ndarray::Array2;

use crate::error::TrainError;

/// Pixels above this (after inversion) count as ink when cropping.
const INK_THRESHOLD: u8 = 40;

/// An image file is at most this large (64 MiB); larger ones are refused before reading.
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 << 20;
/// An image is at most this wide and this high, checked from its header before decoding.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// At most this many pixels (a 48-megapixel photo fits), checked from the header too.
pub const MAX_IMAGE_PIXELS: u64 = 48_000_000;
/// The decoder may allocate at most this much (a 48-megapixel RGBA image is 192 MB).
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// Reads an image file and returns it in MNIST's form, 28x28 bytes.
pub fn load_digit(path: &Path) -> Result<Array2<u8>, TrainError> {
    let at = |problem: String| TrainError::Image {
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
    to_mnist_form(&image.to_luma8())
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

    let inked = |x: u32, y: u32| ink.get_pixel(x, y)[0] > INK_THRESHOLD;
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if inked(x, y) {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    if x0 > x1 {
        return Err("no digit found: the image is blank".into());
    }
    let crop = image::imageops::crop_imm(&ink, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();

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

    #[test]
    fn a_blank_image_is_an_error() {
        let blank = GrayImage::from_pixel(30, 30, Luma([250]));
        assert!(to_mnist_form(&blank).unwrap_err().contains("blank"));
    }
}
