//! Dynamic batching, as TorchServe and Triton do it: requests queue for one model thread, which
//! takes whatever is waiting (up to a maximum batch, waiting at most a short delay for more)
//! and answers them all from one forward pass.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use mnist_data::Normalization;
use ndarray::{Array2, Array4, Axis};
use nn::{Mode, Sequential};
use tokio::sync::oneshot;

use crate::error::ServeError;
use crate::metrics::Metrics;

/// How requests are grouped.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// At most this many images in one forward pass.
    pub max_batch: usize,
    /// After the first request of a batch, wait at most this long for more.
    pub max_wait: Duration,
    /// At most this many requests wait; more are refused as busy (503).
    pub queue: usize,
}

impl Default for BatchPolicy {
    /// 64 images, 2 ms, 1024 waiting.
    fn default() -> Self {
        BatchPolicy {
            max_batch: 64,
            max_wait: Duration::from_millis(2),
            queue: 1024,
        }
    }
}

/// One image waiting for its class probabilities.
struct Job {
    /// `[28, 28]` bytes in MNIST's form.
    image: Array2<u8>,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
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
                    let mut batch = vec![first];
                    let deadline = Instant::now() + policy.max_wait;
                    while batch.len() < policy.max_batch.max(1) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match queue.recv_timeout(left) {
                            Ok(job) => batch.push(job),
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                                break;
                            }
                        }
                    }
                    metrics.batch();
                    run(&mut model, &normalization, batch);
                }
            })
            .map_err(|e| ServeError::Internal(format!("cannot start the model thread: {e}")))?;
        Ok(Batcher { jobs })
    }

    /// The class probabilities of one `[28, 28]` image.
    pub async fn predict(&self, image: Array2<u8>) -> Result<Vec<f32>, ServeError> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job { image, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ServeError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(ServeError::Internal("the model thread has stopped".into()));
            }
        }
        match answer.await {
            Ok(Ok(probabilities)) => Ok(probabilities),
            Ok(Err(problem)) => Err(ServeError::Internal(problem)),
            Err(_) => Err(ServeError::Internal(
                "the model thread dropped a request".into(),
            )),
        }
    }
}

/// One forward pass for the whole batch; every job gets its row of probabilities.
fn run(model: &mut Sequential, normalization: &Normalization, batch: Vec<Job>) {
    let n = batch.len();
    let mut x = Array4::<f32>::zeros((n, 1, 28, 28));
    for (mut slot, job) in x.outer_iter_mut().zip(&batch) {
        // The same byte-to-input mapping as training and `mnist predict`.
        slot.index_axis_mut(Axis(0), 0)
            .assign(&job.image.mapv(|p| normalization.apply(p)));
    }
    let result = model.forward(x, Mode::Eval).and_then(|logits| {
        let mut p = Array2::zeros(logits.raw_dim());
        tensor::softmax(logits.view(), Axis(1), p.view_mut())?;
        Ok(p)
    });
    match result {
        Ok(probabilities) => {
            for (row, job) in probabilities.outer_iter().zip(batch) {
                let _ = job.reply.send(Ok(row.to_vec()));
            }
        }
        Err(e) => {
            for job in batch {
                let _ = job.reply.send(Err(e.to_string()));
            }
        }
    }
}
