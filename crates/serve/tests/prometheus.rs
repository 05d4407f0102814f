//! `/metrics` parsed by the Prometheus client library's text parser (`prometheus_client`, in
//! the virtual environment `.ci/run` makes at `target/onnx-venv`, or `ONNX_PYTHON`). Without it
//! the test says SKIPPED loudly and passes, unless `MNIST_REQUIRE_ONNX` is set, as CI sets it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use axum::body::Body;
use axum::http::{Request, header};
use tower::ServiceExt;

fn python() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("ONNX_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/onnx-venv/bin/python")])
        .collect();
    let found = candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let required = std::env::var("MNIST_REQUIRE_ONNX").is_ok_and(|v| v != "0");
        assert!(
            !required,
            "no Python with prometheus_client, and MNIST_REQUIRE_ONNX is set"
        );
        eprintln!(
            "\n*** SKIPPED the Prometheus parser test: no Python with prometheus_client ***\n"
        );
    }
    found
}

#[tokio::test]
async fn metrics_parse_with_prometheus_own_parser() {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = serve::AppState::new(
        nn::Sequential::new(nn::preset("lenet5").unwrap(), 1).unwrap(),
        mnist_data::Normalization {
            mean: 0.13,
            std: 0.31,
        },
        &dir.path().join("m.safetensors"),
        serve::Limits::default(),
    )
    .unwrap();
    // Some traffic first: a prediction, a bad request, an unknown route.
    let pixels = serde_json::json!({"pixels": vec![0; 784]}).to_string();
    for (method, uri, body) in [
        ("POST", "/api/predict", pixels.clone()),
        ("POST", "/api/predict", "{}".to_string()),
        ("GET", "/nowhere", String::new()),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        serve::router(state.clone()).oneshot(request).await.unwrap();
    }
    let response = serve::router(state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let output = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parse_metrics.py"))
        .arg(&file)
        .output()
        .unwrap();
    let families = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&text)
    );
    println!("{families}");
    for family in [
        "http_requests counter 3",
        "http_request_duration_seconds histogram",
        "predictions counter 10",
        "prediction_batches counter 1",
    ] {
        assert!(families.contains(family), "{family:?} not in\n{families}");
    }
}
