//! TensorBoard event files, as Keras' TensorBoard callback writes them: `<logdir>/train` and
//! `<logdir>/validation`, one scalar per epoch per tag (`epoch_loss`, `epoch_accuracy`,
//! `epoch_learning_rate`), so `tensorboard --logdir <logdir>` overlays training and validation.
//!
//! The format is small enough to write by hand: a file of TFRecords (length, masked CRC-32C of
//! the length, data, masked CRC-32C of the data), each holding a protobuf `tensorflow.Event`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::TrainError;
use crate::fit::EpochRecord;

/// Event files for the training and validation curves of one run.
#[derive(Debug)]
pub struct TensorBoard {
    train: EventFile,
    validation: EventFile,
}

impl TensorBoard {
    /// Creates `<logdir>/train` and `<logdir>/validation` with a new event file in each.
    pub fn create(logdir: &Path) -> Result<TensorBoard, TrainError> {
        Ok(TensorBoard {
            train: EventFile::create(&logdir.join("train"))?,
            validation: EventFile::create(&logdir.join("validation"))?,
        })
    }

    /// Records one epoch (TensorBoard's step is the 1-based epoch, as Keras' is 0-based).
    pub fn epoch(&mut self, record: &EpochRecord) -> Result<(), TrainError> {
        let step = record.epoch as i64;
        self.train.scalar("epoch_loss", step, record.train_loss)?;
        self.train
            .scalar("epoch_accuracy", step, record.train_accuracy)?;
        self.train
            .scalar("epoch_learning_rate", step, record.learning_rate)?;
        if let (Some(loss), Some(accuracy)) = (record.val_loss, record.val_accuracy) {
            self.validation.scalar("epoch_loss", step, loss)?;
            self.validation.scalar("epoch_accuracy", step, accuracy)?;
        }
        Ok(())
    }
}

/// One append-only event file. Each record is flushed as it is written; a crash can leave at
/// most a truncated last record, which TensorBoard's reader stops at.
#[derive(Debug)]
struct EventFile {
    path: PathBuf,
    file: File,
}

impl EventFile {
    fn create(dir: &Path) -> Result<EventFile, TrainError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| TrainError::Io { path, error }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // TensorBoard finds files by "tfevents" in the name.
        let path = dir.join(format!(
            "events.out.tfevents.{now}.mnist-cnn.{}",
            std::process::id()
        ));
        let file = File::create(&path).map_err(io(&path))?;
        let mut events = EventFile { path, file };
        // The first event of every file names the format version.
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_bytes(&mut event, 3, b"brain.Event:2");
        events.write_record(&event)?;
        Ok(events)
    }

    fn scalar(&mut self, tag: &str, step: i64, value: f32) -> Result<(), TrainError> {
        // Summary.Value { tag = 1; simple_value = 2 }
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        // Summary { repeated Value value = 1 }
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        // Event { double wall_time = 1; int64 step = 2; Summary summary = 5 }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// One TFRecord: u64 length, masked CRC of the length, data, masked CRC of the data (LE).
    fn write_record(&mut self, data: &[u8]) -> Result<(), TrainError> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&length);
        record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(|error| TrainError::Io {
                path: self.path.clone(),
                error,
            })
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise: a few hundred bytes per epoch need no table.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's masked CRC: rotated and offset so that CRCs of CRCs do not collide.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720 / the CRC catalogue: CRC-32C("123456789") = 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_follow_protobuf() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xAC, 0x02]);
    }
}
