//! A run killed with SIGKILL during an epoch and resumed ends with bit-identical weights to an
//! uninterrupted run with the same seed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::weights;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn mnist() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mnist"));
    command
        .env_remove("MNIST_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let data = tempfile::tempdir().unwrap();
    // Large enough that an epoch takes a noticeable moment, so the kill lands inside one.
    common::synthetic_dataset(data.path(), 3000, 100);
    let data_dir = data.path().to_str().unwrap();
    // Dropout, so the resumed run must also replay the dropout masks.
    let args = [
        "train",
        "--model",
        "one-conv-dropout",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--data-dir",
        data_dir,
        "--quiet",
    ];

    let straight = data.path().join("straight");
    let out = mnist()
        .args(args)
        .args(["--run-dir", straight.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let killed = data.path().join("killed");
    let mut child = mnist()
        .args(args)
        .args(["--run-dir", killed.to_str().unwrap()])
        .spawn()
        .unwrap();
    let checkpoint = killed.join("checkpoint.safetensors");
    let start = Instant::now();
    while !checkpoint.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint after 2 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL: no chance to clean up, as when a machine loses power.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("final.safetensors").exists(),
        "the run finished before the kill"
    );

    let out = mnist()
        .args(["train", "--resume", killed.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(killed.join("train.log")).unwrap();
    assert!(log.contains("resuming after epoch"), "{log}");

    let (a, b) = (
        weights(&straight.join("final.safetensors")),
        weights(&killed.join("final.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after resuming");
    }
    let history = |dir: &Path| {
        std::fs::read_to_string(dir.join("history.csv"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(history(&straight), history(&killed));

    // Resuming a finished run without more epochs says so.
    let out = mnist()
        .args(["train", "--resume", killed.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already finished"));
}
