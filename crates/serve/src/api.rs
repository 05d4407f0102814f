//! The routes: the page, predictions, the model's description, health and metrics; and what
//! every other request gets (a JSON error).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use ndarray::Array2;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ServeError;

/// `GET /`: the page, compiled into the binary.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("../page/index.html"))
}

/// `GET /healthz`: the server is up and its model thread answers.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus' text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /api/model`: the architecture, parameter counts, normalization and, when the model
/// file sits in a run directory, its training history.
pub async fn model(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(state.description.clone())
}

/// `POST /api/predict`: an image (`image/png`, `image/jpeg`) or `{"pixels": [...]}` in; the
/// digit, the ten probabilities, the 28x28 input the model saw and the model's name out.
pub async fn predict(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Prediction>, ServeError> {
    let image = request_image(&state, &headers, body).await?;
    let probabilities = state.batcher.predict(image.clone()).await?;
    let digit = argmax(&probabilities);
    state.metrics.prediction(digit);
    Ok(Json(Prediction {
        digit,
        probabilities,
        input: rows(&image.view()),
        model: state.name.clone(),
    }))
}

/// A prediction's answer, serialized straight from this type (the hot path of the API).
#[derive(serde::Serialize)]
pub struct Prediction {
    digit: usize,
    probabilities: Vec<f32>,
    input: Vec<Vec<u8>>,
    model: String,
}

/// `POST /api/explain`: the same input as a prediction; the prediction, every convolution's
/// feature maps, the first convolution's filters and the saliency map, as numbers the page
/// draws.
pub async fn explain(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ServeError> {
    let image = request_image(&state, &headers, body).await?;
    let explanation = state.batcher.explain(image.clone()).await?;
    Ok(Json(json!({
        "digit": argmax(&explanation.probabilities),
        "probabilities": explanation.probabilities,
        "input": rows(&image.view()),
        "model": state.name,
        "feature_maps": explanation.feature_maps,
        "filters": explanation.filters,
        "saliency": explanation.saliency,
    })))
}

/// `GET /api/test/{index}`: a test image (28x28 bytes) and its label, when the server has the
/// test set.
pub async fn test_image(
    State(state): State<Arc<AppState>>,
    Path(index): Path<String>,
) -> Result<Json<Value>, ServeError> {
    let test = state.test.as_ref().ok_or_else(no_test_set)?;
    let n = test.images.len();
    let index: usize = index.parse().ok().filter(|&i| i < n).ok_or_else(|| {
        ServeError::NotFound(format!("test image {index:.20}: there are {n}, 0..{n}"))
    })?;
    Ok(Json(json!({
        "index": index,
        "label": test.images.labels()[index],
        "pixels": rows(&test.images.image(index)),
    })))
}

/// `GET /api/mistakes`: the model's most confident mistakes on the test set, most confident
/// first, with their images.
pub async fn mistakes(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ServeError> {
    let test = state.test.as_ref().ok_or_else(no_test_set)?;
    let mistakes: Vec<Value> = test
        .mistakes
        .iter()
        .map(|m| {
            json!({
                "index": m.index,
                "label": m.label,
                "predicted": m.predicted,
                "confidence": m.confidence,
                "pixels": rows(&test.images.image(m.index)),
            })
        })
        .collect();
    Ok(Json(
        json!({"accuracy": test.accuracy, "mistakes": mistakes}),
    ))
}

fn no_test_set() -> ServeError {
    ServeError::NotFound("no test set: start the server with --data-dir".into())
}

/// Any other path.
pub async fn not_found(State(state): State<Arc<AppState>>, uri: Uri) -> ServeError {
    let error = ServeError::NotFound(uri.path().chars().take(200).collect());
    state
        .metrics
        .request("unmatched", error.status().as_u16(), Default::default());
    error
}

/// A known path with another method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ServeError {
    ServeError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().chars().take(200).collect(),
    }
}

/// Times every routed request and counts it by route pattern and status.
pub async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    state
        .metrics
        .request(&route, response.status().as_u16(), started.elapsed());
    response
}

