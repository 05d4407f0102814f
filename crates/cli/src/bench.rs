//! Throughput of the reference presets, as `cargo xtask bench` reports it: training images per
//! second (and the epoch that implies), inference images per second at batch 1000, single-image
//! latency, and the process's peak resident memory.

use std::time::{Duration, Instant};

use mnist_data::{BatchOrder, Batches, LabeledImages, Normalization};
use nn::{Mode, ModelSpec, Optimizer, Rule, Sequential};
use serde::Serialize;

use crate::error::TrainError;
use crate::fit::{StepTimes, training_step};

/// A preset with the hyper-parameters its tutorial trains it with.
#[derive(Clone, Debug)]
pub struct BenchCase {
    /// Preset name, or the spec's name for an architecture from a file.
    pub model: String,
    /// The architecture.
    pub spec: ModelSpec,
    /// Update rule.
    pub rule: Rule,
    /// Learning rate.
    pub learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: usize,
}

/// The cases of issue 6's table: two-conv (Adam, batch 64), lenet5 (SGD, batch 64), one-conv
/// (SGD, batch 32); and issue 19's modern CNN, bn-cnn (Adam, batch 64).
pub fn bench_cases() -> Result<Vec<BenchCase>, TrainError> {
    Ok(vec![
        BenchCase {
            model: "two-conv".into(),
            spec: preset_spec("two-conv")?,
            rule: Rule::adam(),
            learning_rate: 1e-3,
            batch_size: 64,
        },
        BenchCase {
            model: "lenet5".into(),
            spec: preset_spec("lenet5")?,
            rule: Rule::sgd(0.9),
            learning_rate: 0.01,
            batch_size: 64,
        },
        BenchCase {
            model: "one-conv".into(),
            spec: preset_spec("one-conv")?,
            rule: Rule::sgd(0.0),
            learning_rate: 0.01,
            batch_size: 32,
        },
        BenchCase {
            model: "bn-cnn".into(),
            spec: preset_spec("bn-cnn")?,
            rule: Rule::adam(),
            learning_rate: 1e-3,
            batch_size: 64,
        },
    ])
}

/// A preset's spec, or an error naming it.
fn preset_spec(name: &str) -> Result<ModelSpec, TrainError> {
    Ok(nn::preset(name).ok_or_else(|| nn::NnError::Spec(format!("no preset {name}")))?)
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
    /// Where a training step's time goes, when profiled.
    pub profile: Option<Vec<ProfileRow>>,
    /// This machine's fused multiply-add peak on the bench's threads, the best of three probes
    /// after the workload (see [`tensor::fma_peak_flops`]), in GFLOP/s.
    pub fma_peak_gflops: f64,
    /// The training FLOP of an epoch of 60,000 images (see [`nn::FlopCount`]), in GFLOP.
    pub epoch_gflop: f64,
    /// The least time an epoch could take at that peak: `epoch_gflop / fma_peak_gflops`.
    pub epoch_bound_seconds: f64,
    /// `projected_epoch_seconds / epoch_bound_seconds`: how far training is from the bound.
    pub epoch_bound_multiple: f64,
    /// Inference FLOP/s (forward passes at batch 1000) as a share of the peak.
    pub inference_share_of_peak: f64,
}

/// One line of a training-step profile: a layer, or a step outside the model.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    /// `"<index> <kind> <output shape>"` for a layer, else what the step does.
    pub name: String,
    /// Mean forward milliseconds per batch (for steps outside the model: their whole time).
    pub forward_ms: f64,
    /// Mean backward milliseconds per batch.
    pub backward_ms: f64,
}

