//! Digits as people make them, read through the one preprocessing `predict` and the server
//! share (`cli::decode_digit`), measured as accuracy of a model trained on MNIST.
//!
//! The images are made here from the first 100 MNIST test digits (their labels are the truth):
//! a drawing exported with a transparent background, a photo of grey paper under uneven light
//! with sensor noise (PNG and JPEG), thin and thick strokes, a small digit in a large frame,
//! and digits rotated by 12 degrees. Nothing is tuned image by image: the thresholds below are
//! for the whole set of each kind.

#![allow(clippy::unwrap_used)]

use image::imageops::FilterType;
use image::{GrayImage, ImageFormat, Luma, Rgba, RgbaImage};
use mnist_data::{LabeledImages, LoadOptions, Normalization, load_dir};
use nn::{Mode, Optimizer, Rule, Schedule, Sequential, preset};

struct Silent;
impl cli::Observer for Silent {}

/// lenet5 after one epoch of MNIST (98-99% on the test set).
fn trained_model(train: &LabeledImages) -> (Sequential, Normalization) {
    let normalization = Normalization::fit(train);
    let mut model = Sequential::new(preset("lenet5").unwrap(), 1).unwrap();
    let mut optimizer = Optimizer::new(Rule::adam(), 1e-3).unwrap();
    let options = cli::FitOptions {
        epochs: 1,
        batch_size: 64,
        seed: 1,
        label_smoothing: 0.0,
        learning_rate: 1e-3,
        schedule: Schedule::Constant,
        early_stopping: None,
        reduce_lr: None,
        augmentation: None,
    };
    let data = cli::FitData {
        train,
        validation: None,
        normalization,
    };
    cli::fit(
        &mut model,
        &mut optimizer,
        &data,
        &options,
        &mut Silent,
        None,
    )
    .unwrap();
    (model, normalization)
}

/// A 28x28 MNIST digit (white on black) as a grey image.
fn digit(test: &LabeledImages, i: usize) -> GrayImage {
    let image = test.image(i);
    GrayImage::from_fn(28, 28, |x, y| Luma([image[(y as usize, x as usize)]]))
}

/// A deterministic noise value in -1..1 for a pixel.
fn noise(x: u32, y: u32, seed: u32) -> f32 {
    let mut h = x.wrapping_mul(374_761_393) ^ y.wrapping_mul(668_265_263) ^ seed;
    h = (h ^ (h >> 13)).wrapping_mul(1_274_126_177);
    (h ^ (h >> 16)) as f32 / u32::MAX as f32 * 2.0 - 1.0
}

/// Ink intensity (0..1) of `digit` scaled to `size` pixels, placed with its corner at `at`.
fn placed(digit: &GrayImage, size: u32, at: (u32, u32)) -> impl Fn(u32, u32) -> f32 {
    let big = image::imageops::resize(digit, size, size, FilterType::Triangle);
    move |x, y| {
        let (dx, dy) = (x.wrapping_sub(at.0), y.wrapping_sub(at.1));
        if dx < size && dy < size {
            f32::from(big.get_pixel(dx, dy)[0]) / 255.0
        } else {
            0.0
        }
    }
}

/// Dark ink on white paper of `side` pixels.
fn on_paper(side: u32, ink: impl Fn(u32, u32) -> f32) -> GrayImage {
    GrayImage::from_fn(side, side, |x, y| {
        Luma([(250.0 - 235.0 * ink(x, y)).round() as u8])
    })
}

/// `pick` over each pixel's (2r+1)^2 neighbourhood: thins (min) or thickens (max) white ink.
fn morph(image: &GrayImage, r: u32, pick: fn(u8, u8) -> u8) -> GrayImage {
    let (w, h) = image.dimensions();
    let pass = |src: &GrayImage, horizontal: bool| {
        GrayImage::from_fn(w, h, |x, y| {
            let (at, len) = if horizontal { (x, w) } else { (y, h) };
            let values = (at.saturating_sub(r)..=(at + r).min(len - 1)).map(|i| {
                let (px, py) = if horizontal { (i, y) } else { (x, i) };
                src.get_pixel(px, py)[0]
            });
            Luma([values.reduce(pick).unwrap()])
        })
    };
    pass(&pass(image, true), false)
}

/// `digit` rotated by `degrees` about its centre (bilinear).
fn rotated(digit: &GrayImage, degrees: f32) -> GrayImage {
    let (s, c) = degrees.to_radians().sin_cos();
    GrayImage::from_fn(28, 28, |x, y| {
        let (dx, dy) = (x as f32 - 13.5, y as f32 - 13.5);
        let (sx, sy) = (c * dx + s * dy + 13.5, -s * dx + c * dy + 13.5);
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let at = |x: f32, y: f32| {
            if (0.0..28.0).contains(&x) && (0.0..28.0).contains(&y) {
                f32::from(digit.get_pixel(x as u32, y as u32)[0])
            } else {
                0.0
            }
        };
        let v = at(x0, y0) * (1.0 - fx) * (1.0 - fy)
            + at(x0 + 1.0, y0) * fx * (1.0 - fy)
            + at(x0, y0 + 1.0) * (1.0 - fx) * fy
            + at(x0 + 1.0, y0 + 1.0) * fx * fy;
        Luma([v.round() as u8])
    })
}

