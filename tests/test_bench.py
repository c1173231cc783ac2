"""The benchmarks' own yardsticks run: the framework floor make bench compares the service's CPU with."""

from __future__ import annotations

from pathlib import Path

from bench.serve import measure_floor
from tests.images import photo_bytes


def test_the_framework_floor_answers_every_request_at_the_rate_it_is_given():
    """bench/floor_server.py under 16 clients: 4 threads that each hold a request 4/50 s give about 50 requests/s
    (the service's rate is what make bench passes), every answer 200, and a CPU cost per request to compare with."""
    row = measure_floor(photo_bytes("cats/cat.1.jpg"), threads=4, rps=50.0, seconds=3.0)
    assert row["errors"] == 0 and row["requests"] > 0
    assert row["thread_seconds"] == 0.08
    assert 25 < row["rps"] <= 52  # bounded by the sleeping threads, whatever the machine
    assert 0 < row["cpu_ms_per_request"] < 20


def test_the_framework_floor_with_the_model_counts_its_in_process_cpu_as_the_service_does(onnx_model: Path):
    """With a model, the floor's threads run the real in-process path on the photo instead of sleeping, and its CPU
    beyond that path is read as the service's (bench.common.CpuMeter over its /metrics): most of each request's CPU is
    the model's, and what is left over is the framework's."""
    row = measure_floor(photo_bytes("cats/cat.1.jpg"), threads=2, rps=50.0, seconds=3.0, model=onnx_model)
    assert row["errors"] == 0 and row["requests"] > 0 and row["model"] == str(onnx_model)
    assert "thread_seconds" not in row  # the model sets the pace, not a sleep
    inference, beyond = row["in_process_cpu_ms_per_request"], row["cpu_ms_beyond_in_process"]
    assert inference > 1  # a MobileNetV2 inference on a real photo: several ms of CPU, never a sleep's 0
    assert 0 < beyond < inference
    assert abs(inference + beyond - row["cpu_ms_per_request"]) < 0.05  # the meter's reading agrees with the floor's
