"""The framework floor for `make bench`: the least a Starlette service on this uvicorn can spend per request.

The same stack as the service (uvicorn, uvloop, httptools, Starlette) doing only what every prediction needs: the
body read, a worker thread that takes as long as an inference (FLOOR_SECONDS, no CPU), and a JSON answer of the
same shape. No routing table beyond it, no middleware, no multipart, metrics, log line, ids or records.
`FLOOR_SECONDS=0.04 FLOOR_THREADS=4 uvicorn bench.floor_server:app --loop uvloop --http httptools`. The service's
own CPU per request is compared with this one's, measured in the same run at the same request rate
(bench/serve.py), so the comparison holds on a machine whose speed changes with its neighbours' load.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SECONDS = float(os.environ.get("FLOOR_SECONDS", "0.04"))
threads = ThreadPoolExecutor(int(os.environ.get("FLOOR_THREADS", "4")))


async def predict(request: Request) -> JSONResponse:
    body = await request.body()
    await asyncio.get_running_loop().run_in_executor(threads, time.sleep, SECONDS)
    answer = {"prediction_id": None, "label": "cat", "probabilities": {"cat": 1.0, "dog": 0.0}, "is_pet": True,
              "pet_score": 0.0, "model_version": "floor", "latency_ms": float(len(body))}  # fmt: skip
    return JSONResponse(answer)


app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
