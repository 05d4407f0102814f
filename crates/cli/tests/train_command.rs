//! The `mnist` binary as a user runs it: messages and exit codes.

use std::process::{Command, Output};

use mnist_data::testing::real_data_or_skip;

fn mnist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mnist"))
        .args(args)
        .env_remove("MNIST_DATA_DIR")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run the mnist binary")
}

#[test]
fn a_missing_dataset_says_how_to_fetch_it() {
    let empty = tempfile::tempdir().unwrap();
    let out = mnist(&["train", "--data-dir", empty.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cargo xtask fetch-data"), "{stderr}");
    assert!(
        stderr.contains(&empty.path().display().to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("backtrace") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_impossible_validation_fraction_is_refused_before_loading() {
    let out = mnist(&["train", "--val-split", "1", "--data-dir", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--val-split") && stderr.contains("below 1"),
        "{stderr}"
    );
}

#[test]
fn a_corrupt_dataset_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(dir.path().join(name), [0, 0, 8, 1, 0, 0, 0, 9, 1, 2]).unwrap();
    }
    let out = mnist(&["train", "--data-dir", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("-ubyte") && stderr.contains("expected 9 bytes"),
        "{stderr}"
    );
}

#[test]
fn real_mnist_train_loads_and_reports_the_shapes() {
    let Some(dir) = real_data_or_skip("real_mnist_train_loads_and_reports_the_shapes") else {
        return;
    };
    let out = mnist(&["train", "--data-dir", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[54000, 1, 28, 28]"), "{stdout}");
    assert!(stdout.contains("[6000, 1, 28, 28]"), "{stdout}");
    assert!(stdout.contains("[10000, 1, 28, 28]"), "{stdout}");
}
