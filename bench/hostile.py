"""What each class of hostile image costs the server's preprocessing: outcome, CPU time and peak memory.

Every case runs in a fresh process (peak RSS is a high-water mark), through `server.preprocess.Preprocessor` of
this checkout and, with --base, of an older commit checked out from git into a temporary folder. Numbers to read,
not pass/fail: `make bench-hostile` writes reports/bench-hostile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.images import SPEC, animated, flat_image, flat_png, phone_photo, rle_bmp

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
ADDRESS_SPACE_LIMIT = 8 * 1024**3  # a case that needs more dies with MemoryError instead of taking the machine

CASES: dict[str, Callable[[], bytes]] = {
    "12 MP phone JPEG (4032x3024)": phone_photo,
    "12 MP progressive JPEG": lambda: phone_photo(progressive=True),
    "extreme aspect PNG 1x20000": lambda: flat_png(1, 20000),
    "extreme aspect PNG 20000x1": lambda: flat_png(20000, 1),
    "extreme aspect PNG 64x200000": lambda: flat_png(64, 200000),
    "flat RGBA PNG 7000x7000": lambda: flat_png(7000, 7000, "RGBA"),
    "flat RGB PNG 3800x3800 (largest RGB PNG accepted)": lambda: flat_png(3800, 3800),
    "flat RGBA PNG 2700x2700 (largest RGBA PNG accepted)": lambda: flat_png(2700, 2700, "RGBA"),
    "flat WebP 4000x4000": lambda: flat_image("WEBP", 4000, 4000, lossless=True),
    "flat WebP 1900x1900 (largest WebP accepted)": lambda: flat_image("WEBP", 1900, 1900, lossless=True),
    "flat GIF 7000x7000": lambda: flat_image("GIF", 7000, 7000, "P"),
    "flat GIF 3400x3400 (largest GIF accepted)": lambda: flat_image("GIF", 3400, 3400, "P"),
    "RLE8 BMP 7000x7000": lambda: rle_bmp(7000, 7000),
    "RLE8 BMP 4500x4500 (largest RLE BMP accepted)": lambda: rle_bmp(4500, 4500),
    "animated GIF, 1000 frames of 256x256": lambda: animated("GIF", 1000),
    "animated WebP, 1000 frames of 256x256": lambda: animated("WEBP", 1000),
}
BATCH_CASE = "flat RGB PNG 3800x3800 (largest RGB PNG accepted)"

CHILD = r"""
import json, resource, sys, time

def peak_rss_kib():  # VmHWM: this process's own high-water mark (ru_maxrss carries the parent's over fork + exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))

resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
try:
    from imaging import ImageError
except ImportError:  # a --base commit from before the imaging package
    from server.preprocess import ImageError
from server.preprocess import Preprocessor
spec, files = json.loads(sys.argv[1]), sys.argv[2:]
images = [open(f, "rb").read() for f in files]
preprocess = Preprocessor(spec, max_pixels=50_000_000)
preprocess(open(__WARMUP__, "rb").read())
before = peak_rss_kib()
cpu, wall = time.process_time(), time.perf_counter()
outcomes, arrays = [], []
for data in images:
    try:
        arrays.append(preprocess(data))
        outcomes.append("200")
    except ImageError as error:
        outcomes.append(f"{error.status} {error.code}: {error.message}")
    except MemoryError:
        outcomes.append("MemoryError")
print(json.dumps({
    "outcome": sorted(set(outcomes)) if len(set(outcomes)) > 1 else outcomes[0],
    "cpu_s": round(time.process_time() - cpu, 3),
    "wall_s": round(time.perf_counter() - wall, 3),
    "peak_rss_delta_mib": round((peak_rss_kib() - before) / 1024, 1),
    "rss_before_mib": round(before / 1024, 1),
}))
"""


def measure(source: Path, files: list[Path]) -> dict[str, Any]:
    """One fresh process preprocessing `files` one after another with the Preprocessor found under `source`."""
    warmup = ROOT.parent / "shared" / "datasets" / "cats-vs-dogs-2k" / "cats" / "cat.1.jpg"
    code = CHILD.replace("__LIMIT__", str(ADDRESS_SPACE_LIMIT)).replace("__WARMUP__", repr(str(warmup)))
    env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(SPEC), *map(str, files)],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return {"outcome": f"process died (exit {result.returncode}): {result.stderr.strip()[-300:]}"}
    return json.loads(result.stdout)


def checkout(commit: str, into: Path) -> Path:
    """The server and imaging packages as they were at `commit`."""
    archive = subprocess.run(["git", "archive", commit, "server", *_existing(commit, "imaging")], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _existing(commit: str, path: str) -> list[str]:
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=ROOT, capture_output=True)
    return [path] if found.returncode == 0 else []


def run(base: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = {"after": ROOT}
        if base:
            sources = {"before": checkout(base, folder / "base"), **sources}
        files: dict[str, Path] = {}
        for index, (name, make) in enumerate(CASES.items()):
            files[name] = folder / f"case{index}"
            files[name].write_bytes(make())
        results: dict[str, Any] = {}
        for name, path in files.items():
            row: dict[str, Any] = {"wire_bytes": path.stat().st_size}
            for label, source in sources.items():
                row[label] = measure(source, [path])
                print(f"{name:55s} {label:6s} {row[label]}", flush=True)
            results[name] = row
        batch = f"batch of {BATCH} x {BATCH_CASE}"
        results[batch] = {"wire_bytes": BATCH * files[BATCH_CASE].stat().st_size}
        for label, source in sources.items():
            results[batch][label] = measure(source, [files[BATCH_CASE]] * BATCH)
            print(f"{batch:55s} {label:6s} {results[batch][label]}", flush=True)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default=None, help="also measure the server of this git commit (e.g. cb8dd46)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench-hostile.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    results = run(args.base)
    report = {
        "spec": SPEC,
        "base": args.base,
        "address_space_limit_gib": ADDRESS_SPACE_LIMIT / 1024**3,
        "cases": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
