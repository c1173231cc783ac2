"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """--model for the service benchmarks (MODEL_PATH, else the float32 file)."""
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(os.environ.get("MODEL_PATH", "models/model.onnx")),
        help="default: the float32 file, the one every version of the service can serve (a --baseline checkout "
        "too); models/model.int8.onnx or the models folder measures what make export serves",
    )


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The benchmark's report as indented JSON, written and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    """Milliseconds per call of fn, after warm-up calls."""
    for _ in range(warmup):
        fn()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def percentiles(timings: list[float]) -> dict[str, float]:
    values = np.asarray(timings)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(statistics.fmean(timings), 3),
    }


def cpu_info() -> dict[str, Any]:
    """Model name, core count and the SIMD flags that decide whether int8 pays off (VNNI, AMX)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
    return {
        "model": model or platform.processor(),
        "machine": platform.machine(),
        "logical_cpus": len(os.sched_getaffinity(0)),
        "flags": [flag for flag in wanted if flag in flags],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (onnxruntime's spinning ones too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inference_cpu_seconds(port: int) -> float:
    """The service's catsdogs_inference_cpu_seconds_total: CPU its worker threads spent on the in-process path."""
    import httpx2 as httpx

    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith("catsdogs_inference_cpu_seconds_total "):
            return float(line.split()[1])
    raise RuntimeError("the service exports no catsdogs_inference_cpu_seconds_total (an older checkout?)")


class CpuMeter:
    """The service's CPU per request over a window, split into the in-process path (decode, preprocess, session.run
    in the worker threads, as the service counts it) and what is beyond it: HTTP, multipart, JSON, the log line,
    metrics, the observer, thread hand-offs, onnxruntime threads spinning. Both read from the same process over the
    same window, so a busy neighbour moves both alike (an in-process run measured apart moved by 30% between runs)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.process, self.inference = cpu_seconds(pid), inference_cpu_seconds(port)

    def per_request(self, requests: int) -> dict[str, float]:
        process = cpu_seconds(self.pid) - self.process
        inference = inference_cpu_seconds(self.port) - self.inference
        n = max(requests, 1)
        return {"cpu_ms_per_request": round(process * 1000 / n, 3),
                "in_process_cpu_ms_per_request": round(inference * 1000 / n, 3),
                "cpu_ms_beyond_in_process": round((process - inference) * 1000 / n, 3)}  # fmt: skip
