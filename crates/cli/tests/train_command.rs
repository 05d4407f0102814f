//! The `mnist` binary as a user runs it, on a small synthetic dataset in MNIST's layout:
//! training writes its run directory, evaluate agrees with training, predict answers, and every
//! impossible argument fails with one line and a non-zero exit.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

mod common;

use common::synthetic_dataset;

fn mnist(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mnist"))
        .args(args)
        .env_remove("MNIST_DATA_DIR")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run the mnist binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn train_writes_the_run_directory_and_evaluate_and_predict_agree() {
    let data = tempfile::tempdir().unwrap();
    synthetic_dataset(data.path(), 600, 200);
    let run = data.path().join("run");
    // TensorBoard events go into the run directory by default.
    let tensorboard = run.join("tensorboard");
    let (data_dir, run_dir) = (data.path().to_str().unwrap(), run.to_str().unwrap());
    let out = mnist(&[
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "2",
        "--data-dir",
        data_dir,
        "--run-dir",
        run_dir,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "two epochs and the test result: {stdout}");
    assert_eq!(lines[1]["epoch"], 2);
    let test_accuracy = lines[2]["test_accuracy"].as_f64().unwrap();
    assert!(
        test_accuracy > 0.9,
        "a bar per class is easy: {test_accuracy}"
    );

    for file in [
        "best.safetensors",
        "last.safetensors",
        "final.safetensors",
        "checkpoint.safetensors",
        "history.csv",
        "config.json",
        "train.log",
        "loss.png",
        "accuracy.png",
        "tensorboard/train",
        "tensorboard/validation",
    ] {
        assert!(run.join(file).exists(), "{file} missing");
    }
    let history = std::fs::read_to_string(run.join("history.csv")).unwrap();
    // TensorBoard: per epoch, the training loss, accuracy and rate, and the validation curves.
    let train_events = common::read_scalars(&tensorboard.join("train"));
    let validation_events = common::read_scalars(&tensorboard.join("validation"));
    let tags = |events: &[(String, i64, f32)], tag: &str| -> Vec<(i64, f32)> {
        events
            .iter()
            .filter(|(t, _, _)| t == tag)
            .map(|&(_, s, v)| (s, v))
            .collect()
    };
    assert_eq!(
        tags(&train_events, "epoch_learning_rate"),
        [(1, 0.001), (2, 0.001)]
    );
    assert_eq!(tags(&validation_events, "epoch_loss").len(), 2);
    for (line, (step, loss)) in history
        .lines()
        .skip(1)
        .zip(tags(&train_events, "epoch_loss"))
    {
        let csv_loss: f32 = line.split(',').nth(1).unwrap().parse().unwrap();
        assert!(
            (csv_loss - loss).abs() < 1e-5,
            "epoch {step}: csv {csv_loss}, events {loss}"
        );
    }
    assert_eq!(history.lines().count(), 3, "{history}");
    assert!(history.starts_with("epoch,train_loss,train_accuracy,val_loss,val_accuracy,learning_rate,seconds,images_per_second"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["name"], "lenet5");
    assert_eq!(config["batch_size"], 64);

    // evaluate on the saved model reports the accuracy training reported.
    let final_model = run.join("final.safetensors");
    let model_file = final_model.to_str().unwrap();
    let out = mnist(&[
        "evaluate",
        "--model-file",
        model_file,
        "--data-dir",
        data_dir,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let evaluation: serde_json::Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(evaluation["accuracy"].as_f64().unwrap(), test_accuracy);
    assert_eq!(evaluation["confusion"].as_array().unwrap().len(), 10);
    let out = mnist(&[
        "evaluate",
        "--model-file",
        model_file,
        "--data-dir",
        data_dir,
    ]);
    let report = text(&out.stdout);
    assert!(
        report.contains("confusion matrix") && report.contains("precision"),
        "{report}"
    );
    // The figures decode as PNGs of the size drawn.
    let (heatmap, mistakes) = (
        data.path().join("confusion.png"),
        data.path().join("mistakes.png"),
    );
    let out = mnist(&[
        "evaluate",
        "--model-file",
        model_file,
        "--data-dir",
        data_dir,
        "--confusion-png",
        heatmap.to_str().unwrap(),
        "--misclassified",
        mistakes.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for (png, width) in [
        (&heatmap, 680),
        (&mistakes, 600),
        (&run.join("loss.png"), 800),
    ] {
        let image = image::open(png).unwrap();
        assert_eq!(image.width(), width, "{}", png.display());
    }

    // predict draws the image and answers with a class.
    let out = mnist(&[
        "predict",
        "--model-file",
        model_file,
        "--data-dir",
        data_dir,
        "--test-index",
        "3",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("test image 3 (label")
            && stdout.contains("predicted")
            && stdout.contains("██"),
        "{stdout}"
    );

    // summary reads the model file too.
    let out = mnist(&["summary", "--model-file", model_file]);
    assert!(
        text(&out.stdout).contains("Total params: 61,706"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_diverging_run_stops_naming_epoch_and_batch() {
    let data = tempfile::tempdir().unwrap();
    synthetic_dataset(data.path(), 300, 50);
    let run = data.path().join("run");
    let out = mnist(&[
        "train",
        "--model",
        "lenet5",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--epochs",
        "1",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("epoch 1, batch") && stderr.contains("lower learning rate"),
        "{stderr}"
    );
    assert!(
        std::fs::read_to_string(run.join("train.log"))
            .unwrap()
            .contains("stopped")
    );
}

#[test]
fn impossible_arguments_fail_with_one_line() {
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();
    let not_a_model = empty.path().join("notes.txt");
    std::fs::write(&not_a_model, "hello").unwrap();
    let cases: [(&[&str], &str); 11] = [
        (&["train", "--batch-size", "0"], "must be at least 1"),
        (&["train", "--val-split", "1"], "below 1"),
        (&["train", "--lr", "0"], "positive"),
        (&["train", "--lr", "-1"], "positive"),
        (
            &["train", "--model", "resnet", "--data-dir", dir],
            "unknown model \"resnet\": choose one of two-conv",
        ),
        (&["train", "--data-dir", dir], "cargo xtask fetch-data"),
        (
            &["train", "--nesterov", "--data-dir", dir],
            "--nesterov needs --optimizer sgd",
        ),
        (
            &[
                "evaluate",
                "--model-file",
                not_a_model.to_str().unwrap(),
                "--data-dir",
                dir,
            ],
            "not a safetensors model file",
        ),
        (&["train", "--schedule", "sometimes"], "expected constant"),
        (&["train", "--zoom", "0.2"], "--augment"),
        (
            &["train", "--augment", "--elastic", "34"],
            "expected ALPHA:SIGMA",
        ),
    ];
    for (args, needle) in cases {
        let out = mnist(args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{args:?}: {stderr}"
        );
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_recipe_sets_what_no_flag_says() {
    let data = tempfile::tempdir().unwrap();
    synthetic_dataset(data.path(), 300, 100);
    let dir = data.path().to_str().unwrap();
    let run = data.path().join("run");
    // The fast recipe, with its epochs and batch size overridden by flags.
    let out = mnist(&[
        "train",
        "--recipe",
        "fast",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--data-dir",
        dir,
        "--run-dir",
        run.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["name"], "fast-cnn");
    assert_eq!(config["epochs"], 1);
    assert_eq!(config["batch_size"], 50);
    assert_eq!(config["schedule"]["type"], "one_cycle");
    assert_eq!(config["label_smoothing"].as_f64().unwrap() as f32, 0.1);
    assert_eq!(config["val_split"], 0.0);
    let out = mnist(&["train", "--recipe", "slowest", "--data-dir", dir]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("slowest"),
        "{}",
        text(&out.stderr)
    );
}
