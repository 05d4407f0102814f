//! The CLI on the real MNIST: a short lenet5 run, then `predict` on PNG files written from test
//! images answers as `--test-index` does, and so does (nearly always) a black-on-white enlarged
//! copy.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use mnist_data::testing::real_data_or_skip;

fn mnist(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mnist"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn real_mnist_predict_on_png_files_matches_test_index() {
    let Some(data) = real_data_or_skip("real_mnist_predict_on_png_files_matches_test_index") else {
        return;
    };
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let result = mnist(&[
        "train",
        "--model",
        "lenet5",
        "--epochs",
        "1",
        "--val-split",
        "0",
        "--data-dir",
        data,
        "--run-dir",
        run.to_str().unwrap(),
        "--json",
    ]);
    assert!(result["test_accuracy"].as_f64().unwrap() > 0.97, "{result}");
    let model = run.join("final.safetensors");
    let model = model.to_str().unwrap();

    let mut scans_agreeing = 0;
    for index in [0, 1, 2, 3, 4, 7, 11] {
        let png = dir.path().join(format!("test-{index}.png"));
        let png = png.to_str().unwrap();
        let by_index = mnist(&[
            "predict",
            "--model-file",
            model,
            "--data-dir",
            data,
            "--test-index",
            &index.to_string(),
            "--save-image",
            png,
            "--json",
        ]);
        let from_png = mnist(&["predict", "--model-file", model, png, "--json"]);
        assert_eq!(
            from_png[0]["predicted"], by_index[0]["predicted"],
            "test image {index}"
        );

        // The same digit as a scan would give it: dark ink on white, four times larger.
        let gray = image::open(png).unwrap().to_luma8();
        let mut paper =
            image::imageops::resize(&gray, 112, 112, image::imageops::FilterType::Triangle);
        image::imageops::invert(&mut paper);
        let scan = dir.path().join(format!("scan-{index}.png"));
        paper.save(&scan).unwrap();
        let from_scan = mnist(&[
            "predict",
            "--model-file",
            model,
            scan.to_str().unwrap(),
            "--json",
        ]);
        if from_scan[0]["predicted"] == by_index[0]["predicted"] {
            scans_agreeing += 1;
        } else {
            eprintln!("scan of test image {index}: {from_scan} vs {by_index}");
        }
    }
    // A scan is resampled, cropped and centred again: a digit the model finds ambiguous may
    // flip (test image 7, a 9 with an open loop, can read as a 4), so one in seven may differ.
    assert!(scans_agreeing >= 6, "{scans_agreeing} of 7 scans agree");
}
