//! Throughput of the reference presets, as `cargo xtask bench` reports it: training images per
//! second (and the epoch that implies), inference images per second at batch 1000, single-image
//! latency, and the process's peak resident memory.

use std::time::Instant;

use mnist_data::{BatchOrder, Batches, LabeledImages, Normalization};
use nn::{Mode, Optimizer, Rule, Sequential, Targets, preset, softmax_cross_entropy};
use serde::Serialize;

use crate::error::TrainError;

/// A preset with the hyper-parameters its tutorial trains it with.
#[derive(Clone, Copy, Debug)]
pub struct BenchCase {
    /// Preset name.
    pub model: &'static str,
    /// Update rule.
    pub rule: Rule,
    /// Learning rate.
    pub learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: usize,
}

/// The cases of issue 6's table: two-conv (Adam, batch 64), lenet5 (SGD, batch 64), one-conv
/// (SGD, batch 32).
pub fn bench_cases() -> Vec<BenchCase> {
    vec![
        BenchCase {
            model: "two-conv",
            rule: Rule::adam(),
            learning_rate: 1e-3,
            batch_size: 64,
        },
        BenchCase {
            model: "lenet5",
            rule: Rule::sgd(0.9),
            learning_rate: 0.01,
            batch_size: 64,
        },
        BenchCase {
            model: "one-conv",
            rule: Rule::sgd(0.0),
            learning_rate: 0.01,
            batch_size: 32,
        },
    ]
}

/// What one case measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Preset name.
    pub model: String,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Training throughput after warm-up.
    pub train_images_per_second: f64,
    /// 60,000 images at that throughput.
    pub projected_epoch_seconds: f64,
    /// Evaluation-mode throughput in batches of 1000.
    pub inference_images_per_second: f64,
    /// Median time of one single-image forward pass, in milliseconds.
    pub latency_ms: f64,
}

/// Measures one case on `train` and `test` images: `batches` training steps after `warmup`.
pub fn bench(
    case: &BenchCase,
    train: &LabeledImages,
    test: &LabeledImages,
    normalization: &Normalization,
    warmup: usize,
    batches: usize,
) -> Result<BenchResult, TrainError> {
    let spec =
        preset(case.model).ok_or_else(|| nn::NnError::Spec(format!("no preset {}", case.model)))?;
    let mut model = Sequential::new(spec, 1)?;
    let mut optimizer = Optimizer::new(case.rule, case.learning_rate)?;
    let order = BatchOrder::Shuffled { seed: 1, epoch: 0 };
    let mut all = Batches::new(train, case.batch_size, order, normalization)?;
    let mut step = |model: &mut Sequential| -> Result<usize, TrainError> {
        let batch = all.next().ok_or_else(|| {
            mnist_data::DataError::InvalidArgument(
                "too few training images for the benchmark".into(),
            )
        })?;
        let n = batch.len();
        model.zero_grad();
        let logits = model.forward(batch.images, Mode::Train)?;
        let out = softmax_cross_entropy(logits.view(), Targets::Classes(batch.labels.view()), 0.0)?;
        model.backward(out.grad)?;
        optimizer.step(model)?;
        Ok(n)
    };
    for _ in 0..warmup {
        step(&mut model)?;
    }
    let start = Instant::now();
    let mut images = 0;
    for _ in 0..batches {
        images += step(&mut model)?;
    }
    let train_ips = images as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut seen = 0;
    for batch in Batches::new(test, 1000, BatchOrder::Sequential, normalization)? {
        seen += batch.len();
        std::hint::black_box(model.forward(batch.images, Mode::Eval)?);
    }
    let inference_ips = seen as f64 / start.elapsed().as_secs_f64();

    let one = Batches::new(test, 1, BatchOrder::Sequential, normalization)?.next();
    let mut times = Vec::new();
    if let Some(one) = one {
        for _ in 0..20 {
            std::hint::black_box(model.forward(one.images.clone(), Mode::Eval)?);
        }
        for _ in 0..200 {
            let start = Instant::now();
            std::hint::black_box(model.forward(one.images.clone(), Mode::Eval)?);
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        model: case.model.to_string(),
        batch_size: case.batch_size,
        train_images_per_second: train_ips,
        projected_epoch_seconds: 60_000.0 / train_ips,
        inference_images_per_second: inference_ips,
        latency_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
    })
}

/// The process's peak resident memory in MB (Linux `VmHWM`), when the system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
