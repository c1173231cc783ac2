"""`make bench-clients`: honest users' latency while hostile clients hold connections, in one run.

Three phases against a fresh `python -m server`: an honest client sending ordinary photos one after another alone;
the same while `--slow` uploads send their body one byte every `--drip` seconds; and the same while `--half-open`
connections each sent half a request head and stopped. For the hostile clients it reports what the server did
to each (answered 408, closed) and after how long. Numbers to read, not pass/fail (tests/test_clients.py checks the
behaviour on a small scale).
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2 as httpx
import numpy as np

from bench.common import add_model_argument, cpu_info, write_report
from bench.loadgen import ResponseReader, connect
from bench.serve import ROOT, start_server
from deploy.client import free_port

SLOW_BODY = 100_000  # a photo's size: what each slow upload declares


def honest(url: str, image: bytes, count: int) -> dict[str, Any]:
    """`count` photos one after another on fresh connections: statuses and latency."""
    statuses, times = [], []
    for _ in range(count):
        started = time.perf_counter()
        try:
            status = httpx.post(f"{url}/predict", content=image, headers={"content-type": "image/jpeg"},
                                timeout=30).status_code  # fmt: skip
        except httpx.TransportError as error:
            status = type(error).__name__
        statuses.append(status)
        times.append((time.perf_counter() - started) * 1000)
    return {"requests": count, "statuses": dict(Counter(map(str, statuses))),
            "p50_ms": round(float(np.percentile(times, 50)), 1), "max_ms": round(max(times), 1)}  # fmt: skip


class Hostile:
    """Connections that misbehave on purpose, driven by one thread: each sends `head` at once, then one byte of
    `drip` every `interval` seconds (none when drip is empty), and records when the server answered or closed."""

    def __init__(self, port: int, count: int, head: bytes, drip: bytes, interval: float) -> None:
        self.port, self.count, self.head, self.drip, self.interval = port, count, head, drip, interval
        self.outcomes: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self) -> Hostile:
        self.thread.start()
        self.ready.wait(60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        started = time.perf_counter()
        for index in range(self.count):
            connection = connect(self.port, timeout=5)
            connection.sendall(self.head)
            selector.register(connection, selectors.EVENT_READ, data={"index": index, "sent": 0, "reader": None})
        self.ready.set()
        next_drip = time.perf_counter() + self.interval
        while selector.get_map() and not self.stop.is_set():
            for key, _ in selector.select(timeout=0.05):
                self.finish(selector, key, started)
            if self.drip and time.perf_counter() >= next_drip:
                next_drip += self.interval
                for key in list(selector.get_map().values()):
                    offset = key.data["sent"]
                    try:
                        key.fileobj.send(self.drip[offset : offset + 1])  # type: ignore[union-attr]
                        key.data["sent"] += 1
                    except OSError:
                        self.finish(selector, key, started)
        for key in list(selector.get_map().values()):  # still open when the phase ended
            self.outcomes.append({"status": "open", "seconds": round(time.perf_counter() - started, 1)})
            selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]

    def finish(self, selector: selectors.BaseSelector, key: selectors.SelectorKey, started: float) -> None:
        """The server answered, closed, or both: record it and drop the connection."""
        connection: socket.socket = key.fileobj  # type: ignore[assignment]
        try:
            chunk = connection.recv(65536)
        except OSError:
            chunk = b""
        reader = key.data["reader"] or ResponseReader()
        key.data["reader"] = reader
        if chunk:
            reader.feed(chunk)
            if not reader.complete:
                return
        status = reader.complete[0].status if reader.complete else "closed"
        self.outcomes.append({"status": status, "seconds": round(time.perf_counter() - started, 1)})
        selector.unregister(connection)
        connection.close()

    def wait_ended(self, timeout: float) -> None:
        """Until the server has answered or closed every connection, or `timeout` seconds."""
        deadline = time.perf_counter() + timeout
        while len(self.outcomes) < self.count and time.perf_counter() < deadline:
            time.sleep(0.1)

    def summary(self) -> dict[str, Any]:
        seconds = [o["seconds"] for o in self.outcomes if o["status"] != "open"]
        return {"connections": self.count, "outcomes": dict(Counter(str(o["status"]) for o in self.outcomes)),
                "ended_after_s": {"min": min(seconds, default=None), "max": max(seconds, default=None)}}  # fmt: skip


def slow_uploads(port: int, count: int, interval: float) -> Hostile:
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {SLOW_BODY}\r\n\r\n"
    return Hostile(port, count, head.encode(), b"\xff" * SLOW_BODY, interval)


def half_open(port: int, count: int) -> Hostile:
    return Hostile(port, count, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty", b"", 1.0)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--image", type=Path, required=True, help="a typical photo (about 500x375 JPEG)")
    parser.add_argument("--requests", type=int, default=40, help="honest requests per phase")
    parser.add_argument("--slow", type=int, default=40, help="slow uploads")
    parser.add_argument("--drip", type=float, default=2.0, help="seconds between two bytes of a slow upload")
    parser.add_argument("--half-open", type=int, default=300, help="connections that send half a request head")
    parser.add_argument("--hold", type=float, default=70.0, help="seconds to keep the hostile clients on")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose service is measured (a before run)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-clients.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    image = args.image.read_bytes()
    port = free_port()
    process, _ = start_server(args.model, port, root=args.root)
    url = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"cpu": cpu_info(), "model": str(args.model), "image": args.image.name,
                              "root": str(args.root)}  # fmt: skip
    try:
        honest(url, image, 5)  # warm-up
        report["alone"] = honest(url, image, args.requests)
        for name, hostile in (("slow_uploads", slow_uploads(port, args.slow, args.drip)),
                              ("half_open", half_open(port, args.half_open))):  # fmt: skip
            with hostile:
                report[f"with_{name}"] = honest(url, image, args.requests)
                hostile.wait_ended(args.hold)
            report[name] = hostile.summary()
            print(name, json.dumps(report[name]), flush=True)
        report["alone_after"] = honest(url, image, args.requests)
    finally:
        process.terminate()
        process.wait()
    write_report(args.out, report)


if __name__ == "__main__":
    main()
