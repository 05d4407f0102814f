"""Runs an exported ONNX file in onnxruntime and compares its outputs with this project's.

Called by tests/onnxruntime.rs:
    check_onnx.py MODEL.onnx INPUTS.f32 N C H W LOGITS.f32 PROBABILITIES.f32
where the .f32 files are little-endian float32, row-major. Checks the file with onnx's checker
in full-check mode (types and shapes inferred through the whole graph), runs it with
onnxruntime's CPU provider, and prints one JSON object: the largest differences and how many
predicted classes agree.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

path, inputs, n, c, h, w, logits_path, probs_path = sys.argv[1:]
model = onnx.load(path)
onnx.checker.check_model(model, full_check=True)
x = np.fromfile(inputs, dtype="<f4").reshape(int(n), int(c), int(h), int(w))
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
logits, probs = session.run(["logits", "probabilities"], {"input": x})
ours_logits = np.fromfile(logits_path, dtype="<f4").reshape(logits.shape)
ours_probs = np.fromfile(probs_path, dtype="<f4").reshape(probs.shape)
print(json.dumps({
    "max_logit_diff": float(np.abs(logits - ours_logits).max()),
    "max_probability_diff": float(np.abs(probs - ours_probs).max()),
    "argmax_agree": int((logits.argmax(1) == ours_logits.argmax(1)).sum()),
    "images": int(x.shape[0]),
    "opset": [o.version for o in model.opset_import],
    "ir_version": model.ir_version,
    "producer": model.producer_name,
    "metadata": sorted(p.key for p in model.metadata_props),
    "onnxruntime": ort.__version__,
    "onnx": onnx.__version__,
}))
