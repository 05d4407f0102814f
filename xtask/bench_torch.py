"""The same presets as `mnist bench`, in PyTorch, on the same data: one JSON object per case.

Usage: python bench_torch.py DATA_DIR THREADS BATCHES WARMUP MODEL [MODEL ...]
Run by `cargo xtask bench --compare` with BENCH_PYTHON pointing at a Python that has torch;
prints {"skipped": reason} when it has not.
"""

import json
import sys
import time

from bench_common import best_images_per_second, median_latency_ms, report, standardized

try:
    import torch
    from torch import nn
except ImportError as error:
    print(json.dumps({"skipped": f"no torch: {error}"}), flush=True)
    sys.exit(0)


def model(name):
    if name == "two-conv":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "lenet5":
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                             nn.Linear(84, 10))
    if name == "one-conv":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5408, 100),
                             nn.ReLU(), nn.Linear(100, 10))
    if name == "bn-cnn":
        def block(c_in, c):
            return [nn.Conv2d(c_in, c, 3, padding="same"), nn.BatchNorm2d(c), nn.ReLU(),
                    nn.Conv2d(c, c, 3, padding="same"), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(3136, 256),
                             nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.4), nn.Linear(256, 10))
    raise SystemExit(f"unknown model {name}")


CASES = {  # optimizer and batch size as in `mnist bench`
    "two-conv": (lambda p: torch.optim.Adam(p, lr=1e-3), 64),
    "lenet5": (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), 64),
    "one-conv": (lambda p: torch.optim.SGD(p, lr=0.01), 32),
    "bn-cnn": (lambda p: torch.optim.Adam(p, lr=1e-3), 64),
}


def main():
    data_dir, threads, batches, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    x, y, xt = standardized(data_dir)
    x, y, xt = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y), torch.from_numpy(xt).unsqueeze(1)
    for name in sys.argv[5:]:
        make_optimizer, batch = CASES[name]
        net = model(name)
        optimizer = make_optimizer(net.parameters())
        loss_fn = nn.CrossEntropyLoss()
        order = torch.randperm(len(x))

        def step(i):
            idx_ = order[i * batch:(i + 1) * batch]
            optimizer.zero_grad()
            loss = loss_fn(net(x[idx_]), y[idx_])
            loss.backward()
            optimizer.step()

        net.train()
        for i in range(warmup):
            step(i)
        start = time.perf_counter()
        for i in range(warmup, warmup + batches):
            step(i)
        train_ips = batches * batch / (time.perf_counter() - start)
        net.eval()
        with torch.no_grad():
            net(xt[:1000])
            inference_ips = best_images_per_second(
                len(xt), lambda: [net(xt[i:i + 1000]) for i in range(0, len(xt), 1000)])
            one = xt[:1]
            latency_ms = median_latency_ms(lambda: net(one))
        report(name, batch, train_ips, inference_ips, latency_ms, threads, f"PyTorch {torch.__version__}")


if __name__ == "__main__":
    main()
