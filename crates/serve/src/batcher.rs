//! Dynamic batching, as TorchServe and Triton do it: requests queue for one model thread, which
//! takes whatever is waiting (up to a maximum batch, waiting at most a short delay for more)
//! and answers them all from one forward pass.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use mnist_data::Normalization;
use ndarray::{Array2, Array4, Axis};
use nn::{LayerSpec, Mode, Sequential};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::metrics::Metrics;

/// How requests are grouped.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// At most this many images in one forward pass.
    pub max_batch: usize,
    /// After the first request of a batch, wait at most this long for more (Triton's maximum
    /// queue delay); zero takes only what is already waiting.
    pub max_wait: Duration,
    /// At most this many requests wait; more are refused as busy (503).
    pub queue: usize,
}

impl Default for BatchPolicy {
    /// 64 images, no waiting, 1024 waiting requests at most. With no wait a batch is whatever
    /// queued while the last forward pass ran: one client pays no delay (0.35 ms median here,
    /// against 2.6 ms with a 2 ms wait), and under load the batches grow by themselves.
    fn default() -> Self {
        BatchPolicy {
            max_batch: 64,
            max_wait: Duration::ZERO,
            queue: 1024,
        }
    }
}

/// One image waiting for the model thread.
enum Job {
    /// Its class probabilities, computed in a batch with whatever else waits.
    Predict {
        /// `[28, 28]` bytes in MNIST's form.
        image: Array2<u8>,
        reply: oneshot::Sender<Result<Vec<f32>, String>>,
    },
    /// What each convolution makes of it, computed alone.
    Explain {
        /// `[28, 28]` bytes in MNIST's form.
        image: Array2<u8>,
        reply: oneshot::Sender<Result<Explanation, String>>,
    },
}

/// Grey-scale tiles: `channels` maps of `height` x `width`, each scaled to 0-255 by its own
/// range so that its pattern shows whatever its magnitude.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Tiles {
    /// The layer's index in the spec.
    pub layer: usize,
    /// The layer type.
    pub kind: &'static str,
    /// How many maps.
    pub channels: usize,
    /// Rows of each.
    pub height: usize,
    /// Columns of each.
    pub width: usize,
    /// Row-major bytes, one list per map.
    pub values: Vec<Vec<u8>>,
}

/// What the page shows inside the network for one input.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Explanation {
    /// The class probabilities.
    pub probabilities: Vec<f32>,
    /// For every convolution, its maps after what follows it (BatchNorm, the activation).
    pub feature_maps: Vec<Tiles>,
    /// The first convolution's filters (each output channel's first input channel).
    pub filters: Option<Tiles>,
    /// How much each input pixel moves the predicted class's score: the magnitude of its
    /// gradient, from the hand-written backward pass.
    pub saliency: Tiles,
}

/// The handle requests use to reach the model thread.
#[derive(Clone, Debug)]
pub struct Batcher {
    jobs: SyncSender<Job>,
}

impl Batcher {
    /// Starts the model thread; it ends when every handle is dropped.
    pub fn start(
        mut model: Sequential,
        normalization: Normalization,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Batcher, ServeError> {
        let (jobs, queue) = mpsc::sync_channel::<Job>(policy.queue.max(1));
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut jobs = vec![first];
                    let deadline = Instant::now() + policy.max_wait;
                    while jobs.len() < policy.max_batch.max(1) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match queue.recv_timeout(left) {
                            Ok(job) => jobs.push(job),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break;
                            }
                        }
                    }
                    let mut batch = Vec::new();
                    for job in jobs {
                        match job {
                            Job::Predict { image, reply } => batch.push((image, reply)),
                            Job::Explain { image, reply } => {
                                let _ = reply.send(explain(&mut model, &normalization, &image));
                            }
                        }
                    }
                    if !batch.is_empty() {
                        metrics.batch();
                        run(&mut model, &normalization, batch);
                    }
                }
            })
            .map_err(|e| ServeError::Internal(format!("cannot start the model thread: {e}")))?;
        Ok(Batcher { jobs })
    }

    /// The class probabilities of one `[28, 28]` image.
    pub async fn predict(&self, image: Array2<u8>) -> Result<Vec<f32>, ServeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Predict { image, reply })?;
        receive(answer).await
    }

    /// The probabilities, feature maps and filters for one `[28, 28]` image.
    pub async fn explain(&self, image: Array2<u8>) -> Result<Explanation, ServeError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Explain { image, reply })?;
        receive(answer).await
    }

    fn send(&self, job: Job) -> Result<(), ServeError> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(ServeError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                Err(ServeError::Internal("the model thread has stopped".into()))
            }
        }
    }
}

async fn receive<T>(answer: oneshot::Receiver<Result<T, String>>) -> Result<T, ServeError> {
    match answer.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(problem)) => Err(ServeError::Internal(problem)),
        Err(_) => Err(ServeError::Internal(
            "the model thread dropped a request".into(),
        )),
    }
}

