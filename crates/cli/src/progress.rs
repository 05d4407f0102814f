//! What the user sees while training: a progress bar per epoch (on a terminal only), a summary
//! line per epoch or one JSON object per epoch; and the run directory kept current.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ndarray::ArrayView2;
use nn::{ModelInfo, Optimizer, Sequential};

use cli::{EpochRecord, FitState, Observer, RunDir, TensorBoard, TrainError};

/// Draws progress and writes the run directory after every epoch.
pub struct ProgressObserver<'a> {
    run: &'a mut RunDir,
    quiet: bool,
    json: bool,
    info: ModelInfo,
    bar: Option<ProgressBar>,
    epochs: usize,
    /// Batches of the current epoch so far.
    batches: usize,
    tensorboard: Option<TensorBoard>,
}

impl<'a> ProgressObserver<'a> {
    /// Reports to the terminal as asked, saves models with `info` into `run`, and writes
    /// TensorBoard events when given event files.
    pub fn new(
        run: &'a mut RunDir,
        quiet: bool,
        json: bool,
        info: ModelInfo,
        tensorboard: Option<TensorBoard>,
    ) -> Self {
        ProgressObserver {
            run,
            quiet,
            json,
            info,
            bar: None,
            epochs: 0,
            batches: 0,
            tensorboard,
        }
    }
}

impl Observer for ProgressObserver<'_> {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, images: usize) {
        self.epochs = epochs;
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

    fn callback_fired(&mut self, message: &str) {
        // Logged for the record; a failed log write is not worth stopping the run for, and
        // the next epoch's write will report it.
        let _ = self.run.log(message);
        if !self.quiet && !self.json {
            eprintln!("{message}");
        }
    }

    fn epoch_finished(
        &mut self,
        record: &EpochRecord,
        model: &Sequential,
        optimizer: &Optimizer,
        state: &FitState,
        improved: bool,
    ) -> Result<(), TrainError> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.run.write_history(&state.history)?;
        cli::history_plots(self.run.path(), &state.history)?;
        if let Some(tensorboard) = &mut self.tensorboard {
            tensorboard.epoch(record)?;
        }
        let mut info = self.info.clone();
        info.training = serde_json::json!({"epoch": record.epoch, "record": record});
        self.run.save_model("last", model, &info)?;
        if improved {
            self.run.save_model("best", model, &info)?;
        }
        // Last, so that a crash before it resumes from the previous epoch, which is replayed
        // exactly: files written for the interrupted epoch are written again, identically.
        self.run.save_checkpoint(model, optimizer, &info, state)?;
        let validation = match (record.val_loss, record.val_accuracy) {
            (Some(l), Some(a)) => format!(" - val_loss {l:.4} - val_accuracy {a:.4}"),
            _ => String::new(),
        };
        let line = format!(
            "epoch {}/{} - {:.1}s ({:.0} images/s) - loss {:.4} - accuracy {:.4}{validation} - lr {:.2e}{}",
            record.epoch,
            self.epochs,
            record.seconds,
            record.images_per_second,
            record.train_loss,
            record.train_accuracy,
            record.learning_rate,
            if improved { " *" } else { "" }
        );
        self.run.log(&line)?;
        if self.json {
            println!("{}", serde_json::to_string(record).unwrap_or_default());
        } else if !self.quiet {
            eprintln!("{line}");
        }
        Ok(())
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
