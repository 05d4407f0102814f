//! A training run's directory: configuration, history, log and model files, each written
//! atomically so an interrupted run leaves complete files only.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nn::{ModelInfo, Sequential, save_model};

use crate::error::TrainError;
use crate::fit::EpochRecord;
use crate::history::history_csv;

/// The checkpoint written after every epoch.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// The directory of one training run.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    log: File,
}

impl RunDir {
    /// Refuses a directory a new run must not write into: one holding files, unless
    /// `overwrite` is given and it is a run directory (it has a `config.json`), which is then
    /// replaced. Checked before any data is loaded; [`RunDir::create`] checks again.
    pub fn check_new(path: &Path, overwrite: bool) -> Result<(), TrainError> {
        let refuse = |problem: String| TrainError::RunDir {
            path: path.to_path_buf(),
            problem,
        };
        if path.exists() && !path.is_dir() {
            return Err(refuse("exists and is not a directory".into()));
        }
        let mut entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(TrainError::Io {
                    path: path.to_path_buf(),
                    error,
                });
            }
        };
        if entries.next().is_none() {
            return Ok(());
        }
        if !overwrite {
            return Err(refuse(format!(
                "already holds a run; pass --overwrite to replace it, --resume {} to continue \
                 it, or choose another --run-dir",
                path.display()
            )));
        }
        if !path.join("config.json").is_file() {
            return Err(refuse(
                "holds files but no config.json, so it is not a run directory: --overwrite \
                 replaces run directories only"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Creates `path` for a new run, or `runs/<UTC time>-<model>` when none is given (the
    /// model's name made safe as one file name: it comes from a spec, which anyone may have
    /// written). A directory that already holds a run is refused, or with `overwrite` replaced
    /// (see [`RunDir::check_new`]).
    pub fn create(
        path: Option<PathBuf>,
        model_name: &str,
        overwrite: bool,
    ) -> Result<RunDir, TrainError> {
        let path = path.unwrap_or_else(|| {
            PathBuf::from("runs").join(format!(
                "{}-{}",
                utc_timestamp(),
                safe_file_name(model_name)
            ))
        });
        RunDir::check_new(&path, overwrite)?;
        if overwrite && path.join("config.json").is_file() {
            fs::remove_dir_all(&path).map_err(|error| TrainError::Io {
                path: path.clone(),
                error,
            })?;
        }
        RunDir::open(path)
    }

    /// Opens the directory of a run to continue it (creating it if needed); removes the
    /// temporary files an interrupted run left behind.
    pub fn open(path: PathBuf) -> Result<RunDir, TrainError> {
        let io = |source| TrainError::Io {
            path: path.clone(),
            error: source,
        };
        fs::create_dir_all(&path).map_err(io)?;
        remove_stray_temporary_files(&path).map_err(io)?;
        let log_path = path.join("train.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| TrainError::Io {
                path: log_path,
                error,
            })?;
        Ok(RunDir { path, log })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a line to `train.log`.
    pub fn log(&mut self, line: &str) -> Result<(), TrainError> {
        writeln!(self.log, "{line}").map_err(|error| TrainError::Io {
            path: self.path.join("train.log"),
            error,
        })
    }

    /// Writes `config.json`.
    pub fn write_config(&self, config: &impl serde::Serialize) -> Result<(), TrainError> {
        let json = serde_json::to_string_pretty(config)
            .unwrap_or_else(|e| unreachable!("plain data: {e}"));
        self.write("config.json", json.as_bytes())
    }

    /// Rewrites `history.csv` with every epoch so far.
    pub fn write_history(&self, history: &[EpochRecord]) -> Result<(), TrainError> {
        self.write("history.csv", history_csv(history).as_bytes())
    }

    /// Saves `model` as `<name>.safetensors` (e.g. "best", "last").
    pub fn save_model(
        &self,
        name: &str,
        model: &Sequential,
        info: &ModelInfo,
    ) -> Result<PathBuf, TrainError> {
        let path = self.path.join(format!("{name}.safetensors"));
        save_model(&path, model, info)?;
        Ok(path)
    }

    /// Saves a training checkpoint as `checkpoint.safetensors`: model, optimizer and loop state.
    pub fn save_checkpoint(
        &self,
        model: &Sequential,
        optimizer: &nn::Optimizer,
        info: &ModelInfo,
        state: &crate::fit::FitState,
    ) -> Result<(), TrainError> {
        let state =
            serde_json::to_string(state).unwrap_or_else(|e| unreachable!("plain data: {e}"));
        nn::save_checkpoint(&self.path.join(CHECKPOINT), model, optimizer, info, &state)?;
        Ok(())
    }

    /// Restores the last checkpoint into `model` and `optimizer`; returns the loop state.
    pub fn load_checkpoint(
        &self,
        model: &mut Sequential,
        optimizer: &mut nn::Optimizer,
    ) -> Result<crate::fit::FitState, TrainError> {
        let path = self.path.join(CHECKPOINT);
        let state = nn::load_checkpoint(&path, model, optimizer)?;
        serde_json::from_str(&state).map_err(|e| {
            TrainError::Nn(nn::NnError::ModelFile {
                path,
                problem: format!("invalid loop state: {e}"),
            })
        })
    }

    /// Writes a file of the run atomically (temporary file, then rename).
    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
        let path = self.path.join(name);
        nn::write_atomically(&path, bytes).map_err(|error| TrainError::Io { path, error })
    }
}

/// `name` as one path component: ASCII letters, digits, `-`, `_` and `.` kept (not leading),
/// anything else (`/`, `..`, spaces, control characters) replaced by `_`; at most 64 characters.
pub fn safe_file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .take(64)
        .enumerate()
        .map(|(i, c)| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            '.' if i > 0 => c,
            _ => '_',
        })
        .collect();
    if safe.is_empty() {
        "model".into()
    } else {
        safe
    }
}

