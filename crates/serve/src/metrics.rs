//! Counters and a latency histogram in Prometheus' text exposition format: requests by route
//! and status, request duration, predictions by digit. Labels take only the server's own route
//! patterns and status codes, never anything a client sent, so their number stays small.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by (route pattern, status code).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Cumulative bucket counts, one per bound in [`BUCKETS`].
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    /// Total seconds, in microseconds.
    latency_sum_micros: AtomicU64,
    /// Predictions by predicted digit.
    predictions: [AtomicU64; 10],
    /// Forward passes of the model thread (each one batch).
    batches: AtomicU64,
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route.to_string(), status)).or_insert(0) += 1;
        }
        let seconds = took.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.latency_buckets) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records one forward pass over a batch.
    pub fn batch(&self) {
        self.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one prediction of `digit`.
    pub fn prediction(&self, digit: usize) {
        if let Some(count) = self.predictions.get(digit) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Everything, in Prometheus' text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP http_requests_total Requests answered, by route and status.\n\
             # TYPE http_requests_total counter"
        );
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), n) in requests.iter() {
                let _ = writeln!(
                    out,
                    "http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP http_request_duration_seconds Time from a request's arrival to its answer.\n\
             # TYPE http_request_duration_seconds histogram"
        );
        for (bound, count) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             http_request_duration_seconds_sum {}\n\
             http_request_duration_seconds_count {count}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP predictions_total Predictions answered, by predicted digit.\n\
             # TYPE predictions_total counter"
        );
        for (digit, n) in self.predictions.iter().enumerate() {
            let _ = writeln!(
                out,
                "predictions_total{{digit=\"{digit}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP prediction_batches_total Forward passes, each over a batch of requests.\n\
             # TYPE prediction_batches_total counter\n\
             prediction_batches_total {}",
            self.batches.load(Ordering::Relaxed)
        );
        out
    }
}
