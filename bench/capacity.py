"""`python -m bench.capacity`: requests per second per CPU through the real service, for the capacity plan.

The service runs pinned to `--cpus` cores (its own sizing then follows: 2 inferences in flight per core), the load
generator (bench.loadgen's single-threaded keep-alive client) on the remaining core. Both APIs are measured in one
run: /predict (multipart) and the Open Inference Protocol infer (binary tensor data, one image per request).

Two rates per API: wall-clock requests/s per pinned core, and requests per CPU-second the service process used
(utime + stime of all its threads). On a shared machine the first falls with the neighbours' load; the second is
what a core gives when it is the service's alone, the number the capacity plan needs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, add_model_argument, cpu_info, cpu_seconds, write_report
from bench.loadgen import load, prepare
from bench.serve import ROOT, predict_request, start_server
from deploy.client import free_port

BATCH = 8


def v2_request(port: int, image: bytes, count: int = 1) -> bytes:
    """V2 infer with `count` copies of the image in the binary tensor data extension."""
    data = (struct.pack("<I", len(image)) + image) * count
    tensor = {"name": "image", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "label"}, {"name": "probabilities"}]}).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return prepare("POST", f"http://127.0.0.1:{port}/v2/models/catsdogs/infer", content=header + data, headers=headers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--image", type=Path, required=True, help="a typical photo (about 500x375 JPEG)")
    parser.add_argument("--cpus", type=int, default=1, help="cores the service is pinned to")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-capacity.json"))
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose service is measured (a before)")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0))
    if args.cpus >= len(available):
        parser.error(f"--cpus must leave a core for the load generator ({len(available)} available)")
    cores, client_cores = set(available[: args.cpus]), set(available[args.cpus :])
    image = args.image.read_bytes()
    os.sched_setaffinity(0, client_cores)
    port = free_port()
    process, _ = start_server(args.model, port, root=args.root, env={"ORT_THREADS": "1"}, cores=cores)
    report: dict[str, Any] = {"cpu": cpu_info(), "model": str(args.model), "image": args.image.name,
                              "service_cpus": args.cpus, "clients": args.clients, "seconds": args.seconds,
                              "root": str(args.root)}  # fmt: skip
    try:
        requests = {
            "/predict": (predict_request(port, image), 1),
            "/v2/models/catsdogs/infer": (v2_request(port, image), 1),
            f"/v2/models/catsdogs/infer, {BATCH} images": (v2_request(port, image, BATCH), BATCH),
        }
        for request, _ in requests.values():
            load(port, request, args.clients, 2.0)  # warm every inference slot
        report["results"] = {}
        for endpoint, (request, images) in requests.items():
            used, meter = cpu_seconds(process.pid), CpuMeter(process.pid, port)
            row = load(port, request, args.clients, args.seconds)
            used = cpu_seconds(process.pid) - used
            report["results"][endpoint] = {
                **row,
                "rps_per_pinned_cpu": round(row["rps"] / args.cpus, 2),
                "cpu_seconds": round(used, 2),
                "requests_per_cpu_second": round(row["requests"] / used, 2),
                # the service's own cost: its CPU less its worker threads' on the in-process path, in the same window
                **meter.per_request(row["requests"]),
                "images_per_cpu_second": round(images * row["requests"] / used, 2),
            }
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait()
    write_report(args.out, report)


if __name__ == "__main__":
    main()