fn encode(image: impl Into<image::DynamicImage>, format: ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.into().write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

/// The file bytes of every kind of image for test digit `i`.
fn kinds(test: &LabeledImages, i: usize) -> Vec<(&'static str, Vec<u8>)> {
    let d = digit(test, i);
    let seed = i as u32;
    let transparent = {
        let ink = placed(&d, 240, (20, 20));
        // Hidden colour under alpha 0: black, as a browser canvas exports it.
        RgbaImage::from_fn(280, 280, |x, y| {
            let a = ink(x, y);
            Rgba([0, 0, 0, (a * 255.0).round() as u8])
        })
    };
    let grey_paper = {
        let ink = placed(&d, 150, (50 + (i as u32 % 30), 40));
        GrayImage::from_fn(240, 240, |x, y| {
            // Light falling from the left: paper from 215 down to 125, with sensor noise.
            let paper = 215.0 - 90.0 * x as f32 / 240.0 + 10.0 * noise(x, y, seed);
            Luma([(paper * (1.0 - 0.7 * ink(x, y))).clamp(0.0, 255.0) as u8])
        })
    };
    let big = image::imageops::resize(&d, 200, 200, FilterType::Triangle);
    let thin = morph(&big, 3, u8::min);
    let thick = morph(&big, 6, u8::max);
    let stroke = |ink: GrayImage| {
        on_paper(240, move |x, y| {
            let (dx, dy) = (x.wrapping_sub(20), y.wrapping_sub(20));
            if dx < 200 && dy < 200 {
                f32::from(ink.get_pixel(dx, dy)[0]) / 255.0
            } else {
                0.0
            }
        })
    };
    let small = on_paper(300, placed(&d, 56, (200, 40)));
    let turned = on_paper(
        240,
        placed(
            &rotated(&d, if i.is_multiple_of(2) { 12.0 } else { -12.0 }),
            200,
            (20, 20),
        ),
    );
    vec![
        ("transparent PNG", encode(transparent, ImageFormat::Png)),
        (
            "grey paper, uneven light (PNG)",
            encode(grey_paper.clone(), ImageFormat::Png),
        ),
        (
            "grey paper, uneven light (JPEG)",
            encode(grey_paper, ImageFormat::Jpeg),
        ),
        ("thin strokes", encode(stroke(thin), ImageFormat::Png)),
        ("thick strokes", encode(stroke(thick), ImageFormat::Png)),
        (
            "small digit in a large frame",
            encode(small, ImageFormat::Png),
        ),
        ("rotated 12 degrees", encode(turned, ImageFormat::Png)),
    ]
}

#[test]
fn real_world_like_images_are_read_as_the_digits_they_show() {
    let Some(dir) = mnist_data::testing::real_data_or_skip("real_world_like_images") else {
        return;
    };
    let data = load_dir(&dir, &LoadOptions::default()).unwrap();
    let (mut model, normalization) = trained_model(&data.train);
    let count = 100;
    let mut tally: Vec<(&str, usize)> = Vec::new();
    let mut mnist_right = 0;
    for i in 0..count {
        let label = usize::from(data.test.labels()[i]);
        let classify = |model: &mut Sequential, image: ndarray::Array2<u8>| {
            let x = image
                .mapv(|p| normalization.apply(p))
                .into_shape_with_order((1, 1, 28, 28))
                .unwrap();
            nn::predictions(model.forward(x, Mode::Eval).unwrap().view())[0]
        };
        mnist_right += usize::from(classify(&mut model, data.test.image(i).to_owned()) == label);
        for (kind, bytes) in kinds(&data.test, i) {
            let right = match cli::decode_digit(&bytes) {
                Ok(image) => classify(&mut model, image) == label,
                Err(_) => false,
            };
            match tally.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += usize::from(right),
                None => tally.push((kind, usize::from(right))),
            }
        }
    }
    println!("MNIST's own 28x28 images: {mnist_right} of {count}");
    for (kind, right) in &tally {
        println!("{kind}: {right} of {count}");
    }
    let total: usize = tally.iter().map(|(_, n)| n).sum();
    let accuracy = total as f32 / (count * tally.len()) as f32;
    println!("all kinds: {accuracy:.3}");
    assert!(accuracy >= 0.9, "{tally:?}");
    for (kind, right) in &tally {
        assert!(*right >= 80, "{kind}: {right} of {count}");
    }
}
