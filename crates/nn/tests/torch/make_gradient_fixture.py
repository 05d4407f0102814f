"""Writes gradients.safetensors: PyTorch's loss and parameter gradients for fixed weights and a
fixed batch, the outside reference of tests/torch_gradients.rs.

Usage: python make_gradient_fixture.py OUT.safetensors
       (from this directory; needs torch, numpy and safetensors: pip install torch safetensors)

For each architecture (the six presets, and `bn-small`, with BatchNorm and Dropout) the weights,
biases and BatchNorm affine parameters come from `fixed_values` below (salt 10 * layer, plus 1
for a bias), which the Rust test computes the same way to the bit, and so do the 8 input
images (salt 1000, plus 0.5); label n is n % 10. PyTorch
computes in float64 from those float32 values: the mean cross-entropy of the batch and its
gradient for every parameter. BatchNorm runs in training mode (batch statistics, as when
training); Dropout in evaluation mode, the identity (a random mask cannot be matched).

Stored per architecture `a` (float32): `a.loss` [1]; for each parameter `p` (state-dict name),
`a.grad.p.sum` and `a.grad.p.norm` (its sum and L2 norm, over all entries) and
`a.grad.p.sample`, the entries at every `stride`-th flat index, where stride makes at most
4096 of them (stored in the metadata as `strides`). The metadata holds each spec.
"""

import json
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from check_logits import build

# The presets of crates/nn/src/spec.rs (the test checks these match), and one more.
CONV = {"type": "Conv2d", "kernel": [3, 3]}
POOL = {"type": "MaxPool2d", "kernel": [2, 2]}
SPECS = {
    "two-conv": [
        dict(CONV, filters=32), {"type": "ReLU"}, POOL,
        dict(CONV, filters=64), {"type": "ReLU"}, POOL,
        {"type": "Flatten"}, {"type": "Dense", "units": 128}, {"type": "ReLU"},
        {"type": "Dense", "units": 10},
    ],
    "one-conv": [
        dict(CONV, filters=32), {"type": "ReLU"}, POOL, {"type": "Flatten"},
        {"type": "Dense", "units": 100}, {"type": "ReLU"}, {"type": "Dense", "units": 10},
    ],
    "one-conv-dropout": [
        dict(CONV, filters=32), {"type": "ReLU"}, POOL, {"type": "Flatten"},
        {"type": "Dense", "units": 128}, {"type": "ReLU"}, {"type": "Dropout", "rate": 0.2},
        {"type": "Dense", "units": 10},
    ],
    "lenet5": [
        {"type": "Conv2d", "filters": 6, "kernel": [5, 5], "padding": "same"}, {"type": "ReLU"},
        POOL,
        {"type": "Conv2d", "filters": 16, "kernel": [5, 5]}, {"type": "ReLU"}, POOL,
        {"type": "Flatten"}, {"type": "Dense", "units": 120}, {"type": "ReLU"},
        {"type": "Dense", "units": 84}, {"type": "ReLU"}, {"type": "Dense", "units": 10},
    ],
    "bn-cnn": [
        *(block for filters in (32, 64) for block in (
            dict(CONV, filters=filters, padding="same"), {"type": "BatchNorm2d"}, {"type": "ReLU"},
            dict(CONV, filters=filters, padding="same"), {"type": "BatchNorm2d"}, {"type": "ReLU"},
            POOL,
        )),
        {"type": "Flatten"}, {"type": "Dense", "units": 256}, {"type": "BatchNorm1d"},
        {"type": "ReLU"}, {"type": "Dropout", "rate": 0.4}, {"type": "Dense", "units": 10},
    ],
    # The fast recipe's network: each convolution pooled (fused without a ReLU), then
    # BatchNorm + ReLU on the pooled values.
    "fast-cnn": [
        *(block for filters in (16, 32) for block in (
            dict(CONV, filters=filters, bias=False), POOL, {"type": "BatchNorm2d"},
            {"type": "ReLU"},
        )),
        {"type": "Flatten"}, {"type": "Dense", "units": 10},
    ],
    # Convolutions without bias before BatchNorm, an im2col-computed one (12 filters),
    # BatchNorm1d and Dropout before the classifier.
    "bn-small": [
        dict(CONV, filters=16, padding="same", bias=False), {"type": "BatchNorm2d"},
        {"type": "ReLU"},
        dict(CONV, filters=32, padding="same", bias=False), {"type": "BatchNorm2d"},
        {"type": "ReLU"}, POOL,
        dict(CONV, filters=12), {"type": "ReLU"}, POOL, {"type": "Flatten"},
        {"type": "Dense", "units": 32, "bias": False}, {"type": "BatchNorm1d"}, {"type": "ReLU"},
        {"type": "Dropout", "rate": 0.4}, {"type": "Dense", "units": 10},
    ],
}
BATCH = 8
MAX_SAMPLES = 4096