/// Deletes the `.tmp*` files that [`nn::write_atomically`] leaves when a process is killed
/// between creating and renaming one (`kill -9`, power loss); nothing else starts so.
fn remove_stray_temporary_files(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let stray = entry.file_name().to_string_lossy().starts_with(".tmp");
        if stray && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The current UTC time as `YYYYMMDD-HHMMSS`, for run directory names.
pub fn utc_timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_from_a_spec_cannot_leave_the_runs_directory() {
        assert_eq!(safe_file_name("a/../../../x"), "a_.._.._.._x");
        assert_eq!(safe_file_name("../x"), "_._x");
        assert_eq!(safe_file_name("two-conv"), "two-conv");
        assert_eq!(safe_file_name(""), "model");
        assert_eq!(safe_file_name(&"y".repeat(500)).len(), 64);
        // One component under runs/, whatever the name: no `..` step, no separator.
        let name = safe_file_name("a/../../../x");
        let path = Path::new("runs").join(format!("20261202-000000-{name}"));
        assert_eq!(path.components().count(), 2, "{}", path.display());
    }

    #[test]
    fn temporary_files_of_an_interrupted_run_are_removed_on_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let run_path = dir.path().join("run");
        fs::create_dir(&run_path).unwrap();
        fs::write(run_path.join(".tmpA1b2C3"), b"half a model").unwrap();
        fs::write(run_path.join("history.csv"), b"epoch\n").unwrap();
        RunDir::open(run_path.clone()).unwrap();
        let mut left: Vec<_> = fs::read_dir(&run_path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["history.csv", "train.log"]);
    }

    #[test]
    fn a_directory_holding_a_run_is_refused_unless_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        RunDir::create(Some(run.clone()), "m", false).unwrap();
        fs::write(run.join("config.json"), b"{}").unwrap();
        let error = RunDir::create(Some(run.clone()), "m", false).unwrap_err();
        assert!(error.to_string().contains("pass --overwrite"), "{error}");
        RunDir::create(Some(run.clone()), "m", true).unwrap();
        assert!(!run.join("config.json").exists());
        // Not a run directory: never deleted, even with --overwrite.
        let other = dir.path().join("photos");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("cat.jpg"), b"meow").unwrap();
        let error = RunDir::create(Some(other.clone()), "m", true).unwrap_err();
        assert!(error.to_string().contains("not a run directory"), "{error}");
        assert!(other.join("cat.jpg").exists());
    }

    #[test]
    fn timestamps_have_the_documented_shape() {
        let t = utc_timestamp();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.starts_with("20") && t.as_bytes()[8] == b'-', "{t}");
    }
}
