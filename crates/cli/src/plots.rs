//! PNG figures, as the tutorials draw them with matplotlib: loss and accuracy curves per epoch,
//! the confusion matrix as a heatmap, and a grid of the most confident mistakes.
//!
//! Text needs a font; DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`) is
//! compiled in, so figures look the same on every machine and no system font is needed.

use std::path::Path;
use std::sync::Once;

use mnist_data::LabeledImages;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::TrainError;
use crate::fit::EpochRecord;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Makes the compiled-in font plotters' "sans-serif".
fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid font compiled into the binary; registering cannot fail for them.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A drawing failure, reported against the file being drawn.
fn draw_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Image {
        path: path.to_path_buf(),
        problem: format!("cannot draw: {e}"),
    }
}

/// Draws into an RGB buffer with `draw`, then writes it as a PNG atomically.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<(), TrainError> {
    register_font();
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        draw(root).map_err(|e| draw_error(path, e))?;
    }
    let image =
        image::RgbImage::from_raw(w, h, pixels).ok_or_else(|| draw_error(path, "buffer size"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| draw_error(path, e))?;
    nn::write_atomically(path, png.get_ref()).map_err(|error| TrainError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// `loss.png` and `accuracy.png` in `dir`: training and validation per epoch.
pub fn history_plots(dir: &Path, history: &[EpochRecord]) -> Result<(), TrainError> {
    type Pick = fn(&EpochRecord) -> (f32, Option<f32>);
    let figures: [(&str, &str, Pick); 2] = [
        ("loss.png", "loss", |r| (r.train_loss, r.val_loss)),
        ("accuracy.png", "accuracy", |r| {
            (r.train_accuracy, r.val_accuracy)
        }),
    ];
    for (file, name, pick) in figures {
        let train: Vec<(f32, f32)> = history
            .iter()
            .map(|r| (r.epoch as f32, pick(r).0))
            .collect();
        let validation: Vec<(f32, f32)> = history
            .iter()
            .filter_map(|r| pick(r).1.map(|v| (r.epoch as f32, v)))
            .collect();
        let values = train.iter().chain(&validation).map(|p| p.1);
        let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let margin = ((hi - lo) * 0.1).max(1e-3);
        let epochs = history.len().max(2) as f32;
        render(&dir.join(file), (800, 500), |root| {
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("{name} per epoch"), ("sans-serif", 26))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d(1f32..epochs, (lo - margin)..(hi + margin))
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(name)
                // Whole epochs only.
                .x_labels(history.len().clamp(2, 15))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(|e| e.to_string())?;
            for (points, label, colour) in
                [(&train, "training", BLUE), (&validation, "validation", RED)]
            {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        colour.stroke_width(2),
                    ))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
            root.present().map_err(|e| e.to_string())
        })?;
    }
    Ok(())
}

/// The confusion matrix as a heatmap: rows are true classes, columns predictions, each cell
/// shaded by its share of its row and labelled with its count.
pub fn confusion_heatmap(path: &Path, confusion: &[Vec<usize>]) -> Result<(), TrainError> {
    let k = confusion.len();
    let cell = 56i32;
    let (left, top) = (90i32, 70i32);
    let size = (
        left as u32 + cell as u32 * k as u32 + 30,
        top as u32 + cell as u32 * k as u32 + 60,
    );
    render(path, size, |root| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let text =
            |s: String, at: (i32, i32), px: i32| Text::new(s, at, ("sans-serif", px).into_font());
        root.draw(&text(
            "confusion matrix (rows: true, columns: predicted)".into(),
            (left - 60, 15),
            20,
        ))
        .map_err(|e| e.to_string())?;
        for (r, row) in confusion.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (c, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                // White to deep blue by share of the row.
                let shade = |full: f64| (255.0 - (255.0 - full) * share.powf(0.5)) as u8;
                let colour = RGBColor(shade(20.0), shade(60.0), shade(150.0));
                let (x, y) = (left + c as i32 * cell, top + r as i32 * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    colour.filled(),
                ))
                .map_err(|e| e.to_string())?;
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let label = count.to_string();
                let at = (x + cell / 2 - 5 * label.len() as i32, y + cell / 2 - 9);
                root.draw(&Text::new(
                    label,
                    at,
                    ("sans-serif", 17).into_font().color(&ink),
                ))
                .map_err(|e| e.to_string())?;
            }
            root.draw(&text(
                r.to_string(),
                (left - 25, top + r as i32 * cell + cell / 2 - 10),
                18,
            ))
            .map_err(|e| e.to_string())?;
        }
        for c in 0..k {
            root.draw(&text(
                c.to_string(),
                (left + c as i32 * cell + cell / 2 - 5, top - 28),
                18,
            ))
            .map_err(|e| e.to_string())?;
        }
        root.draw(&text("true".into(), (10, top + cell * k as i32 / 2), 18))
            .map_err(|e| e.to_string())?;
        root.draw(&text(
            "predicted".into(),
            (left + cell * k as i32 / 2 - 40, top + cell * k as i32 + 15),
            18,
        ))
        .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    })
}

/// A grid of mistakes `(index, true, predicted, confidence)`: each image enlarged, captioned
/// with its true and predicted class and the confidence of the wrong answer.
pub fn mistakes_grid(
    path: &Path,
    images: &LabeledImages,
    mistakes: &[(usize, usize, usize, f32)],
) -> Result<(), TrainError> {
    let shown = &mistakes[..mistakes.len().min(36)];
    let columns = 6usize;
    let rows = shown.len().div_ceil(columns).max(1);
    let (scale, caption) = (3i32, 22i32);
    let (side_w, side_h) = (images.cols() as i32 * scale, images.rows() as i32 * scale);
    let (cell_w, cell_h) = (side_w + 16, side_h + caption + 10);
    let size = (
        cell_w as u32 * columns as u32,
        cell_h as u32 * rows as u32 + 40,
    );
    render(path, size, |root| {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        root.draw(&Text::new(
            "most confident mistakes (true -> predicted, confidence)",
            (8, 8),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(|e| e.to_string())?;
        for (n, &(index, truth, predicted, confidence)) in shown.iter().enumerate() {
            let (x0, y0) = (
                (n % columns) as i32 * cell_w + 8,
                (n / columns) as i32 * cell_h + 40,
            );
            if index >= images.len() {
                continue;
            }
            let image = images.image(index);
            for ((r, c), &p) in image.indexed_iter() {
                // Dark ink on white, as a digit on paper.
                let v = 255 - p;
                let (x, y) = (x0 + c as i32 * scale, y0 + r as i32 * scale);
                root.draw(&Rectangle::new(
                    [(x, y), (x + scale, y + scale)],
                    RGBColor(v, v, v).filled(),
                ))
                .map_err(|e| e.to_string())?;
            }
            let label = format!("{truth} -> {predicted}  {:.0}%", confidence * 100.0);
            root.draw(&Text::new(
                label,
                (x0, y0 + side_h + 4),
                ("sans-serif", 15).into_font(),
            ))
            .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    })
}
