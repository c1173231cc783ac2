"""`make bench`: the service's latency, throughput, memory and start-up against its in-process floor, in one run.

The load comes from bench.loadgen: prepared requests on keep-alive connections, all driven by one thread.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import CpuMeter, add_model_argument, cpu_info, percentiles, time_ms, write_report
from bench.loadgen import Client, load, one_shot, prepare
from deploy.client import free_port
from server.config import Settings, available_cpus
from server.model import Model
from server.model_file import choose_model_file

ROOT = Path(__file__).resolve().parents[1]


def predict_request(port: int, image: bytes) -> bytes:
    """POST /predict with the photo as multipart field `file`, as `curl -F file=@photo.jpg` sends it."""
    files = {"file": ("photo.jpg", image, "image/jpeg")}
    return prepare("POST", f"http://127.0.0.1:{port}/predict", files=files)


def batch_request(port: int, images: list[tuple[str, bytes, str]]) -> bytes:
    """A /predict/batch request: one `files` part per (filename, bytes, content type)."""
    files = [("files", image) for image in images]
    return prepare("POST", f"http://127.0.0.1:{port}/predict/batch", files=files)


def ready_request(port: int) -> bytes:
    return prepare("GET", f"http://127.0.0.1:{port}/ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")


def start_server(
    model: Path, port: int, root: Path = ROOT, env: dict[str, str] | None = None, cores: set[int] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """`python -m server` (from `root`: another checkout's code for a before/after run) with the given model, extra
    environment and CPU affinity; returns the process and the seconds from spawn to /ready = 200."""
    environment = {
        "MALLOC_ARENA_MAX": "2",  # as the serve image sets it (Dockerfile.serve)
        **os.environ,
        "MODEL_PATH": str(model.resolve()),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        **(env or {}),
    }
    started = time.perf_counter()
    # The service logs as in production (a JSON line per request), into the void.
    process = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd=root, env=environment, stdout=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )  # fmt: skip
    probe = ready_request(port)
    deadline = started + 120
    while one_shot(port, probe, timeout=1)[0] != 200:
        if process.poll() is not None or time.perf_counter() > deadline:
            process.kill()
            raise RuntimeError("the server exited or did not become ready during start-up")
        time.sleep(0.005)
    return process, time.perf_counter() - started


def in_process(model_path: Path, image: bytes, seconds: float) -> dict[str, Any]:
    """The floor: decode + preprocess + session.run for one image, and the best throughput the cores give in-process."""
    cpus = available_cpus()
    settings = Settings.from_env()  # the floor uses the service's own thread setting
    floors = {}
    for threads in sorted({settings.ort_threads, cpus}):
        floor_model = Model(model_path, threads=threads, max_pixels=settings.max_image_pixels)
        floors[threads] = {
            "ort_threads": threads,
            **percentiles(time_ms(lambda m=floor_model: m.classify(image), 200, 20)),
        }
    floor = min(floors.values(), key=lambda f: f["p50_ms"])  # the fastest single-photo time in-process
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
    return {"floor": floor, "floors": list(floors.values()), "throughput_ips": options,
            "best_throughput_ips": max(options.values())}  # fmt: skip


def flood(port: int, request: bytes, total: int = 256, parallel: int = 64) -> dict[str, Any]:
    """`total` requests, `parallel` at a time, each on a fresh connection: what each got and how fast."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    pending = list(range(total))

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                pending.pop()
            outcome = one_shot(port, request)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    by_status: dict[str, int] = {}
    for status, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    def ms(status: int) -> dict[str, float]:
        times = [seconds * 1000 for got, seconds in results if got == status]
        return {"p50_ms": round(float(np.percentile(times, 50)), 1), "max_ms": round(max(times), 1)} if times else {}

    return {"requests": total, "parallel": parallel, "by_status": by_status, "dropped": by_status.get("0", 0),
            "seconds": round(elapsed, 2), "ok": ms(200), "refused": ms(503)}  # fmt: skip


def worst_mix(port: int, pid: int, name: str, request: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` connections sending `request` back to back for `seconds`: the process's peak RSS meanwhile."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    outcomes: list[int] = []
    stop = time.perf_counter() + seconds

    def worker() -> None:
        while time.perf_counter() < stop:
            outcomes.append(one_shot(port, request)[0])

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = {str(s): outcomes.count(s) for s in sorted(set(outcomes))}
    return {"mix": name, "clients": clients, "body_bytes": len(request), "by_status": statuses,
            "peak_rss_mb": peak_rss_mb(pid)}  # fmt: skip


def largest_accepted_side(model: Path, settings: Settings) -> int:
    """The side of the largest square RGBA PNG the decode budget (MAX_DECODE_BYTES) accepts: the costliest image."""
    import onnxruntime as ort

    from imaging import Decoder
    from imaging.budget import decode_cost

    served = choose_model_file(model).path  # MODEL_PATH may name the models folder, as make bench passes it
    session = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    spec = json.loads(session.get_modelmeta().custom_metadata_map["catsdogs"])["preprocess"]
    decoder = Decoder.from_spec(spec, max_pixels=settings.max_image_pixels, max_bytes=settings.max_decode_bytes)
    low, high = 1, int(settings.max_image_pixels**0.5)
    while low < high:
        side = (low + high + 1) // 2
        cost = decode_cost("RGBA", (side, side), alpha=True, factor=decoder.reduce_factor((side, side)))
        low, high = (side, high) if cost <= settings.max_decode_bytes else (low, side - 1)
    return low


def worst_requests(port: int, image: bytes, settings: Settings, pixels: int) -> dict[str, bytes]:
    """The costliest requests the defaults accept: the largest body, the fullest batch, the most pixels."""
    padded = image + b"\0" * (settings.max_upload_bytes - len(image) - 1024)  # bytes after JPEG's end are ignored
    side = int(pixels**0.5)
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (120, 80, 40, 128)).save(buffer, format="PNG")  # small on the wire
    flat = buffer.getvalue()
    # V2 with JSON base64 data: the largest JSON body that fits, the body and its parsed strings both held a while
    base64_image = image + b"\0" * ((settings.max_upload_bytes - 4096) * 3 // 4 - len(image))
    v2_json = v2_json_request(port, base64_image)
    return {
        f"/predict, {len(padded) >> 20} MiB body (MAX_UPLOAD_BYTES)": predict_request(port, padded),
        f"/predict/batch, {settings.max_batch_files} photos (MAX_BATCH_FILES)": batch_request(
            port, [(f"{i}.jpg", image, "image/jpeg") for i in range(settings.max_batch_files)]
        ),
        f"/predict/batch, 2 x {side}x{side} RGBA PNG ({len(flat) >> 10} KiB each)": batch_request(
            port, [(f"{i}.png", flat, "image/png") for i in range(2)]
        ),
        f"V2 infer, {len(v2_json) >> 20} MiB JSON body (base64 data, MAX_UPLOAD_BYTES)": v2_json,
    }


def v2_json_request(port: int, image: bytes) -> bytes:
    """V2 infer with the image as base64 in the JSON `data` (the costlier of the protocol's two encodings)."""
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}
    return prepare("POST", f"http://127.0.0.1:{port}/v2/models/catsdogs/infer", json={"inputs": [tensor]})


def measure_service(root: Path, model: Path, image: bytes, args: argparse.Namespace) -> dict[str, Any]:
    """Start-up, one client's latency, throughput at 1/4/16 clients and RSS over many requests, for the service
    run from `root`; with --worst (this checkout only) also the flood and the worst accepted mixes."""
    report: dict[str, Any] = {"root": str(root)}
    startups = []
    for _ in range(3):
        port = free_port()
        process, seconds = start_server(model, port, root)
        startups.append(seconds)
        if len(startups) < 3:
            process.send_signal(signal.SIGTERM)
            process.wait()
    report["start_to_ready_s"] = {
        "runs": [round(s, 3) for s in startups],
        "median": round(float(np.median(startups)), 3),
    }
    try:
        request = predict_request(port, image)
        warmup = load(port, request, 4, 2.0)  # warm every inference slot, not just one
        report["rss_mb_after_warmup"] = rss_mb(process.pid)
        client = Client(port, request)
        report["http_single_client"] = percentiles(time_ms(client.send, repeats=500, warmup=0))
        client.close()
        report["throughput"] = []
        samples = [{"requests": 0, "rss_mb": report["rss_mb_after_warmup"]}]
        sent = 500
        for clients in (1, 4, 16):
            meter = CpuMeter(process.pid, port) if args.cpu else None
            row = load(port, request, clients, args.seconds)
            if meter:
                row.update(meter.per_request(row["requests"]))
            report["throughput"].append(row)
            sent += row["requests"] + row["errors"]
            samples.append({"requests": sent, "rss_mb": rss_mb(process.pid)})
        while sent < args.rss_requests:
            row = load(port, request, 4, 5.0)
            sent += row["requests"] + row["errors"]
            samples.append({"requests": sent, "rss_mb": rss_mb(process.pid)})
        report["rss_mb_after_requests"] = {"requests": sent, "rss_mb": samples[-1]["rss_mb"], "samples": samples}
        report["warmup_requests"] = warmup["requests"]
        if args.worst:
            settings = Settings.from_env()
            report["flood"] = flood(port, request)
            report["ready_after_flood"] = one_shot(port, ready_request(port))[0] == 200
            capacity = settings.inference_concurrency + settings.max_queue
            pixels = args.worst_pixels or largest_accepted_side(model, settings) ** 2
            report["worst_mix"] = [
                worst_mix(port, process.pid, name, body, capacity, args.seconds)
                for name, body in worst_requests(port, image, settings, pixels).items()
            ]
            report["peak_rss_mb"] = max(row["peak_rss_mb"] for row in report["worst_mix"])
            report["ready_after_worst_mix"] = one_shot(port, ready_request(port))[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait()
    return report


def verdict(in_process: dict[str, Any], service: dict[str, Any]) -> dict[str, Any]:
    floor = in_process["floor"]["p50_ms"]
    best = in_process["best_throughput_ips"]
    at16 = service["throughput"][-1]["rps"]
    beyond = service["throughput"][-1].get("cpu_ms_beyond_in_process")
    return {
        "cpu_ms_beyond_in_process_16_clients": beyond,
        "cpu_target": "<= 1 ms per request (the service's CPU less its worker threads' CPU on the in-process path)",
        "p50_over_floor": round(service["http_single_client"]["p50_ms"] / floor, 3),
        "p50_target": "<= 1.3",
        "throughput16_over_in_process": round(at16 / best, 3),
        "throughput_target": ">= 0.85",
        "rss_growth_mb": round(service["rss_mb_after_requests"]["rss_mb"] - service["rss_mb_after_warmup"], 1),
        "rss_target": "< 200 MB, not growing",
        "ready_target": "< 1.5 s",
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--image", type=Path, required=True, help="a typical photo (about 500x375 JPEG)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput measurement")
    parser.add_argument("--rss-requests", type=int, default=5000)
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. the previous release) measured too")
    parser.add_argument("--torch-reference", type=Path, nargs="?", const=Path("models/final.pt"), default=None,
                        help="also measure bench/torch_server.py (FastAPI + PyTorch) with this checkpoint")  # fmt: skip
    parser.add_argument("--no-worst", dest="worst", action="store_false", help="skip the flood and worst mixes")
    parser.add_argument(
        "--no-cpu",
        dest="cpu",
        action="store_false",
        help="skip the CPU split (a --baseline from before catsdogs_inference_cpu_seconds existed)",
    )
    parser.add_argument("--worst-pixels", type=int, default=0, help="pixels of the worst PNG (MAX_IMAGE_PIXELS)")
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
        "settings": {name: getattr(settings, name) for name in (
            "workers", "ort_threads", "ort_solo_threads", "inference_concurrency", "max_queue", "max_admitted_bytes",
            "queue_timeout", "decode_concurrency", "max_upload_bytes", "max_image_pixels", "max_batch_files")},
    }  # fmt: skip
    report["in_process"] = in_process(args.model, image, args.seconds)
    report["service"] = measure_service(ROOT, args.model, image, args)
    report["verdict"] = verdict(report["in_process"], report["service"])
    if args.baseline:
        args.worst = False
        report["baseline"] = measure_service(args.baseline, args.model, image, args)
        report["baseline_verdict"] = verdict(report["in_process"], report["baseline"])
    if args.cpu:  # the framework floor at the service's rate, and each service's own CPU over it
        rps = report["service"]["throughput"][-1]["rps"]
        report["framework_floor"] = measure_floor(image, settings.inference_concurrency, rps, args.seconds)
        # the same floor with its threads running the model: is the sleeping floor too kind to the service, whose
        # event loop shares the cores and their caches with the model? (docs/capacity.md, "the fourth round")
        report["framework_floor_with_model"] = measure_floor(
            image, settings.inference_concurrency, rps, args.seconds, model=args.model
        )
        floor = report["framework_floor"]["cpu_ms_per_request"]
        loaded = report["framework_floor_with_model"]["cpu_ms_beyond_in_process"]
        for name in ("verdict", "baseline_verdict") if args.baseline else ("verdict",):
            beyond = report[name]["cpu_ms_beyond_in_process_16_clients"]
            report[name]["framework_floor_cpu_ms_16_clients"] = floor
            report[name]["cpu_beyond_in_process_over_floor"] = round(beyond / floor, 2)
            report[name]["floor_target"] = "<= 2 (proposed: the service's own work at most the floor again)"
            report[name]["floor_with_model_cpu_ms_beyond_in_process_16_clients"] = loaded
    if args.torch_reference:
        report["torch_reference"] = measure_torch_reference(args.torch_reference, image, args.seconds)
        ours, theirs = report["service"]["throughput"][-1]["rps"], report["torch_reference"]["throughput"][-1]["rps"]
        report["verdict"]["throughput16_over_torch_reference"] = round(ours / theirs, 2)
        report["verdict"]["torch_reference_target"] = ">= 5"
    write_report(args.out, report)


@contextlib.contextmanager
def uvicorn_app(app: str, image: bytes, env: dict[str, str], uvicorn_args: tuple[str, ...] = (),
                startup_s: float = 60) -> Iterator[tuple[subprocess.Popen[bytes], int, bytes]]:  # fmt: skip
    """A yardstick server (`uvicorn module:app` from this checkout) that answers the prediction request for `image`,
    warmed up: its process, port and that request. Stopped on the way out."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning",
                                *uvicorn_args], cwd=ROOT, env={**os.environ, **env})  # fmt: skip
    try:
        request = predict_request(port, image)
        deadline = time.perf_counter() + startup_s
        while one_shot(port, request, timeout=5)[0] != 200:
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"{app} did not start")
            time.sleep(0.1)
        load(port, request, 4, 2.0)  # warm-up
        yield process, port, request
    finally:
        process.terminate()
        process.wait()


def measure_floor(image: bytes, threads: int, rps: float, seconds: float, model: Path | None = None) -> dict[str, Any]:
    """bench/floor_server.py (Starlette on the same uvicorn, a sleeping thread in place of the model) at the
    service's request rate under 16 clients: each of its `threads` sleeps threads/rps s. Its CPU per request is the
    least any service on this stack spends beyond the model at that rate, on this machine, now. With `model`, its
    threads run the in-process path on `image` instead (at the rate they reach), and the CPU beyond it is read as
    the service's is (bench.common.CpuMeter)."""
    env = {"FLOOR_SECONDS": f"{threads / rps:.4f}", "FLOOR_THREADS": str(threads)}
    uvicorn_args = ("--loop", "uvloop", "--http", "httptools", "--no-access-log")  # as the service runs
    with contextlib.ExitStack() as stack:
        if model is not None:
            photo = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".jpg"))
            photo.write(image)
            photo.flush()
            env.update(FLOOR_MODEL=str(model.resolve()), FLOOR_IMAGE=photo.name)
        process, port, request = stack.enter_context(
            uvicorn_app("bench.floor_server:app", image, env, uvicorn_args, startup_s=120)
        )
        meter = CpuMeter(process.pid, port)  # the floor's /metrics is the service's registry
        row = load(port, request, 16, seconds)
        cpu = meter.per_request(row["requests"])
    if model is None:  # nothing runs in process: all of it is the floor's
        return {**row, "thread_seconds": round(threads / rps, 4), "cpu_ms_per_request": cpu["cpu_ms_per_request"]}
    return {**row, "model": str(model), **cpu}


def measure_torch_reference(checkpoint: Path, image: bytes, seconds: float) -> dict[str, Any]:
    """The seed-style FastAPI + PyTorch server (bench/torch_server.py) under the same load as the service."""
    env = {"TORCH_CHECKPOINT": str(checkpoint.resolve())}
    with uvicorn_app("bench.torch_server:app", image, env, startup_s=120) as (process, port, request):
        client = Client(port, request)
        single = percentiles(time_ms(client.send, repeats=100, warmup=0))
        client.close()
        rows = [load(port, request, clients, seconds) for clients in (1, 4, 16)]
        rss = rss_mb(process.pid)
    return {"checkpoint": str(checkpoint), "http_single_client": single, "throughput": rows, "rss_mb": rss}


if __name__ == "__main__":
    main()
