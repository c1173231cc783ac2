"""The framework floor for `make bench`: the least a Starlette service on this uvicorn can spend per request.

The same stack as the service (uvicorn, uvloop, httptools, Starlette) doing only what every prediction needs: the
body read, a worker thread that takes as long as an inference (FLOOR_SECONDS, no CPU), and a JSON answer of the
same shape. No routing table beyond it, no middleware, no multipart, metrics, log line, ids or records.
`FLOOR_SECONDS=0.04 FLOOR_THREADS=4 uvicorn bench.floor_server:app --loop uvloop --http httptools`. The service's
own CPU per request is compared with this one's, measured in the same run at the same request rate
(bench/serve.py), so the comparison holds on a machine whose speed changes with its neighbours' load.

With FLOOR_MODEL (a model file or folder) and FLOOR_IMAGE (a photo), each thread runs the service's in-process path
on that photo instead of sleeping: the model loaded as the service loads it for these settings, called and counted
as the service calls it (`server.inference.classify_counted`), and `/metrics` is the service's own registry, so
`bench.common.CpuMeter` measures this floor's CPU beyond the in-process path as it measures the service's: the
floor with the cores and their caches as busy as the service's.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.config import Settings
from server.inference import classify_counted
from server.metrics import Metrics
from server.model import Model, Prediction

SECONDS = float(os.environ.get("FLOOR_SECONDS", "0.04"))
threads = ThreadPoolExecutor(int(os.environ.get("FLOOR_THREADS", "4")))
METRICS = Metrics()
MODEL = (
    Model.from_settings(Settings.from_env({**os.environ, "MODEL_PATH": os.environ["FLOOR_MODEL"]}))
    if os.environ.get("FLOOR_MODEL")
    else None
)
IMAGE = Path(os.environ["FLOOR_IMAGE"]).read_bytes() if MODEL else b""
SLEPT = Prediction(label="cat", probabilities={"cat": 1.0, "dog": 0.0}, is_pet=True, pet_score=0.0)


def hold() -> Prediction:
    """In a worker thread: the model on the photo, or a sleep as long as an inference."""
    if MODEL is None:
        time.sleep(SECONDS)
        return SLEPT
    [result] = classify_counted(MODEL, METRICS, [IMAGE])
    if not isinstance(result, Prediction):
        raise RuntimeError(f"the floor's photo cannot be classified: {result}")
    return result


async def predict(request: Request) -> JSONResponse:
    body = await request.body()
    result = await asyncio.get_running_loop().run_in_executor(threads, hold)
    answer = {"prediction_id": None, "label": result.label, "probabilities": result.probabilities,
              "is_pet": result.is_pet, "pet_score": result.pet_score, "model_version": "floor",
              "latency_ms": float(len(body))}  # fmt: skip
    return JSONResponse(answer)


async def metrics(request: Request) -> Response:
    return Response(METRICS.render(), media_type=METRICS.content_type)


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/metrics", metrics)])
