//! The API driven in-process (`tower::ServiceExt::oneshot`, no socket): predictions from JSON
//! pixels and from images agree with the model's own forward pass, concurrent requests batched
//! together get their own answers, and every bad request gets a 4xx with a JSON message.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use mnist_data::Normalization;
use ndarray::{Array2, Axis};
use nn::{Mode, Sequential, preset};
use serde_json::{Value, json};
use tower::ServiceExt;

const NORMALIZATION: Normalization = Normalization {
    mean: 0.1307,
    std: 0.3081,
};

fn model() -> Sequential {
    Sequential::new(preset("lenet5").unwrap(), 3).unwrap()
}

fn state() -> Arc<serve::AppState> {
    let dir = tempfile::tempdir().unwrap();
    serve::AppState::new(
        model(),
        NORMALIZATION,
        &dir.path().join("m.safetensors"),
        serve::Limits::default(),
    )
    .unwrap()
}

/// A 28x28 test pattern: a slanted stroke, different for each `seed`.
fn digit(seed: usize) -> Array2<u8> {
    Array2::from_shape_fn((28, 28), |(r, c)| {
        let on =
            (4..24).contains(&r) && (c as i64 - 8 - (seed % 10) as i64 - (r / 4) as i64).abs() < 2;
        if on { 250 } else { 0 }
    })
}

/// The model's own probabilities for `image`, computed as `mnist predict` does.
fn expected(image: &Array2<u8>) -> Vec<f32> {
    let x = image
        .mapv(|p| NORMALIZATION.apply(p))
        .into_shape_with_order((1, 1, 28, 28))
        .unwrap();
    let logits = model().forward(x, Mode::Eval).unwrap();
    let mut p = Array2::zeros(logits.raw_dim());
    tensor::softmax(logits.view(), Axis(1), p.view_mut()).unwrap();
    p.row(0).to_vec()
}

