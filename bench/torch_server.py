"""A seed-style reference server for `make bench`: FastAPI and PyTorch, as a first version of this service is
usually written (the trained checkpoint with its flip averaging, torchvision's transform, one endpoint).

`TORCH_CHECKPOINT=models/final.pt uvicorn bench.torch_server:app`. Not served anywhere: it is the yardstick the
service's throughput is compared with in the same run (bench/serve.py --torch-reference).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, UploadFile
from PIL import Image

from training.model import load_predictor
from training.presets import ClassificationPresetEval, PreprocessSpec

predictor, checkpoint = load_predictor(Path(os.environ.get("TORCH_CHECKPOINT", "models/final.pt")))
spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
transform = ClassificationPresetEval(spec=spec)
app = FastAPI()


@app.post("/predict")
def predict(file: UploadFile) -> dict[str, Any]:
    image = Image.open(io.BytesIO(file.file.read())).convert("RGB")
    with torch.inference_mode():
        output = predictor(transform(image).unsqueeze(0))
    probabilities = (output[0] if isinstance(output, tuple) else output)[0].tolist()
    return {"label": spec.labels[max(range(len(probabilities)), key=probabilities.__getitem__)],
            "probabilities": dict(zip(spec.labels, probabilities, strict=True))}  # fmt: skip