/// One image as the model's input `[1, 1, 28, 28]`.
fn input(image: &Array2<u8>, normalization: &Normalization) -> Array4<f32> {
    let mut x = Array4::<f32>::zeros((1, 1, 28, 28));
    x.index_axis_mut(Axis(0), 0)
        .index_axis_mut(Axis(0), 0)
        .assign(&image.mapv(|p| normalization.apply(p)));
    x
}

/// Every layer's output for one image, read as tiles.
fn explain(
    model: &mut Sequential,
    normalization: &Normalization,
    image: &Array2<u8>,
) -> Result<Explanation, String> {
    let outputs = model
        .layer_outputs(input(image, normalization))
        .map_err(|e| e.to_string())?;
    let layers = &model.spec().layers;
    // The scores come before a final Softmax (see `Sequential::forward`).
    let scores = outputs
        .len()
        .checked_sub(1 + usize::from(model.ends_in_softmax()))
        .and_then(|i| outputs.get(i))
        .ok_or("the model has no layers")?;
    let scores = scores
        .view()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| e.to_string())?;
    let mut probabilities = Array2::zeros(scores.raw_dim());
    tensor::softmax(scores, Axis(1), probabilities.view_mut()).map_err(|e| e.to_string())?;
    let mut feature_maps = Vec::new();
    for (index, layer) in layers.iter().enumerate() {
        if !matches!(layer, LayerSpec::Conv2d { .. }) {
            continue;
        }
        // The maps as the next layer sees them: after BatchNorm and the activation.
        let mut shown = index;
        while let Some(next) = layers.get(shown + 1)
            && matches!(
                next,
                LayerSpec::BatchNorm2d { .. }
                    | LayerSpec::ReLU
                    | LayerSpec::LeakyReLU { .. }
                    | LayerSpec::Sigmoid
                    | LayerSpec::Tanh
            )
        {
            shown += 1;
        }
        if let Some(maps) = outputs.get(shown) {
            feature_maps.push(tiles(index, "Conv2d", maps.view())?);
        }
    }
    let first_conv = layers
        .iter()
        .position(|l| matches!(l, LayerSpec::Conv2d { .. }));
    let mut filters = None;
    if let Some(index) = first_conv {
        let name = format!("{index}.weight");
        let mut weight = None;
        model.visit_params(|n, p| {
            if n == name {
                weight = Some(p.value.clone());
            }
        });
        if let Some(w) = weight {
            // [O, C, KH, KW]: each output channel's first input channel.
            let first_channel = w.index_axis(Axis(1), 0).insert_axis(Axis(0)).into_owned();
            filters = Some(tiles(index, "Conv2d", first_channel.view())?);
        }
    }
    let predicted = probabilities
        .row(0)
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    let gradient = model
        .input_gradient(input(image, normalization), predicted)
        .map_err(|e| e.to_string())?;
    let saliency = tiles(0, "input", gradient.mapv(f32::abs).view())?;
    Ok(Explanation {
        probabilities: probabilities.row(0).to_vec(),
        feature_maps,
        filters,
        saliency,
    })
}

/// `[1, C, H, W]` maps as tiles, each scaled by its own range.
fn tiles(
    layer: usize,
    kind: &'static str,
    maps: ndarray::ArrayViewD<'_, f32>,
) -> Result<Tiles, String> {
    let maps = maps
        .into_dimensionality::<ndarray::Ix4>()
        .map_err(|_| format!("layer {layer} does not give [N, C, H, W] maps"))?;
    let (_, channels, height, width) = maps.dim();
    let values = maps
        .index_axis(Axis(0), 0)
        .outer_iter()
        .map(|map| {
            let (lo, hi) = map
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let span = hi - lo;
            map.iter()
                .map(|&v| {
                    if span > 0.0 {
                        ((v - lo) / span * 255.0).round() as u8
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect();
    Ok(Tiles {
        layer,
        kind,
        channels,
        height,
        width,
        values,
    })
}

/// A prediction waiting in a batch: its image and where its answer goes.
type Waiting = (Array2<u8>, oneshot::Sender<Result<Vec<f32>, String>>);

/// One forward pass for the whole batch; every job gets its row of probabilities.
fn run(model: &mut Sequential, normalization: &Normalization, batch: Vec<Waiting>) {
    let n = batch.len();
    let mut x = Array4::<f32>::zeros((n, 1, 28, 28));
    for (mut slot, (image, _)) in x.outer_iter_mut().zip(&batch) {
        // The same byte-to-input mapping as training and `mnist predict`.
        slot.index_axis_mut(Axis(0), 0)
            .assign(&image.mapv(|p| normalization.apply(p)));
    }
    let result = model.forward(x, Mode::Eval).and_then(|logits| {
        let mut p = Array2::zeros(logits.raw_dim());
        tensor::softmax(logits.view(), Axis(1), p.view_mut())?;
        Ok(p)
    });
    match result {
        Ok(probabilities) => {
            for (row, (_, reply)) in probabilities.outer_iter().zip(batch) {
                let _ = reply.send(Ok(row.to_vec()));
            }
        }
        Err(e) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}
