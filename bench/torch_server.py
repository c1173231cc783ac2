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

import multipart
import torch
from fastapi import Depends, FastAPI, Request
from PIL import Image

from training.model import load_predictor
from training.presets import ClassificationPresetEval, PreprocessSpec

predictor, checkpoint = load_predictor(Path(os.environ.get("TORCH_CHECKPOINT", "models/final.pt")))
spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
transform = ClassificationPresetEval(spec=spec)
app = FastAPI()


async def upload(request: Request) -> bytes:
    """The form's `file` part, read on the event loop as FastAPI reads an UploadFile before a sync endpoint runs.
    UploadFile needs python-multipart, which the service's own parser (the `multipart` package) replaces: both
    install a `multipart` module, so only one of them can be in an environment."""
    boundary = multipart.parse_options_header(request.headers["content-type"])[1]["boundary"]
    body = await request.body()
    return multipart.MultipartParser(io.BytesIO(body), boundary, content_length=len(body)).get("file").raw


@app.post("/predict")
def predict(data: bytes = Depends(upload)) -> dict[str, Any]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.inference_mode():
        output = predictor(transform(image).unsqueeze(0))
    probabilities = (output[0] if isinstance(output, tuple) else output)[0].tolist()
    return {"label": spec.labels[max(range(len(probabilities)), key=probabilities.__getitem__)],
            "probabilities": dict(zip(spec.labels, probabilities, strict=True))}  # fmt: skip
