//! The HTTP server behind `mnist serve`: a page to draw a digit on, and a JSON API that answers
//! predictions under load, batching concurrent requests into one forward pass.
//!
//! Routes: `GET /` (the page), `POST /api/predict`, `POST /api/explain`, `GET /api/model`,
//! `GET /healthz`,
//! `GET /metrics` (Prometheus). Every error is a 4xx (the client's) or 5xx (ours) with a JSON
//! body `{"error": "..."}`. Images go through `mnist_data::decode_digit`, the one preprocessing
//! `mnist predict` uses too, with its limits checked before decoding.
//!
//! Architecture invariant: [`router`] builds the whole service from an [`AppState`], with no
//! socket, so tests drive it in-process; [`serve`] only adds the connections (hyper's HTTP/1
//! with a header-read timeout and a cap on open connections) and the graceful shutdown.

mod api;
mod batcher;
mod error;
mod metrics;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use mnist_data::{LabeledImages, Normalization};
use nn::Sequential;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::limit::ConcurrencyLimitLayer;
use tower_http::compression::CompressionLayer;

pub use batcher::{BatchPolicy, Batcher, Explanation, Tiles};
pub use error::ServeError;
pub use metrics::Metrics;

/// What the server accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest request body, in bytes.
    pub body_bytes: usize,
    /// How long a client may take to send its body.
    pub request_timeout: Duration,
    /// Requests handled at once; more wait for a slot.
    pub concurrency: usize,
    /// Connections open at once; more wait in the listen queue.
    pub connections: usize,
    /// How predictions are batched.
    pub batch: BatchPolicy,
}

impl Default for Limits {
    /// 8 MiB bodies, 10 s to send headers or a body, 512 requests and 1024 connections at
    /// once, [`BatchPolicy::default`].
    fn default() -> Self {
        Limits {
            body_bytes: 8 << 20,
            request_timeout: Duration::from_secs(10),
            concurrency: 512,
            connections: 1024,
            batch: BatchPolicy::default(),
        }
    }
}

/// Everything the routes share.
#[derive(Debug)]
pub struct AppState {
    /// The model's name, in every prediction.
    pub name: String,
    /// What `GET /api/model` answers.
    pub description: Value,
    /// The way to the model thread.
    pub batcher: Batcher,
    /// Counters for `/metrics`, shared with the model thread.
    pub metrics: Arc<Metrics>,
    /// What requests may be.
    pub limits: Limits,
    /// The test set, when the server was given one: for test images and the mistakes view.
    pub test: Option<TestSet>,
}

/// A labelled test set and the model's most confident mistakes on it.
#[derive(Debug)]
pub struct TestSet {
    /// The images and labels.
    pub images: LabeledImages,
    /// The most confident mistakes, most confident first.
    pub mistakes: Vec<Mistake>,
    /// The model's accuracy on the whole set.
    pub accuracy: f32,
}

/// One test image the model gets wrong.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Mistake {
    /// Its index in the test set.
    pub index: usize,
    /// The true class.
    pub label: usize,
    /// The predicted class.
    pub predicted: usize,
    /// The predicted class's probability.
    pub confidence: f32,
}

/// How many mistakes the mistakes view shows.
const MISTAKES_SHOWN: usize = 36;

impl TestSet {
    /// Runs `model` over every image of `images` and keeps its most confident mistakes.
    fn new(
        model: &mut Sequential,
        normalization: &Normalization,
        images: LabeledImages,
    ) -> Result<TestSet, ServeError> {
        let mut mistakes = Vec::new();
        let mut right = 0;
        let batches = mnist_data::Batches::new(
            &images,
            1000,
            mnist_data::BatchOrder::Sequential,
            normalization,
        )
        .map_err(|e| ServeError::Internal(e.to_string()))?;
        let mut index = 0;
        for batch in batches {
            let logits = model
                .forward(batch.images, nn::Mode::Eval)
                .map_err(|e| ServeError::Internal(e.to_string()))?;
            let mut p = ndarray::Array2::zeros(logits.raw_dim());
            tensor::softmax(logits.view(), ndarray::Axis(1), p.view_mut())
                .map_err(|e| ServeError::Internal(e.to_string()))?;
            for (row, &label) in p.outer_iter().zip(batch.labels.iter()) {
                let (predicted, confidence) = row
                    .iter()
                    .copied()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap_or((0, 0.0));
                if predicted == usize::from(label) {
                    right += 1;
                } else {
                    mistakes.push(Mistake {
                        index,
                        label: usize::from(label),
                        predicted,
                        confidence,
                    });
                }
                index += 1;
            }
        }
        mistakes.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
        mistakes.truncate(MISTAKES_SHOWN);
        Ok(TestSet {
            accuracy: right as f32 / images.len().max(1) as f32,
            images,
            mistakes,
        })
    }
}

