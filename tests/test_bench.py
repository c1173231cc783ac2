"""The benchmarks' own yardsticks run: the framework floor make bench compares the service's CPU with."""

from __future__ import annotations

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
