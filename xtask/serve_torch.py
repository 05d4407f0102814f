"""The server a PyTorch user would write for the same model: FastAPI on uvicorn, the weights
loaded from this project's model file into the equivalent torch.nn.Sequential, one forward
pass per request. `cargo xtask serve-bench` runs it beside `mnist serve` and loads both with
the same load generator.

Usage: python serve_torch.py MODEL.safetensors PORT
Needs torch, safetensors, numpy, fastapi, uvicorn (and pillow for PNG bodies).
POST /api/predict takes {"pixels": [784 values 0-255]} or a PNG, as `mnist serve` does (PNGs
are taken as 28x28 grey pixels here, without `mnist`'s cleaning).
"""

import importlib.util
import io
import json
import pathlib
import sys

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from safetensors import safe_open
from safetensors.torch import load_file

# The spec-to-torch builder the PyTorch parity test uses: one definition of the mapping.
ROOT = pathlib.Path(__file__).resolve().parent.parent
spec_loader = importlib.util.spec_from_file_location(
    "check_logits", ROOT / "crates/nn/tests/torch/check_logits.py")
check_logits = importlib.util.module_from_spec(spec_loader)
spec_loader.loader.exec_module(check_logits)

path, port = sys.argv[1], int(sys.argv[2])
with safe_open(path, "pt") as f:
    metadata = f.metadata()
spec = json.loads(metadata["spec"])
normalization = json.loads(metadata["normalization"])
model = check_logits.build(spec)
model.load_state_dict({k: v for k, v in load_file(path).items()}, strict=True)
model.eval()
torch.set_num_threads(1)
app = FastAPI()


@app.post("/api/predict")
async def predict(request: Request):
    body = await request.body()
    if request.headers.get("content-type", "").startswith("image/"):
        from PIL import Image
        pixels = np.asarray(Image.open(io.BytesIO(body)).convert("L").resize((28, 28)), np.float32)
    else:
        values = json.loads(body).get("pixels")
        if not isinstance(values, list) or len(values) != 784:
            raise HTTPException(400, "expected 784 pixels")
        pixels = np.asarray(values, np.float32).reshape(28, 28)
    x = (torch.from_numpy(pixels / 255.0).float() - normalization["mean"]) / normalization["std"]
    with torch.no_grad():
        probabilities = torch.softmax(model(x.reshape(1, 1, 28, 28)), dim=1)[0]
    return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist(),
            "input": pixels.astype(np.uint8).tolist(), "model": spec["name"]}


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