impl AppState {
    /// The state for `model`, loaded from `model_file` (whose run directory's `history.csv`,
    /// when there is one, is served as its training history). The model must take 28x28 grey
    /// images, the form every input is brought to.
    pub fn new(
        model: Sequential,
        normalization: Normalization,
        model_file: &Path,
        limits: Limits,
    ) -> Result<Arc<AppState>, ServeError> {
        AppState::with_test_set(model, normalization, model_file, limits, None)
    }

    /// [`AppState::new`], with a test set for `GET /api/test/{index}` and `GET /api/mistakes`
    /// (the model is run over all of it once, here).
    pub fn with_test_set(
        mut model: Sequential,
        normalization: Normalization,
        model_file: &Path,
        limits: Limits,
        test: Option<LabeledImages>,
    ) -> Result<Arc<AppState>, ServeError> {
        let spec = model.spec().clone();
        if spec.input != [1, 28, 28] {
            return Err(ServeError::Internal(format!(
                "{} takes {:?} inputs; the server brings every image to MNIST's 1x28x28",
                spec.name, spec.input
            )));
        }
        let counts = model.param_counts();
        let history = model_file
            .parent()
            .map(|dir| dir.join("history.csv"))
            .and_then(|path| std::fs::read_to_string(path).ok())
            .map(|csv| history_rows(&csv));
        let test = match test {
            Some(images) if images.rows() == 28 && images.cols() == 28 => {
                Some(TestSet::new(&mut model, &normalization, images)?)
            }
            _ => None,
        };
        let description = json!({
            "name": spec.name,
            "spec": spec,
            "summary": nn::summary(&spec, 0).unwrap_or_default(),
            "parameters": {"trainable": counts.trainable, "non_trainable": counts.non_trainable},
            "normalization": {"mean": normalization.mean, "std": normalization.std},
            "history": history,
            "test_images": test.as_ref().map(|t| t.images.len()),
            "test_accuracy": test.as_ref().map(|t| t.accuracy),
        });
        let metrics = Arc::new(Metrics::default());
        let batcher = Batcher::start(model, normalization, limits.batch, metrics.clone())?;
        Ok(Arc::new(AppState {
            name: spec.name,
            description,
            batcher,
            metrics,
            limits,
            test,
        }))
    }
}

/// `history.csv` as one JSON object per epoch, numbers where the cells are numbers.
fn history_rows(csv: &str) -> Value {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    Value::Array(
        lines
            .map(|line| {
                let row = header
                    .iter()
                    .zip(line.split(','))
                    .map(|(key, cell)| {
                        let value = cell
                            .parse::<f64>()
                            .ok()
                            .and_then(serde_json::Number::from_f64)
                            .map_or(Value::String(cell.to_string()), Value::Number);
                        (key.to_string(), value)
                    })
                    .collect();
                Value::Object(row)
            })
            .collect(),
    )
}

/// The whole service: routes, metrics, errors as JSON, a cap on requests in flight.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(api::page))
        .route("/api/predict", post(api::predict))
        // Gzip for clients that ask (browsers do): the tiles shrink several times. Only here:
        // on /api/predict's small answers the layer cost 10% of the throughput.
        .route(
            "/api/explain",
            post(api::explain).layer(CompressionLayer::new()),
        )
        .route("/api/model", get(api::model))
        .route("/api/test/{index}", get(api::test_image))
        .route("/api/mistakes", get(api::mistakes))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::track,
        ))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(ConcurrencyLimitLayer::new(state.limits.concurrency.max(1)))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes; then stops accepting, and
/// requests in flight finish (for at most the request timeout). Each connection must send its
/// headers within the request timeout, and at most `limits.connections` are open at once
/// (more wait in the listen queue).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.limits;
    let service = TowerToHyperService::new(router(state));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection that failed before it was accepted (reset, too many open
                // files): the listener itself is fine.
                Err(_) => continue,
            },
            () = &mut shutdown => break,
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        let connection = builder.serve_connection(TokioIo::new(stream), service.clone());
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that breaks its connection is the client's affair.
            let _ = connection.await;
            drop(slot);
        });
    }
    let _ = tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await;
    Ok(())
}

/// The size of each connection's read buffer, in bytes: a bound on what one connection holds
/// while its request head arrives (hyper answers a head it cannot fit with 431).
const MAX_HEADER_BYTES: usize = 64 << 10;
