"""The same presets as `mnist bench`, in Keras (TensorFlow), on the same data: one JSON object per
case, or {"skipped": reason} when TensorFlow is not installed.

Usage: python bench_keras.py DATA_DIR THREADS BATCHES WARMUP MODEL [MODEL ...]
Run by `cargo xtask bench --compare` with BENCH_PYTHON pointing at a Python that has tensorflow
(pip install tensorflow-cpu). Training goes through `model.fit`, as the Keras tutorials do, in one
call over the warm-up and the timed batches; a callback times the batches after the warm-up, so
fit's setup and the tracing of its training step are left out. Latency is of a compiled call
(tf.function), Keras' fastest way to classify one image.
"""

import json
import os
import sys
import time

import numpy as np

from bench_common import best_images_per_second, median_latency_ms, report, standardized

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    import keras
    import tensorflow as tf
    from keras import layers
except ImportError as error:
    print(json.dumps({"skipped": f"no tensorflow: {error}"}), flush=True)
    sys.exit(0)


def model(name):
    if name == "two-conv":
        body = [layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
                layers.Dense(128, activation="relu"), layers.Dense(10)]
    elif name == "lenet5":
        body = [layers.Conv2D(6, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
                layers.Conv2D(16, 5, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
                layers.Dense(120, activation="relu"), layers.Dense(84, activation="relu"),
                layers.Dense(10)]
    elif name == "one-conv":
        body = [layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
                layers.Dense(100, activation="relu"), layers.Dense(10)]
    elif name == "bn-cnn":
        body = []
        for filters in (32, 64):
            for _ in range(2):
                body += [layers.Conv2D(filters, 3, padding="same"), layers.BatchNormalization(),
                         layers.ReLU()]
            body.append(layers.MaxPooling2D(2))
        body += [layers.Flatten(), layers.Dense(256), layers.BatchNormalization(), layers.ReLU(),
                 layers.Dropout(0.4), layers.Dense(10)]
    else:
        raise SystemExit(f"unknown model {name}")
    return keras.Sequential([keras.Input((28, 28, 1))] + body)


class BatchClock(keras.callbacks.Callback):
    """The time from the start of batch `first` to the end of the last batch."""

    def __init__(self, first):
        super().__init__()
        self.first, self.start, self.end = first, None, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.end = time.perf_counter()


CASES = {  # optimizer and batch size as in `mnist bench`
    "two-conv": (lambda: keras.optimizers.Adam(1e-3), 64),
    "lenet5": (lambda: keras.optimizers.SGD(0.01, momentum=0.9), 64),
    "one-conv": (lambda: keras.optimizers.SGD(0.01), 32),
    "bn-cnn": (lambda: keras.optimizers.Adam(1e-3), 64),
}


def main():
    data_dir, threads, batches, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(1)
    x, y, xt = standardized(data_dir)
    x, xt = x[..., None], xt[..., None]
    for name in sys.argv[5:]:
        make_optimizer, batch = CASES[name]
        net = model(name)
        net.compile(optimizer=make_optimizer(),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        order = np.random.default_rng(1).permutation(len(x))
        used = order[:(warmup + batches) * batch]
        clock = BatchClock(warmup)
        net.fit(x[used], y[used], batch_size=batch, epochs=1, shuffle=False, verbose=0,
                callbacks=[clock])
        train_ips = batches * batch / (clock.end - clock.start)
        net.predict(xt[:1000], batch_size=1000, verbose=0)
        # (predict's own overhead varies from pass to pass: hence the best of three.)
        inference_ips = best_images_per_second(
            len(xt), lambda: net.predict(xt, batch_size=1000, verbose=0))
        one = tf.constant(xt[:1])
        infer = tf.function(lambda t: net(t, training=False))
        latency_ms = median_latency_ms(lambda: infer(one).numpy())
        report(name, batch, train_ips, inference_ips, latency_ms, threads,
               f"Keras {keras.__version__} / TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
