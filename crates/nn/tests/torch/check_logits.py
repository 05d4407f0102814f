"""Loads a model file of this project into the equivalent torch.nn.Sequential and compares logits.

Usage: python check_logits.py MODEL.safetensors IO.safetensors [TOLERANCE]

IO.safetensors holds `input` [N, C, H, W] and `logits` [N, classes] computed by the Rust model.
Exit status 0 when the largest absolute difference is within TOLERANCE (default 1e-4).
Needs torch and safetensors: pip install torch safetensors
"""

import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn


def build(spec):
    """The torch.nn.Sequential a spec describes, module for module, so state-dict names match."""
    c, h, w = spec["input"]
    probe = torch.zeros(1, c, h, w)
    modules = []
    for layer in spec["layers"]:
        kind = layer["type"]
        if kind == "Conv2d":
            pad = layer.get("padding", "valid")
            stride = tuple(layer.get("stride", [1, 1]))
            if pad == "valid":
                padding = 0
            elif pad == "same":
                if stride != (1, 1):
                    raise SystemExit("torch supports padding='same' only with stride 1")
                padding = "same"
            else:
                top, bottom, left, right = pad["explicit"]
                if (top, left) != (bottom, right):
                    raise SystemExit("asymmetric explicit padding has no single-module torch equivalent")
                padding = (top, left)
            m = nn.Conv2d(probe.shape[1], layer["filters"], tuple(layer["kernel"]), stride, padding,
                          bias=layer.get("bias", True))
        elif kind in ("MaxPool2d", "AvgPool2d"):
            kernel = tuple(layer["kernel"])
            stride = tuple(layer.get("stride") or kernel)
            m = (nn.MaxPool2d if kind == "MaxPool2d" else nn.AvgPool2d)(kernel, stride)
        elif kind == "Flatten":
            m = nn.Flatten()
        elif kind == "Dense":
            m = nn.Linear(probe.shape[1], layer["units"], bias=layer.get("bias", True))
        elif kind == "ReLU":
            m = nn.ReLU()
        elif kind == "LeakyReLU":
            m = nn.LeakyReLU(layer.get("negative_slope", 0.01))
        elif kind == "Sigmoid":
            m = nn.Sigmoid()
        elif kind == "Tanh":
            m = nn.Tanh()
        elif kind == "Softmax":
            m = nn.Softmax(dim=1)
        elif kind == "Dropout":
            m = nn.Dropout(layer["rate"])
        elif kind in ("BatchNorm2d", "BatchNorm1d"):
            m = getattr(nn, kind)(probe.shape[1], eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1))
        else:
            raise SystemExit(f"unknown layer type {kind}")
        modules.append(m)
        probe = m.eval()(probe)
    return nn.Sequential(*modules)


def main():
    model_path, io_path = sys.argv[1], sys.argv[2]
    tolerance = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
    with safe_open(model_path, "pt") as f:
        metadata = f.metadata()
    model = build(json.loads(metadata["spec"]))
    model.load_state_dict(load_file(model_path), strict=True)
    model.eval()
    io = load_file(io_path)
    with torch.no_grad():
        logits = model(io["input"])
    diff = (logits - io["logits"]).abs().max().item()
    print(f"max |torch - rust| = {diff:.3e} over {logits.numel()} logits")
    sys.exit(0 if diff <= tolerance else 1)


if __name__ == "__main__":
    main()
