"""`make drift-demo`: the drift gauges moving when the input changes, through the service's own code path.

Sends three streams of real photos to the service in-process (Starlette TestClient, real model, one window of
`--window` photos each, the window refilled between streams) and prints catsdogs_drift_psi per signal after each:
photos like the reference (cats and dogs alternating), dogs only, and images that are neither (not-pets-dev).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
from pathlib import Path

from starlette.testclient import TestClient

from server.app import create_app
from server.config import Settings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
PSI_LINE = re.compile(r'^catsdogs_drift_psi\{signal="([^"]+)"\} (\S+)$', re.MULTILINE)


def streams(count: int, start: int) -> dict[str, list[Path]]:
    pets = SHARED / "cats-vs-dogs-2k"
    cats = [pets / "cats" / f"cat.{i}.jpg" for i in range(start, start + count)]
    dogs = [pets / "dogs" / f"dog.{i}.jpg" for i in range(start, start + count)]
    return {
        "cats and dogs (like the reference)": list(itertools.chain(*zip(cats, dogs, strict=True)))[:count],
        "dogs only": dogs,
        "not pets (not-pets-dev)": sorted((SHARED / "not-pets-dev").glob("*.jpg"))[:count],
    }


def psi(client: TestClient) -> dict[str, float]:
    client.app.state.observer.wait_idle()  # predictions reach the drift windows off the event loop
    return {name: round(float(value), 3) for name, value in PSI_LINE.findall(client.get("/metrics").text)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--window", type=int, default=200, help="DRIFT_WINDOW, and photos per stream")
    parser.add_argument("--start", type=int, default=101, help="first photo number of the pet streams")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    settings = dataclasses.replace(Settings.from_env(), model_path=args.model, drift_window=args.window)
    results = {}
    with TestClient(create_app(settings)) as client:
        for name, photos in streams(args.window, args.start).items():
            for photo in photos:
                response = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
                response.raise_for_status()
            results[name] = psi(client)
            print(f"{name:40s} {json.dumps(results[name])}", flush=True)
    print(json.dumps({"window": args.window, "model": str(args.model), "psi": results}, indent=2))


if __name__ == "__main__":
    main()
