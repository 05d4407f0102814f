"""The data side shared by bench_torch.py and bench_keras.py: MNIST from its IDX files (gz or
raw), standardized with the training set's mean and deviation, as `mnist bench` does."""

import gzip

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
