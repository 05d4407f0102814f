"""What bench_torch.py and bench_keras.py share: MNIST from its IDX files (gz or raw),
standardized with the training set's mean and deviation as `mnist bench` does, the inference
measurements taken the same way as `mnist bench` takes them, and the JSON line they print."""

import gzip
import json
import resource
import time

import numpy as np


def idx(path):
    """The array in one IDX file."""
    with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def standardized(data_dir):
    """Training images [N, 28, 28] as float32, their int64 labels, and the test images."""
    x = idx(f"{data_dir}/train-images-idx3-ubyte.gz").astype(np.float32) / 255
    y = idx(f"{data_dir}/train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = idx(f"{data_dir}/t10k-images-idx3-ubyte.gz").astype(np.float32) / 255
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (xt - mean) / std


def best_images_per_second(images, run_all):
    """Images per second of `run_all()` (one pass over `images` test images): the best of three
    passes (the caller has run a warm-up batch)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run_all()
        best = min(best, time.perf_counter() - start)
    return images / best


def median_latency_ms(run_one):
    """The median milliseconds of 200 calls of `run_one()` after 20 of warm-up."""
    for _ in range(20):
        run_one()
    times = []
    for _ in range(200):
        start = time.perf_counter()
        run_one()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


def report(name, batch, train_ips, inference_ips, latency_ms, threads, framework):
    """Prints one case as the JSON line `cargo xtask bench` reads."""
    print(json.dumps({
        "model": name, "batch_size": batch, "train_images_per_second": train_ips,
        "projected_epoch_seconds": 60000 / train_ips, "inference_images_per_second": inference_ips,
        "latency_ms": latency_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads,
        "framework": framework,
    }), flush=True)
