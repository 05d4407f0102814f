"""A run of `mnist train` repeated in PyTorch from its run directory's config.json, on the same
data: the same architecture, Adam, OneCycleLR per batch (cosine, without momentum cycling, as
ours), label smoothing, batch size, epochs and seed (for torch's own generator), all 60,000
training images in shuffled batches. Prints one JSON line: the training seconds (data already
loaded, evaluation excluded) and the test accuracy.

Usage: python recipe_torch.py DATA_DIR THREADS CONFIG_JSON
Run by `cargo xtask recipe --compare` with BENCH_PYTHON pointing at a Python that has torch;
prints {"skipped": reason} when it has not.
"""

import json
import sys
import time

from bench_common import standardized

try:
    import torch
    from torch import nn
except ImportError as error:
    print(json.dumps({"skipped": f"no torch: {error}"}), flush=True)
    sys.exit(0)


def build(spec):
    """The torch.nn.Sequential of a spec (the layer types the recipes use)."""
    layers, channels, features = [], spec["input"][0], None
    shape = list(spec["input"][1:])
    for layer in spec["layers"]:
        kind = layer["type"]
        if kind == "Conv2d":
            k = layer["kernel"]
            padding = layer.get("padding", "valid")
            layers.append(nn.Conv2d(channels, layer["filters"], k, stride=layer.get("stride", [1, 1]),
                                    padding=padding, bias=layer.get("bias", True)))
            channels = layer["filters"]
            if padding == "valid":
                shape = [(s - kk) // st + 1 for s, kk, st in zip(shape, k, layer.get("stride", [1, 1]))]
        elif kind == "BatchNorm2d":
            layers.append(nn.BatchNorm2d(channels, eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1)))
        elif kind == "BatchNorm1d":
            layers.append(nn.BatchNorm1d(features, eps=layer.get("eps", 1e-5), momentum=layer.get("momentum", 0.1)))
        elif kind == "ReLU":
            layers.append(nn.ReLU())
        elif kind == "MaxPool2d":
            k = layer["kernel"]
            stride = layer.get("stride") or k
            layers.append(nn.MaxPool2d(k, stride))
            shape = [(s - kk) // st + 1 for s, kk, st in zip(shape, k, stride)]
        elif kind == "Flatten":
            layers.append(nn.Flatten())
            features = channels * shape[0] * shape[1]
        elif kind == "Dense":
            layers.append(nn.Linear(features, layer["units"], bias=layer.get("bias", True)))
            features = layer["units"]
        elif kind == "Dropout":
            layers.append(nn.Dropout(layer["rate"]))
        else:
            raise SystemExit(f"recipe_torch.py does not build {kind} layers")
    return nn.Sequential(*layers)


def main():
    data_dir, threads, config_path = sys.argv[1:4]
    with open(config_path) as f:
        config = json.load(f)
    schedule = config["schedule"]
    if (config["augment"] or config["val_split"] or schedule.get("type") != "one_cycle"
            or config["optimizer"].get("type") != "adam" or config["optimizer"].get("weight_decay")):
        raise SystemExit("recipe_torch.py repeats Adam + one-cycle runs on all images without augmentation only")
    spec, epochs, batch = config["model"], config["epochs"], config["batch_size"]
    lr, smoothing, seed = config["learning_rate"], config["label_smoothing"], config["seed"]
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    x, y, xt = standardized(data_dir)
    from bench_common import idx
    yt = idx(f"{data_dir}/t10k-labels-idx1-ubyte.gz").astype("int64")
    x, y = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    xt, yt = torch.from_numpy(xt).unsqueeze(1), torch.from_numpy(yt)
    model = build(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, anneal_strategy="cos", cycle_momentum=False,
        pct_start=schedule["pct_start"], div_factor=schedule["div_factor"],
        final_div_factor=schedule["final_div_factor"])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=smoothing)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for first in range(0, len(x), batch):
            index = order[first:first + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        correct = sum((model(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item()
                      for i in range(0, len(xt), 1000))
    print(json.dumps({"framework": f"PyTorch {torch.__version__}", "seconds": seconds,
                      "test_accuracy": correct / len(xt), "seed": seed}), flush=True)


if __name__ == "__main__":
    main()