/// The 28x28 image a prediction or explanation request carries.
async fn request_image(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Array2<u8>, ServeError> {
    let bytes = read_body(state, body).await?;
    input_image(headers, bytes).await
}

/// The most probable class.
fn argmax(probabilities: &[f32]) -> usize {
    probabilities
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// An image as rows of bytes, as JSON carries it.
fn rows(image: &ndarray::ArrayView2<'_, u8>) -> Vec<Vec<u8>> {
    image.outer_iter().map(|r| r.to_vec()).collect()
}

/// The body, at most the limit, within the request timeout.
async fn read_body(state: &AppState, body: Body) -> Result<axum::body::Bytes, ServeError> {
    let limit = state.limits.body_bytes;
    match tokio::time::timeout(
        state.limits.request_timeout,
        axum::body::to_bytes(body, limit),
    )
    .await
    {
        Err(_) => Err(ServeError::Timeout(state.limits.request_timeout.as_secs())),
        // A body stream fails only past the limit or when the client goes away, and then
        // nobody reads the answer.
        Ok(Err(_)) => Err(ServeError::TooLarge(limit)),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// The 28x28 image a request carries, by its content type.
async fn input_image(
    headers: &HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Array2<u8>, ServeError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match content_type.as_str() {
        "image/png" | "image/jpeg" | "image/jpg" => {
            // Decoding and cleaning take milliseconds of CPU: off the async workers.
            tokio::task::spawn_blocking(move || mnist_data::decode_digit(&bytes))
                .await
                .map_err(|e| ServeError::Internal(e.to_string()))?
                .map_err(|problem| ServeError::BadRequest(format!("the image: {problem}")))
        }
        "application/json" => pixels(&bytes),
        "" => Err(ServeError::UnsupportedType(
            "no Content-Type: send image/png, image/jpeg or application/json".into(),
        )),
        other => Err(ServeError::UnsupportedType(format!(
            "Content-Type {:?} is not taken here: send image/png, image/jpeg or \
             application/json",
            other.chars().take(100).collect::<String>()
        ))),
    }
}

/// `{"pixels": [...]}`: 784 values, or 28 rows of 28, each 0-255, row-major, white ink on
/// black as in MNIST (taken as the model's input, without the cleaning images get).
fn pixels(bytes: &[u8]) -> Result<Array2<u8>, ServeError> {
    // The common case, 784 numbers in range, parsed straight into numbers; anything else
    // goes the slower way below, which says exactly what is wrong.
    #[derive(serde::Deserialize)]
    struct Flat {
        pixels: Vec<f64>,
    }
    if let Ok(Flat { pixels }) = serde_json::from_slice::<Flat>(bytes)
        && pixels.len() == 784
        && pixels.iter().all(|v| (0.0..=255.0).contains(v))
    {
        return Ok(Array2::from_shape_fn((28, 28), |(r, c)| {
            pixels[r * 28 + c].round() as u8
        }));
    }
    let expected = "expected {\"pixels\": [...]} with 784 values 0-255, or 28 rows of 28";
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ServeError::BadRequest(format!("the body is not JSON ({e}); {expected}")))?;
    let Some(Value::Array(items)) = value.get("pixels") else {
        return Err(ServeError::BadRequest(expected.into()));
    };
    let flat: Vec<&Value> = if items.len() == 28 && items.iter().all(Value::is_array) {
        let mut flat = Vec::with_capacity(784);
        for (r, row) in items.iter().enumerate() {
            let row = row.as_array().map_or(&[][..], Vec::as_slice);
            if row.len() != 28 {
                return Err(ServeError::BadRequest(format!(
                    "row {r} has {} values, not 28; {expected}",
                    row.len()
                )));
            }
            flat.extend(row);
        }
        flat
    } else {
        items.iter().collect()
    };
    if flat.len() != 784 {
        return Err(ServeError::BadRequest(format!(
            "{} values, not 784; {expected}",
            flat.len()
        )));
    }
    let mut image = Array2::<u8>::zeros((28, 28));
    for (i, (slot, value)) in image.iter_mut().zip(flat).enumerate() {
        match value.as_f64() {
            Some(v) if (0.0..=255.0).contains(&v) => *slot = v.round() as u8,
            _ => {
                return Err(ServeError::BadRequest(format!(
                    "pixel {i} is {}: every value must be a number from 0 to 255",
                    value.to_string().chars().take(40).collect::<String>()
                )));
            }
        }
    }
    Ok(image)
}