def fixed_values(count, salt):
    """`count` values in [-0.5, 0.5): an integer hash of (index, salt) over 2^32, in float32.

    Every step is exact or correctly rounded, so Rust gets the same bits: the hash in 64-bit
    integers, the division by 2^32 and the subtraction exact in float64, one rounding to f32.
    """
    i = np.arange(count, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(salt) * np.uint64(40503)) % np.uint64(1 << 32)
    h = (h ^ (h >> np.uint64(15))) * np.uint64(2246822519) % np.uint64(1 << 32)
    return (h.astype(np.float64) / float(1 << 32) - 0.5).astype(np.float32)


def parameter_values(name, shape, salt):
    """A parameter's fixed values: weights scaled by 2/sqrt(fan_in) (about PyTorch's default
    range), biases by 0.2, BatchNorm's weight around 1 and bias around 0."""
    u = fixed_values(int(np.prod(shape)), salt).reshape(shape)
    kind = name.rsplit(".", 1)[-1]
    if kind == "weight" and len(shape) > 1:
        fan_in = int(np.prod(shape[1:]))
        scale = np.float32(2.0) / np.sqrt(np.float32(fan_in))
        return u * scale
    if kind == "weight":  # BatchNorm's gamma
        return np.float32(1.0) + u * np.float32(0.2)
    return u * np.float32(0.2)


def main():
    out = sys.argv[1]
    tensors, strides, specs = {}, {}, {}
    for arch, layers in SPECS.items():
        spec = {"name": arch, "input": [1, 28, 28], "layers": layers}
        specs[arch] = spec
        model = build(spec).double()
        state = model.state_dict()
        for name, value in state.items():
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            layer, kind = name.split(".")
            salt = 10 * int(layer) + (0 if kind == "weight" else 1)
            values = parameter_values(name, tuple(value.shape), salt)
            state[name] = torch.from_numpy(values.astype(np.float64))
        model.load_state_dict(state)
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        images = fixed_values(BATCH * 28 * 28, 1000).reshape(BATCH, 1, 28, 28) + np.float32(0.5)
        labels = torch.arange(BATCH) % 10
        logits = model(torch.from_numpy(images.astype(np.float64)))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        tensors[f"{arch}.loss"] = loss.detach().reshape(1).float()
        for name, p in model.named_parameters():
            g = p.grad.detach().reshape(-1)
            stride = max(1, -(-g.numel() // MAX_SAMPLES))
            strides[f"{arch}.{name}"] = stride
            tensors[f"{arch}.grad.{name}.sum"] = g.sum().reshape(1).float()
            tensors[f"{arch}.grad.{name}.norm"] = g.norm().reshape(1).float()
            tensors[f"{arch}.grad.{name}.sample"] = g[::stride].float().contiguous()
        print(f"{arch}: loss {loss.item():.6f}, {len(list(model.parameters()))} parameters")
    metadata = {
        "specs": json.dumps(specs),
        "strides": json.dumps(strides),
        "batch": str(BATCH),
        "made_by": f"make_gradient_fixture.py, torch {torch.__version__}, numpy {np.__version__}",
    }
    save_file(tensors, out, metadata=metadata)


if __name__ == "__main__":
    main()
