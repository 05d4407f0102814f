//! What Keras and PyTorch users do, through the binary: continue a finished run to more
//! epochs, fine-tune a saved model with frozen layers, have mistakes refused before the run
//! starts, end a spec in Softmax, and not overwrite a run by accident.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::weights;

fn mnist(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mnist"))
        .current_dir(cwd)
        .env_remove("MNIST_DATA_DIR")
        .args(args)
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// Refused with `needle` in the message: exit code 1, or 2 for what the argument parser
/// itself rejects (clap's usage errors).
fn refused(output: &Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(matches!(output.status.code(), Some(1 | 2)), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    stderr
}

fn same_weights(a: &Path, b: &Path) {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs");
    }
}

/// A scratch directory holding a synthetic dataset in `data/`.
fn scratch(train: usize, test: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    common::synthetic_dataset(&data, train, test);
    dir
}

/// Trains lenet5 for one epoch on the data in `dir` into the run directory `dir/<run>`.
fn trained_for_an_epoch(dir: &Path, run: &str) {
    let mut args = TRAIN.to_vec();
    args.extend(["1", "--epochs", "1", "--run-dir", run]);
    ok(&mnist(dir, &args));
}

const TRAIN: [&str; 9] = [
    "train",
    "--model",
    "lenet5",
    "--batch-size",
    "32",
    "--data-dir",
    "data",
    "--quiet",
    "--seed",
];

#[test]
fn a_finished_run_continues_to_more_epochs_with_the_weights_of_a_longer_run() {
    let dir = scratch(400, 50);
    // A relative --data-dir, then a resume from elsewhere: the stored path must be absolute.
    let mut three = TRAIN.to_vec();
    three.extend(["4", "--epochs", "3", "--run-dir", "three"]);
    ok(&mnist(dir.path(), &three));
    let mut five = TRAIN.to_vec();
    five.extend(["4", "--epochs", "5", "--run-dir", "five"]);
    ok(&mnist(dir.path(), &five));

    let run = dir.path().join("three");
    let run = run.to_str().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // Finished: more epochs are needed to go on.
    refused(
        &mnist(elsewhere.path(), &["train", "--resume", run]),
        "already finished",
    );
    // A setting that differs from the run's is refused, naming the flags.
    let stderr = refused(
        &mnist(
            elsewhere.path(),
            &[
                "train",
                "--resume",
                run,
                "--epochs",
                "5",
                "--lr",
                "0.5",
                "--seed",
                "4",
                "--batch-size",
                "64",
            ],
        ),
        "--batch-size, --lr would change them",
    );
    assert!(
        !stderr.contains("--seed"),
        "the same seed is not a change: {stderr}"
    );
    ok(&mnist(
        elsewhere.path(),
        &["train", "--resume", run, "--epochs", "5", "--quiet"],
    ));
    same_weights(
        &dir.path().join("three/final.safetensors"),
        &dir.path().join("five/final.safetensors"),
    );
    let history = |name: &str| {
        std::fs::read_to_string(dir.path().join(name).join("history.csv"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(history("three"), history("five"));
}

#[test]
fn fine_tuning_keeps_the_frozen_layers_bytes_and_trains_the_rest() {
    let dir = scratch(300, 50);
    trained_for_an_epoch(dir.path(), "base");
    let source = dir.path().join("base/final.safetensors");
    let source_str = source.to_str().unwrap();

    // lenet5: conv, ReLU, pool, conv, ReLU, pool | Flatten, Dense... : freeze both convolutions.
    let tune = [
        "train",
        "--init-from",
        source_str,
        "--freeze",
        "6",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--data-dir",
        "data",
        "--run-dir",
        "tuned",
        "--seed",
        "9",
    ];
    let stderr = ok(&mnist(dir.path(), &tune));
    assert!(stderr.contains("first 6 layers frozen"), "{stderr}");
    let (before, after) = (
        weights(&source),
        weights(&dir.path().join("tuned/final.safetensors")),
    );
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        let layer: usize = name.split('.').next().unwrap().parse().unwrap();
        if layer < 6 {
            assert!(x == y, "frozen {name} changed");
        } else {
            assert!(x != y, "trainable {name} did not change");
        }
    }
    // The file's architecture is the one trained; naming another is a mistake.
    let mut other = tune.to_vec();
    other.extend(["--model", "two-conv"]);
    other[12] = "tuned-again";
    refused(&mnist(dir.path(), &other), "describes another architecture");
    // Freezing everything leaves nothing to learn.
    let mut all = tune.to_vec();
    all[4] = "12";
    all[12] = "all-frozen";
    refused(&mnist(dir.path(), &all), "at least the last must train");
    // summary counts the frozen parameters as non-trainable, as Keras does.
    let output = mnist(
        dir.path(),
        &["summary", "--model", "lenet5", "--freeze", "6"],
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("Trainable params: 59,134"), "{text}");
    assert!(text.contains("Non-trainable params: 2,572"), "{text}");
}

#[test]
fn mistakes_are_refused_before_data_is_read_or_a_run_directory_made() {
    let dir = scratch(200, 20);
    let spec = |name: &str, json: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, json).unwrap();
        path.to_str().unwrap().to_string()
    };
    let seven = spec(
        "seven.json",
        r#"{"name":"seven","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":7}]}"#,
    );
    let colour = spec(
        "colour.json",
        r#"{"name":"colour","input":[3,32,32],"layers":[{"type":"Flatten"},{"type":"Dense","units":10}]}"#,
    );
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["--schedule", "cosine:0.5", "--lr", "0.01"],
            "would raise the rate",
        ),
        (vec!["--schedule", "step:0:0.5"], "EVERY must be at least 1"),
        (
            vec!["--schedule", "exponential:2"],
            "must be above 0 and at most 1",
        ),
        (
            vec!["--batch-size", "100000"],
            "larger than the 180 training images",
        ),
        (
            vec!["--arch", &seven],
            "ends in 7 scores, but the dataset has 10 classes",
        ),
        (vec!["--arch", &colour], "takes 3x32x32 inputs"),
        (vec!["--freeze", "10"], "would freeze all 10 layers"),
    ];
    for (extra, needle) in cases {
        let run = dir.path().join("run");
        let mut args = vec![
            "train",
            "--data-dir",
            "data",
            "--run-dir",
            run.to_str().unwrap(),
        ];
        args.extend(extra);
        refused(&mnist(dir.path(), &args), needle);
        assert!(!run.exists(), "{needle}: a run directory was left behind");
    }
}

