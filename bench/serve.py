"""`make bench`: the service's latency, throughput, memory and start-up against its in-process floor, in one run.

A tiny keep-alive HTTP client on raw sockets generates the load, so the client costs the shared cores little.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import cpu_info, percentiles, time_ms
from deploy.client import free_port
from server.config import Settings, available_cpus
from server.model import Model

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "catsdogsbench"


def multipart_request(port: int, image: bytes) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Client:
    """One keep-alive connection sending a prepared request and reading each response whole."""

    def __init__(self, port: int, request: bytes) -> None:
        self.connection = socket.create_connection(("127.0.0.1", port))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request

    def send(self) -> int:
        self.connection.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.connection.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(v.split(b":")[1]) for v in lines if v.lower().startswith(b"content-length"))
        while len(body) < length:
            body += self.connection.recv(65536)
        return int(lines[0].split()[1])

    def close(self) -> None:
        self.connection.close()


def load(port: int, request: bytes, clients: int, seconds: float) -> dict[str, float]:
    """Closed-loop load from `clients` keep-alive connections for `seconds`, driven by one thread with a selector
    so the load generator takes as little of the shared cores as possible: requests per second and errors."""
    selector = selectors.DefaultSelector()
    for _ in range(clients):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.sendall(request)
        selector.register(connection, selectors.EVENT_READ, data=bytearray())
    done = errors = 0
    started = time.perf_counter()
    stop = started + seconds
    while selector.get_map():
        for key, _ in selector.select(timeout=1):
            connection, buffer = key.fileobj, key.data
            chunk = connection.recv(65536)  # type: ignore[union-attr]
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
            head_end = buffer.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            length = int(re.search(rb"(?i)content-length: *(\d+)", bytes(buffer[:head_end])).group(1))  # type: ignore[union-attr]
            if len(buffer) < head_end + 4 + length:
                continue
            if buffer.startswith(b"HTTP/1.1 200"):
                done += 1
            else:
                errors += 1
            buffer.clear()
            if time.perf_counter() < stop:
                connection.sendall(request)  # type: ignore[union-attr]
            else:
                selector.unregister(connection)
                connection.close()  # type: ignore[union-attr]
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": done, "errors": errors, "rps": round(done / elapsed, 2)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def start_server(model: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    """`python -m server` with the given model; returns the process and the seconds from spawn to /ready = 200."""
    env = {**os.environ, "MODEL_PATH": str(model), "PORT": str(port), "HOST": "127.0.0.1"}
    started = time.perf_counter()
    # The service logs as in production (a JSON line per request), into the void.
    process = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    probe = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(probe)
                if connection.recv(64).startswith(b"HTTP/1.1 200"):
                    return process, time.perf_counter() - started
        except OSError:
            pass
        time.sleep(0.005)


def in_process(model_path: Path, image: bytes, seconds: float) -> dict[str, Any]:
    """The floor: decode + preprocess + session.run for one image, and the best throughput the cores give in-process."""
    cpus = available_cpus()
    settings = Settings.from_env()  # the floor uses the service's own thread setting
    floor_model = Model(model_path, threads=settings.ort_threads, max_pixels=settings.max_image_pixels)
    floor = {"ort_threads": settings.ort_threads, **percentiles(time_ms(lambda: floor_model.classify(image), 200, 20))}
    served = Model(model_path, threads=cpus, max_pixels=50_000_000)
    one_thread = Model(model_path, threads=1, max_pixels=50_000_000)
    options: dict[str, float] = {}
    for name, model, loops in (
        (f"1 loop x ORT {cpus} threads", served, 1),
        (f"{cpus} loops x ORT 1 thread", one_thread, cpus),
    ):
        done = [0] * loops
        stop = time.perf_counter() + seconds

        def run(index: int, m: Model = model, d: list[int] = done, s: float = stop) -> None:
            while time.perf_counter() < s:
                m.classify(image)
                d[index] += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(loops)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        options[name] = round(sum(done) / (time.perf_counter() - started), 2)
    return {"floor": floor, "throughput_ips": options, "best_throughput_ips": max(options.values())}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("MODEL_PATH", "models/model.onnx")))
    parser.add_argument("--image", type=Path, required=True, help="a typical photo (about 500x375 JPEG)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--rss-requests", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-serve.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    image = args.image.read_bytes()
    settings = Settings.from_env()
    report: dict[str, Any] = {
        "cpu": cpu_info(),
        "model": str(args.model),
        "image": args.image.name,
        "service": {"workers": settings.workers, "ort_threads": settings.ort_threads,
                    "inference_concurrency": settings.inference_concurrency},
    }  # fmt: skip
    report["in_process"] = in_process(args.model, image, args.seconds)

    startups = []
    for _ in range(3):
        port = free_port()
        process, seconds = start_server(args.model, port)
        startups.append(seconds)
        if len(startups) < 3:
            process.send_signal(signal.SIGTERM)
            process.wait()
    report["start_to_ready_s"] = {
        "runs": [round(s, 3) for s in startups],
        "median": round(float(np.median(startups)), 3),
    }
    try:
        request = multipart_request(port, image)
        warmup = load(port, request, 4, 2.0)  # warm every inference slot, not just one
        report["rss_mb_after_warmup"] = rss_mb(process.pid)
        client = Client(port, request)
        report["http_single_client"] = percentiles(time_ms(client.send, repeats=500, warmup=0))
        client.close()
        report["throughput"] = []
        samples = [{"requests": 0, "rss_mb": report["rss_mb_after_warmup"]}]
        sent = 500
        for clients in (1, 4, 16):
            row = load(port, request, clients, args.seconds)
            report["throughput"].append(row)
            sent += row["requests"] + row["errors"]
            samples.append({"requests": sent, "rss_mb": rss_mb(process.pid)})
        while sent < args.rss_requests:
            row = load(port, request, 4, 5.0)
            sent += row["requests"] + row["errors"]
            samples.append({"requests": sent, "rss_mb": rss_mb(process.pid)})
        report["rss_mb_after_requests"] = {"requests": sent, "rss_mb": samples[-1]["rss_mb"], "samples": samples}
        report["warmup_requests"] = warmup["requests"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait()

    floor = report["in_process"]["floor"]["p50_ms"]
    best = report["in_process"]["best_throughput_ips"]
    at16 = report["throughput"][-1]["rps"]
    report["verdict"] = {
        "p50_over_floor": round(report["http_single_client"]["p50_ms"] / floor, 3),
        "p50_target": "<= 1.3",
        "throughput16_over_in_process": round(at16 / best, 3),
        "throughput_target": ">= 0.85",
        "rss_growth_mb": round(report["rss_mb_after_requests"]["rss_mb"] - report["rss_mb_after_warmup"], 1),
        "rss_target": "< 200 MB, not growing",
        "ready_target": "< 1.5 s",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
