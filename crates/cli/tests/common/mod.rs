//! A small synthetic dataset in MNIST's layout, shared by the tests.

use std::path::Path;

use mnist_data::{Encoding, IdxArray, write_idx_file};
use ndarray::{ArrayD, IxDyn};

/// Every parameter and buffer of a model file, as bits.
#[allow(dead_code)]
pub fn weights(path: &Path) -> Vec<(String, Vec<u32>)> {
    let (model, _) = nn::load_model(path).unwrap();
    let mut out = Vec::new();
    model.visit_params(|name, p| {
        out.push((
            name.to_string(),
            p.value.iter().map(|v| v.to_bits()).collect(),
        ))
    });
    model.visit_buffers(|name, b| {
        out.push((name.to_string(), b.iter().map(|v| v.to_bits()).collect()))
    });
    out
}

/// `n` images per split where class k is a bright vertical bar at columns 2k+4..2k+6, with a
/// little pseudo-random noise: learnable in one epoch.
#[allow(dead_code)]
pub fn synthetic_dataset(dir: &Path, train: usize, test: usize) {
    for (prefix, n, salt) in [("train", train, 1usize), ("t10k", test, 7)] {
        let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + salt) % 10) as u8).collect();
        let pixels: Vec<u8> = (0..n * 784)
            .map(|j| {
                let (i, p) = (j / 784, j % 784);
                let (row, col) = (p / 28, p % 28);
                let k = usize::from(labels[i]);
                let bar = (2 * k + 4..2 * k + 6).contains(&col) && (4..24).contains(&row);
                let noise = ((j * 2654435761) >> 7) % 40;
                if bar { 200 + noise as u8 } else { noise as u8 }
            })
            .collect();
        let images = IdxArray::U8(ArrayD::from_shape_vec(IxDyn(&[n, 28, 28]), pixels).unwrap());
        let labels = IdxArray::U8(ArrayD::from_shape_vec(IxDyn(&[n]), labels).unwrap());
        write_idx_file(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &images,
            Encoding::Gzip,
        )
        .unwrap();
        write_idx_file(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &labels,
            Encoding::Gzip,
        )
        .unwrap();
    }
}

/// Every scalar in the TensorBoard event files of `dir`, as (tag, step, value), after checking
/// each record's framing and both CRCs: a reader written from the format's description,
/// independent of the writer.
#[allow(dead_code)]
pub fn read_scalars(dir: &Path) -> Vec<(String, i64, f32)> {
    let mut scalars = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("tfevents"),
            "{}",
            path.display()
        );
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        let mut first = true;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
                cli::masked_crc32c(len_bytes)
            );
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()),
                cli::masked_crc32c(data)
            );
            at += 16 + len;
            let event = fields(data);
            if first {
                assert!(
                    event.iter().any(|(f, v)| *f == 3 && v == b"brain.Event:2"),
                    "file version first"
                );
                first = false;
                continue;
            }
            let step = event
                .iter()
                .find(|(f, _)| *f == 2)
                .map_or(0, |(_, v)| varint(v).0 as i64);
            for (_, summary) in event.iter().filter(|(f, _)| *f == 5) {
                for (_, value) in fields(summary).iter().filter(|(f, _)| *f == 1) {
                    let value = fields(value);
                    let tag =
                        String::from_utf8(value.iter().find(|(f, _)| *f == 1).unwrap().1.clone())
                            .unwrap();
                    let v = f32::from_le_bytes(
                        value
                            .iter()
                            .find(|(f, _)| *f == 2)
                            .unwrap()
                            .1
                            .clone()
                            .try_into()
                            .unwrap(),
                    );
                    scalars.push((tag, step, v));
                }
            }
        }
    }
    scalars
}

/// (field number, payload) of each field of a protobuf message; varints as their raw bytes.
fn fields(mut data: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (key, n) = varint(data);
        data = &data[n..];
        let payload = match key & 7 {
            0 => {
                let (_, n) = varint(data);
                data[..n].to_vec()
            }
            1 => data[..8].to_vec(),
            2 => {
                let (len, n) = varint(data);
                data = &data[n..];
                data[..len as usize].to_vec()
            }
            5 => data[..4].to_vec(),
            other => panic!("unexpected wire type {other}"),
        };
        data = &data[payload.len()..];
        out.push((key >> 3, payload));
    }
    out
}

/// A varint's value and its length in bytes.
fn varint(data: &[u8]) -> (u64, usize) {
    let mut value = 0u64;
    for (i, &b) in data.iter().enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return (value, i + 1);
        }
    }
    panic!("truncated varint")
}