#[test]
fn a_spec_ending_in_softmax_trains_on_the_scores_before_it() {
    let dir = scratch(300, 50);
    let layers = r#"{"type":"Conv2d","filters":4,"kernel":[3,3]},{"type":"ReLU"},{"type":"MaxPool2d","kernel":[2,2]},{"type":"Flatten"},{"type":"Dense","units":10}"#;
    let plain = format!(r#"{{"name":"plain","input":[1,28,28],"layers":[{layers}]}}"#);
    let keras =
        format!(r#"{{"name":"keras","input":[1,28,28],"layers":[{layers},{{"type":"Softmax"}}]}}"#);
    std::fs::write(dir.path().join("plain.json"), plain).unwrap();
    std::fs::write(dir.path().join("keras.json"), keras).unwrap();
    let run = |spec: &str| {
        let spec_file = format!("{spec}.json");
        mnist(
            dir.path(),
            &[
                "train",
                "--arch",
                &spec_file,
                "--epochs",
                "2",
                "--data-dir",
                "data",
                "--run-dir",
                spec,
                "--seed",
                "2",
            ],
        )
    };
    ok(&run("plain"));
    let stderr = ok(&run("keras"));
    assert_eq!(stderr.matches("ends in Softmax").count(), 1, "{stderr}");
    // The Softmax has no parameters and the fused loss sees the same scores: the same bits as
    // the spec without it (before, it trained through two softmaxes to a loss of 1.56).
    same_weights(
        &dir.path().join("plain/final.safetensors"),
        &dir.path().join("keras/final.safetensors"),
    );
}

#[test]
fn a_run_directory_is_not_reused_unless_overwritten() {
    let dir = scratch(100, 20);
    let args = [
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--data-dir",
        "data",
        "--run-dir",
        "run",
        "--quiet",
    ];
    ok(&mnist(dir.path(), &args));
    let log = || std::fs::read_to_string(dir.path().join("run/train.log")).unwrap();
    let first = log();
    refused(&mnist(dir.path(), &args), "pass --overwrite");
    assert_eq!(log(), first, "a refused run wrote into the directory");
    let mut again = args.to_vec();
    again.push("--overwrite");
    ok(&mnist(dir.path(), &again));
    // Replaced, not appended to: one header line, one TensorBoard file per writer.
    assert_eq!(log().matches("lenet5: input").count(), 1, "{}", log());
    let events = std::fs::read_dir(dir.path().join("run/tensorboard/train"))
        .unwrap()
        .count();
    assert_eq!(events, 1);
}

#[test]
fn predict_answers_every_image_it_can_and_reports_each_failure() {
    let dir = scratch(100, 20);
    trained_for_an_epoch(dir.path(), "run");
    let model = dir.path().join("run/final.safetensors");
    let model = model.to_str().unwrap();
    // A bar, as the synthetic classes are drawn, in a PNG; a directory of two; a broken file.
    let bar = image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (8..10).contains(&x) && (4..24).contains(&y) {
            230
        } else {
            0
        }])
    });
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    bar.save(images.join("a.png")).unwrap();
    bar.save(images.join("b.png")).unwrap();
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG broken").unwrap();
    let output = mnist(
        dir.path(),
        &["predict", "--model-file", model, "images", "broken.png"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = refused(&output, "1 of 3 images could not be read");
    assert_eq!(stdout.matches(": predicted ").count(), 2, "{stdout}");
    assert!(
        stdout.contains("a.png") && stdout.contains("b.png"),
        "{stdout}"
    );
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(
        stderr
            .lines()
            .next()
            .unwrap()
            .starts_with("error: broken.png: not a PNG"),
        "{stderr}"
    );

    let output = mnist(
        dir.path(),
        &[
            "predict",
            "--model-file",
            model,
            "--json",
            "images/a.png",
            "broken.png",
        ],
    );
    let entries: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(entries[0]["input"], "images/a.png");
    assert!(entries[0]["predicted"].is_u64(), "{entries}");
    assert_eq!(entries[1]["input"], "broken.png");
    assert!(
        entries[1]["error"].as_str().unwrap().contains("not a PNG"),
        "{entries}"
    );
    assert_eq!(output.status.code(), Some(1));

    // Standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mnist"))
        .current_dir(dir.path())
        .args(["predict", "--model-file", model, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        &std::fs::read(images.join("a.png")).unwrap(),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    ok(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("standard input: predicted"));
}

#[test]
fn evaluate_and_predict_need_only_the_test_files() {
    let dir = scratch(100, 20);
    trained_for_an_epoch(dir.path(), "run");
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] {
        std::fs::remove_file(dir.path().join("data").join(name)).unwrap();
    }
    let model = dir.path().join("run/final.safetensors");
    let model = model.to_str().unwrap();
    ok(&mnist(
        dir.path(),
        &["evaluate", "--model-file", model, "--data-dir", "data"],
    ));
    let output = mnist(
        dir.path(),
        &[
            "predict",
            "--model-file",
            model,
            "--data-dir",
            "data",
            "--test-index",
            "3",
        ],
    );
    ok(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("test image 3"));
}