async fn call(
    state: &Arc<serve::AppState>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(t) = content_type {
        request = request.header(header::CONTENT_TYPE, t);
    }
    let response = serve::router(state.clone())
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

fn json_body(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

fn pixels_request(image: &Array2<u8>, nested: bool) -> Vec<u8> {
    let value = if nested {
        json!({"pixels": image.outer_iter().map(|r| r.to_vec()).collect::<Vec<_>>()})
    } else {
        json!({"pixels": image.iter().copied().collect::<Vec<_>>()})
    };
    value.to_string().into_bytes()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
}

#[tokio::test]
async fn json_pixels_flat_or_nested_give_the_models_own_probabilities() {
    let state = state();
    for nested in [false, true] {
        let image = digit(3);
        let (status, body) = call(
            &state,
            "POST",
            "/api/predict",
            Some("application/json"),
            pixels_request(&image, nested),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let answer = json_body(&body);
        let probabilities: Vec<f32> =
            serde_json::from_value(answer["probabilities"].clone()).unwrap();
        let want = expected(&image);
        assert!(
            close(&probabilities, &want),
            "{probabilities:?} vs {want:?}"
        );
        let argmax = want
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(answer["digit"], argmax);
        assert_eq!(answer["model"], "lenet5");
        assert_eq!(answer["input"][10][12], image[(10, 12)]);
    }
}

#[tokio::test]
async fn a_png_goes_through_the_same_preprocessing_as_predict() {
    let state = state();
    // Dark ink on light paper, larger than 28x28: cleaned and centred first.
    let paper = image::GrayImage::from_fn(90, 120, |x, y| {
        image::Luma([if (40..50).contains(&x) && (15..105).contains(&y) {
            20
        } else {
            235
        }])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    paper.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    let (status, body) = call(
        &state,
        "POST",
        "/api/predict",
        Some("image/png"),
        png.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer = json_body(&body);
    let seen = mnist_data::decode_digit(&png).unwrap();
    assert_eq!(answer["input"][14][14], seen[(14, 14)]);
    let probabilities: Vec<f32> = serde_json::from_value(answer["probabilities"].clone()).unwrap();
    assert!(close(&probabilities, &expected(&seen)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
    // A wait long enough that the 64 requests meet in batches however the threads run.
    let dir = tempfile::tempdir().unwrap();
    let limits = serve::Limits {
        batch: serve::BatchPolicy {
            max_wait: std::time::Duration::from_millis(50),
            ..serve::BatchPolicy::default()
        },
        ..serve::Limits::default()
    };
    let state = serve::AppState::new(
        model(),
        NORMALIZATION,
        &dir.path().join("m.safetensors"),
        limits,
    )
    .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let state = state.clone();
            tokio::spawn(async move {
                let image = digit(i);
                let (status, body) = call(
                    &state,
                    "POST",
                    "/api/predict",
                    Some("application/json"),
                    pixels_request(&image, false),
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                let answer = json_body(&body);
                let got: Vec<f32> =
                    serde_json::from_value(answer["probabilities"].clone()).unwrap();
                (image, got)
            })
        })
        .collect();
    for task in tasks {
        let (image, got) = task.await.unwrap();
        assert!(close(&got, &expected(&image)));
    }
    let (_, metrics) = call(&state, "GET", "/metrics", None, vec![]).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("http_requests_total{route=\"/api/predict\",status=\"200\"} 64"),
        "{metrics}"
    );
    // Fewer forward passes than requests: they were batched.
    let batches: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("prediction_batches_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..64).contains(&batches),
        "{batches} batches for 64 requests"
    );
}

/// A 4 KB PNG whose header claims `side` x `side` grey pixels: a decompression bomb.
fn png_bomb(side: u32) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..200 {
        std::io::Write::write_all(&mut encoder, &vec![0u8; side as usize + 1]).unwrap();
    }
    let idat = encoder.finish().unwrap();
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(&body);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc.sum().to_be_bytes());
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

/// (method, path, content type, body, the status it must get, what its message must say)
type BadRequest = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn every_bad_request_gets_a_4xx_and_a_json_message() {
    let state = state();
    let blank = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::from_pixel(60, 60, image::Luma([250]))
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        png.into_inner()
    };
    let cases: Vec<BadRequest> = vec![
        (
            "POST",
            "/api/predict",
            Some("image/png"),
            png_bomb(20_000),
            StatusCode::BAD_REQUEST,
            "refused before decoding",
        ),
        (
            "POST",
            "/api/predict",
            Some("application/json"),
            b"{\"pixels\": [1, 2]}".to_vec(),
            StatusCode::BAD_REQUEST,
            "2 values, not 784",
        ),
        (
            "POST",
            "/api/predict",
            Some("application/json"),
            json!({"pixels": vec![300; 784]}).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "pixel 0 is 300",
        ),
        (
            "POST",
            "/api/predict",
            Some("application/json"),
            json!({"pixels": vec!["a"; 784]}).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "must be a number from 0 to 255",
        ),
        (
            "POST",
            "/api/predict",
            Some("application/json"),
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "not JSON",
        ),
        (
            "POST",
            "/api/predict",
            Some("application/json"),
            b"{\"picture\": 1}".to_vec(),
            StatusCode::BAD_REQUEST,
            "expected {\"pixels\"",
        ),
        (
            "POST",
            "/api/predict",
            Some("image/png"),
            b"\x89PNG garbage".to_vec(),
            StatusCode::BAD_REQUEST,
            "not a PNG or JPEG",
        ),
        (
            "POST",
            "/api/predict",
            Some("image/png"),
            blank,
            StatusCode::BAD_REQUEST,
            "blank",
        ),
        (
            "POST",
            "/api/predict",
            Some("text/plain"),
            b"7".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "is not taken here",
        ),
        (
            "POST",
            "/api/predict",
            None,
            b"7".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "no Content-Type",
        ),
        (
            "POST",
            "/api/predict",
            Some("image/png"),
            vec![0; 9 << 20],
            StatusCode::PAYLOAD_TOO_LARGE,
            "over the limit of 8388608 bytes",
        ),
        (
            "GET",
            "/api/predict",
            None,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method GET is not allowed",
        ),
        (
            "GET",
            "/no/such/thing",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "no such route",
        ),
    ];
    for (method, path, content_type, body, status, needle) in cases {
        let (got, answer) = call(&state, method, path, content_type, body).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(got, status, "{method} {path}: {text}");
        let error = json_body(&answer)["error"].as_str().unwrap().to_string();
        assert!(error.contains(needle), "{method} {path}: {error}");
    }
    // And the server answers afterwards.
    let (status, _) = call(
        &state,
        "POST",
        "/api/predict",
        Some("application/json"),
        pixels_request(&digit(1), false),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_page_the_model_health_and_metrics_are_served() {
    let state = state();
    let (status, page) = call(&state, "GET", "/", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&page).contains("<canvas id=\"pad\""));
    let (status, health) = call(&state, "GET", "/healthz", None, vec![]).await;
    assert_eq!(
        (status, json_body(&health)["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let (_, model) = call(&state, "GET", "/api/model", None, vec![]).await;
    let model = json_body(&model);
    assert_eq!(model["parameters"]["trainable"], 61_706);
    assert!(
        model["summary"]
            .as_str()
            .unwrap()
            .contains("Total params: 61,706")
    );
    // Every line of /metrics is a comment or `name{labels} value` with a number.
    let (_, metrics) = call(&state, "GET", "/metrics", None, vec![]).await;
    let metrics = String::from_utf8(metrics).unwrap();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(
        metrics.contains("http_requests_total{route=\"/healthz\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("http_request_duration_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test]
async fn explain_gives_the_prediction_every_convolutions_maps_and_the_first_filters() {
    let dir = tempfile::tempdir().unwrap();
    let model = Sequential::new(preset("two-conv").unwrap(), 2).unwrap();
    let state = serve::AppState::new(
        model,
        NORMALIZATION,
        &dir.path().join("m.safetensors"),
        serve::Limits::default(),
    )
    .unwrap();
    let image = digit(5);
    let body = pixels_request(&image, false);
    let (status, explained) = call(
        &state,
        "POST",
        "/api/explain",
        Some("application/json"),
        body.clone(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&explained)
    );
    let explained = json_body(&explained);
    let (_, predicted) = call(
        &state,
        "POST",
        "/api/predict",
        Some("application/json"),
        body,
    )
    .await;
    let predicted = json_body(&predicted);
    let a: Vec<f32> = serde_json::from_value(explained["probabilities"].clone()).unwrap();
    let b: Vec<f32> = serde_json::from_value(predicted["probabilities"].clone()).unwrap();
    assert!(close(&a, &b), "{a:?} vs {b:?}");
    assert_eq!(explained["digit"], predicted["digit"]);
    let maps = explained["feature_maps"].as_array().unwrap();
    let shapes: Vec<(u64, u64, u64, u64)> = maps
        .iter()
        .map(|m| {
            let v = |k: &str| m[k].as_u64().unwrap();
            (v("layer"), v("channels"), v("height"), v("width"))
        })
        .collect();
    // Each convolution's maps after its ReLU (layers 1 and 4 of two-conv).
    assert_eq!(shapes, [(0, 32, 26, 26), (3, 64, 11, 11)]);
    assert_eq!(maps[1]["values"][63].as_array().unwrap().len(), 121);
    let filters = &explained["filters"];
    assert_eq!(
        (filters["channels"].as_u64(), filters["height"].as_u64()),
        (Some(32), Some(3))
    );
    // The saliency of the predicted class over the 28x28 input, from the backward pass.
    let saliency = &explained["saliency"];
    assert_eq!(
        (saliency["height"].as_u64(), saliency["width"].as_u64()),
        (Some(28), Some(28))
    );
    let mut model = Sequential::new(preset("two-conv").unwrap(), 2).unwrap();
    let x = image
        .mapv(|p| NORMALIZATION.apply(p))
        .into_shape_with_order((1, 1, 28, 28))
        .unwrap();
    let class = explained["digit"].as_u64().unwrap() as usize;
    let gradient = model.input_gradient(x, class).unwrap().mapv(f32::abs);
    let strongest = gradient
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(saliency["values"][0][strongest], 255);
    // Each tile is scaled to its own range: some pixel is 255 wherever the map is not flat.
    assert!(
        maps[0]["values"]
            .as_array()
            .unwrap()
            .iter()
            .any(|tile| tile.as_array().unwrap().contains(&json!(255)))
    );
}

#[tokio::test]
async fn test_images_and_the_most_confident_mistakes_come_from_the_test_set() {
    let n = 50;
    let images = ndarray::Array3::from_shape_fn((n, 28, 28), |(i, r, c)| digit(i)[(r, c)]);
    let labels = ndarray::Array1::from_shape_fn(n, |i| (i % 10) as u8);
    let test = mnist_data::LabeledImages::new(images, labels).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = serve::AppState::with_test_set(
        model(),
        NORMALIZATION,
        &dir.path().join("m.safetensors"),
        serve::Limits::default(),
        Some(test),
    )
    .unwrap();
    let (status, image) = call(&state, "GET", "/api/test/13", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let image = json_body(&image);
    assert_eq!(image["label"], 3);
    assert_eq!(image["pixels"][10][12], digit(13)[(10, 12)]);
    let (status, missing) = call(&state, "GET", "/api/test/50", None, vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        json_body(&missing)["error"]
            .as_str()
            .unwrap()
            .contains("there are 50")
    );

    let (_, answer) = call(&state, "GET", "/api/mistakes", None, vec![]).await;
    let answer = json_body(&answer);
    let mistakes = answer["mistakes"].as_array().unwrap();
    // An untrained model is wrong about most of them; the view keeps the 36 surest.
    let accuracy = answer["accuracy"].as_f64().unwrap();
    assert_eq!(
        mistakes.len(),
        ((1.0 - accuracy) * n as f64).round().min(36.0) as usize
    );
    let confidences: Vec<f64> = mistakes
        .iter()
        .map(|m| m["confidence"].as_f64().unwrap())
        .collect();
    assert!(
        confidences.windows(2).all(|w| w[0] >= w[1]),
        "{confidences:?}"
    );
    for m in mistakes {
        assert_ne!(m["label"], m["predicted"]);
        let index = m["index"].as_u64().unwrap() as usize;
        assert_eq!(m["label"], index % 10);
        let want = expected(&digit(index));
        let best = want.iter().copied().fold(0.0f32, f32::max);
        assert!((m["confidence"].as_f64().unwrap() as f32 - best).abs() < 1e-5);
    }
    // Without a test set, both say how to get one.
    let (status, none) = call(&self::state(), "GET", "/api/mistakes", None, vec![]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        json_body(&none)["error"]
            .as_str()
            .unwrap()
            .contains("--data-dir")
    );
}

#[tokio::test]
async fn answers_are_gzipped_for_clients_that_ask() {
    let state = state();
    let body = pixels_request(&digit(2), false);
    let ask = |gzip: bool| {
        let mut request = Request::builder()
            .method("POST")
            .uri("/api/explain")
            .header(header::CONTENT_TYPE, "application/json");
        if gzip {
            request = request.header(header::ACCEPT_ENCODING, "gzip");
        }
        request.body(Body::from(body.clone())).unwrap()
    };
    let plain = serve::router(state.clone())
        .oneshot(ask(false))
        .await
        .unwrap();
    let zipped = serve::router(state.clone())
        .oneshot(ask(true))
        .await
        .unwrap();
    assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
    assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
    let size = |r: axum::response::Response| async {
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .len()
    };
    let (plain, zipped) = (size(plain).await, size(zipped).await);
    assert!(zipped * 2 < plain, "{zipped} bytes gzipped, {plain} plain");
}