/// Measures one case on `train` and `test` images: `batches` training steps after `warmup`; with `profile`, also times each
/// layer and each part of the step.
pub fn bench(
    case: &BenchCase,
    train: &LabeledImages,
    test: &LabeledImages,
    normalization: &Normalization,
    warmup: usize,
    batches: usize,
    profile: bool,
) -> Result<BenchResult, TrainError> {
    let mut model = Sequential::new(case.spec.clone(), 1)?;
    let mut optimizer = Optimizer::new(case.rule, case.learning_rate)?;
    let order = BatchOrder::Shuffled { seed: 1, epoch: 0 };
    let mut all = Batches::new(train, case.batch_size, order, normalization)?;
    // Time spent making batches, and in each part of the training step.
    let mut making = Duration::ZERO;
    let mut times = StepTimes::default();
    let mut step = |model: &mut Sequential,
                    making: &mut Duration,
                    times: &mut StepTimes|
     -> Result<usize, TrainError> {
        let start = Instant::now();
        let batch = all.next().ok_or_else(|| {
            mnist_data::DataError::InvalidArgument(
                "too few training images for the benchmark".into(),
            )
        })?;
        *making += start.elapsed();
        let n = batch.len();
        training_step(model, &mut optimizer, batch, 0.0, |_| Ok(()), times)?;
        Ok(n)
    };
    for _ in 0..warmup {
        step(&mut model, &mut making, &mut times)?;
    }
    (making, times) = (Duration::ZERO, StepTimes::default());
    if profile {
        model.start_profiling();
    }
    let start = Instant::now();
    let mut images = 0;
    for _ in 0..batches {
        images += step(&mut model, &mut making, &mut times)?;
    }
    let train_ips = images as f64 / start.elapsed().as_secs_f64();
    let profile = model.take_profile().map(|layer_times| {
        let shapes = model.output_shapes(case.batch_size);
        let mut rows: Vec<ProfileRow> = model
            .layers()
            .iter()
            .zip(layer_times)
            .zip(shapes)
            .enumerate()
            .map(|(index, ((layer, t), shape))| ProfileRow {
                name: {
                    let kind = match layer.algorithm() {
                        Some(algorithm) => format!("{} [{algorithm}]", layer.kind()),
                        None => layer.kind().to_string(),
                    };
                    match model.computed_by(index) {
                        by if by == index => format!("{index} {kind} {shape:?}"),
                        by => format!("{index} {kind} {shape:?}, in {by}'s time"),
                    }
                },
                forward_ms: t.mean_forward().as_secs_f64() * 1e3,
                backward_ms: t.mean_backward().as_secs_f64() * 1e3,
            })
            .collect();
        let per_batch = |time: Duration| time.as_secs_f64() * 1e3 / batches as f64;
        let outside_model = [
            ("making the batch", making),
            ("loss", times.loss),
            (
                "optimizer step and zeroing",
                times.optimizer + times.zeroing,
            ),
        ];
        for (name, time) in outside_model {
            rows.push(ProfileRow {
                name: name.into(),
                forward_ms: per_batch(time),
                backward_ms: 0.0,
            });
        }
        rows
    });

    // The best of three passes over the test set, after one batch of warm-up (which sizes the
    // buffers for batches of 1000): the same as the Python side of `cargo xtask bench`.
    if let Some(batch) = Batches::new(test, 1000, BatchOrder::Sequential, normalization)?.next() {
        std::hint::black_box(model.forward(batch.images, Mode::Eval)?);
    }
    let mut inference_ips = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut seen = 0;
        for batch in Batches::new(test, 1000, BatchOrder::Sequential, normalization)? {
            seen += batch.len();
            std::hint::black_box(model.forward(batch.images, Mode::Eval)?);
        }
        inference_ips = inference_ips.max(seen as f64 / start.elapsed().as_secs_f64());
    }

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
    let flops = model.spec().plan()?.flops_per_image();
    // The best of three probes: one that shares a core with a stray process reads low.
    let peak = (0..3)
        .map(|_| tensor::fma_peak_flops(rayon::current_num_threads(), Duration::from_millis(200)))
        .fold(0.0, f64::max);
    let epoch_flop = flops.training as f64 * 60_000.0;
    let projected_epoch_seconds = 60_000.0 / train_ips;
    Ok(BenchResult {
        model: case.model.to_string(),
        batch_size: case.batch_size,
        train_images_per_second: train_ips,
        projected_epoch_seconds,
        inference_images_per_second: inference_ips,
        latency_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        profile,
        fma_peak_gflops: peak / 1e9,
        epoch_gflop: epoch_flop / 1e9,
        epoch_bound_seconds: epoch_flop / peak,
        epoch_bound_multiple: projected_epoch_seconds / (epoch_flop / peak),
        inference_share_of_peak: flops.forward as f64 * inference_ips / peak,
    })
}

/// A profile as a Markdown table: milliseconds per batch and share of the step, forward and
/// backward separately.
pub fn profile_table(rows: &[ProfileRow]) -> String {
    let total: f64 = rows.iter().map(|r| r.forward_ms + r.backward_ms).sum();
    let share = |ms: f64| {
        if total > 0.0 { 100.0 * ms / total } else { 0.0 }
    };
    let mut out = String::from(
        "| layer or step | forward ms | backward ms | share of the step |\n| --- | --- | --- | --- |\n",
    );
    for row in rows {
        out += &format!(
            "| {} | {:.3} | {:.3} | {:.1}% |\n",
            row.name,
            row.forward_ms,
            row.backward_ms,
            share(row.forward_ms + row.backward_ms)
        );
    }
    out += &format!("| total | | | {total:.3} ms |\n");
    out
}

/// The process's peak resident memory in MB (Linux `VmHWM`), when the system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
