//! The cases the untrusted-files issue listed, through the binary: each now ends in one line
//! naming the input and the problem, exit code 1, no signal, under a 1 GiB address-space limit.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use nn::{InputNormalization, ModelInfo, ModelSpec, Sequential, save_model};

/// Runs `mnist args` under `prlimit --as=1GiB` where prlimit exists.
fn mnist(args: &[&str]) -> Output {
    let mut command = if Command::new("prlimit").arg("--version").output().is_ok() {
        let mut c = Command::new("prlimit");
        c.arg(format!("--as={}", 1u64 << 30))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_mnist"));
        c
    } else {
        println!("*** SKIPPED the memory limit: no prlimit here ***");
        Command::new(env!("CARGO_BIN_EXE_mnist"))
    };
    command.args(args).output().unwrap()
}

/// The run was refused with one line, exit code 1, naming `named` and saying `needle` once.
fn refused(output: &Output, named: &str, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr)
        .trim_end()
        .to_string();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(named), "does not name {named}: {stderr}");
    assert_eq!(
        stderr.matches(needle).count(),
        1,
        "{needle:?} once: {stderr}"
    );
    stderr
}

fn info(normalization: Option<InputNormalization>) -> ModelInfo {
    ModelInfo {
        normalization,
        training: serde_json::Value::Null,
    }
}

fn save(path: &Path, spec: &str, normalization: Option<InputNormalization>) {
    let model = Sequential::new(ModelSpec::from_json(spec).unwrap(), 1).unwrap();
    save_model(path, &model, &info(normalization)).unwrap();
}

const SMALL: &str = r#"{"name":"small","input":[1,28,28],"layers":[{"type":"MaxPool2d","kernel":[4,4]},{"type":"Flatten"},{"type":"Dense","units":10}]}"#;
const NORMAL: Option<InputNormalization> = Some(InputNormalization {
    mean: 0.13,
    std: 0.31,
});

/// A PNG header claiming `side` x `side` grey pixels, with a few rows of data: a 4 KB bomb.
fn png_bomb(side: u32) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..200 {
        std::io::Write::write_all(&mut encoder, &vec![0u8; side as usize + 1]).unwrap();
    }
    let idat = encoder.finish().unwrap();
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    };
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &idat));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// PNG's CRC-32 (ISO 3309), bit by bit: small and obviously right.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_decompression_bomb_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    save(&model, SMALL, NORMAL);
    let bomb = dir.path().join("bomb.png");
    std::fs::write(&bomb, png_bomb(20_000)).unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 8192);
    let output = mnist(&[
        "predict",
        "--model-file",
        model.to_str().unwrap(),
        bomb.to_str().unwrap(),
    ]);
    let message = refused(&output, "bomb.png", "refused before decoding");
    assert!(message.contains("20000x20000"), "{message}");
}

#[test]
fn a_model_without_normalization_is_refused_not_given_a_default() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("bare.safetensors");
    save(&model, SMALL, None);
    common::synthetic_dataset(dir.path(), 20, 20);
    let output = mnist(&[
        "evaluate",
        "--model-file",
        model.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    refused(&output, "bare.safetensors", "has no input normalization");
}

#[test]
fn a_model_with_100000_outputs_is_refused_before_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("wide.safetensors");
    save(
        &model,
        r#"{"name":"wide","input":[1,28,28],"layers":[{"type":"MaxPool2d","kernel":[28,28]},{"type":"Flatten"},{"type":"Dense","units":100000}]}"#,
        NORMAL,
    );
    common::synthetic_dataset(dir.path(), 20, 20);
    let output = mnist(&[
        "evaluate",
        "--model-file",
        model.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    refused(&output, "wide.safetensors", "gives 100000 scores per image");
}

#[test]
fn a_corrupt_dataset_file_says_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    save(&model, SMALL, NORMAL);
    common::synthetic_dataset(dir.path(), 20, 20);
    let images = dir.path().join("t10k-images-idx3-ubyte.gz");
    let mut bytes = std::fs::read(&images).unwrap();
    let at = bytes.len() - 6; // inside the gzip trailer's CRC
    bytes[at] ^= 0xff;
    std::fs::write(&images, &bytes).unwrap();
    let args = [
        "evaluate",
        "--model-file",
        model.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ];
    refused(
        &mnist(&args),
        "t10k-images-idx3-ubyte.gz",
        "does not have a matching checksum",
    );
    std::fs::write(&images, b"not an IDX file at all").unwrap();
    refused(
        &mnist(&args),
        "t10k-images-idx3-ubyte.gz",
        "not an IDX file",
    );
}

#[test]
fn an_architecture_with_huge_numbers_is_refused_by_summary_and_train_before_any_data() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("huge.json");
    std::fs::write(
        &spec,
        r#"{"name":"huge","input":[1,28,28],"layers":[{"type":"Conv2d","filters":4,"kernel":[3,3],"padding":{"explicit":[9223372036854775808,0,0,0]}},{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    refused(
        &mnist(&["summary", "--arch", spec]),
        "huge.json",
        "overflows",
    );
    // No dataset exists in this directory: the spec is refused before one is looked for.
    let missing = dir.path().join("no-data");
    let output = mnist(&[
        "train",
        "--arch",
        spec,
        "--data-dir",
        missing.to_str().unwrap(),
        "--run-dir",
        dir.path().join("run").to_str().unwrap(),
    ]);
    refused(&output, "huge.json", "overflows");
    assert!(!dir.path().join("run").exists());
}

#[test]
fn a_run_directory_that_cannot_be_made_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    common::synthetic_dataset(dir.path(), 20, 20);
    let file = dir.path().join("taken");
    std::fs::write(&file, b"a file, not a directory").unwrap();
    let output = mnist(&[
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--run-dir",
        file.join("run").to_str().unwrap(),
    ]);
    refused(&output, "taken", "Not a directory");
}
