//! What the user sees while training: a progress bar per epoch (on a terminal only), a summary
//! line per epoch or one JSON object per epoch. (The run keeps its directory itself.)

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::ArrayView2;

use cli::{EpochRecord, Progress};

/// Draws a progress bar per epoch (on a terminal only) and a line per epoch, or one JSON object
/// per epoch, or nothing.
pub struct ProgressObserver {
    quiet: bool,
    json: bool,
    bar: Option<ProgressBar>,
    /// Batches of the current epoch so far.
    batches: usize,
}

impl ProgressObserver {
    /// Shows nothing when `quiet`, one JSON object per epoch when `json`.
    pub fn new(quiet: bool, json: bool) -> Self {
        ProgressObserver {
            quiet,
            json,
            bar: None,
            batches: 0,
        }
    }
}

impl Progress for ProgressObserver {
    fn note(&mut self, line: &str) {
        if !self.quiet && !self.json {
            eprintln!("{line}");
        }
    }

    fn epoch_started(&mut self, epoch: usize, epochs: usize, images: usize) {
        self.batches = 0;
        if self.quiet || self.json {
            return;
        }
        // indicatif draws nothing when stderr is not a terminal (a log file, CI).
        // Counted in images, so the rate reads as images/s and the ETA follows it.
        let bar = ProgressBar::with_draw_target(Some(images as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} images {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn batch_finished(&mut self, seen: usize, running_loss: f32, running_accuracy: f32) {
        if let Some(bar) = &self.bar {
            bar.set_position(seen as u64);
            self.batches += 1;
            // A new message every 10 batches is plenty; formatting each one is waste.
            if self.batches.is_multiple_of(10) {
                let rate = seen as f64 / bar.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {running_loss:.4} acc {running_accuracy:.4} {rate:.0} images/s"
                ));
            }
        }
    }

    fn epoch_finished(&mut self, record: &EpochRecord, line: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.json {
            println!("{}", serde_json::to_string(record).unwrap_or_default());
        } else if !self.quiet {
            eprintln!("{line}");
        }
    }
}

/// An image drawn with Unicode shades, two characters per pixel so it keeps its aspect.
pub fn shade(image: ArrayView2<'_, u8>) -> String {
    const SHADES: [&str; 5] = ["  ", "░░", "▒▒", "▓▓", "██"];
    let mut out = String::new();
    for row in image.rows() {
        for &p in row {
            out.push_str(SHADES[usize::from(p) * SHADES.len() / 256]);
        }
        out.push('\n');
    }
    out
}
