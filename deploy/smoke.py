"""Smoke test of a running service: /health, /ready, /model, and /predict on real photos. Exit 1 on any failure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy.client import predict, request, wait_ready


def smoke(base_url: str, images: list[Path], timeout: float, expect_sha256: str | None = None) -> list[str]:
    """Every failed check, as a readable line (empty when the service is healthy)."""
    ready = wait_ready(base_url, timeout)
    failures: list[str] = []
    if expect_sha256 and ready.get("model_sha256") != expect_sha256:
        failures.append(f"/ready: model_sha256 {ready.get('model_sha256')} is not the released {expect_sha256}")
    status, health = request(f"{base_url}/health")
    if status != 200 or health.get("model_loaded") is not True:
        failures.append(f"/health: {status} {health}")
    status, model = request(f"{base_url}/model")
    labels = model.get("labels", [])
    if status != 200 or not labels:
        failures.append(f"/model: {status} {model}")
    for image in images:
        status, body = predict(base_url, image.read_bytes(), image.name)
        probabilities = body.get("probabilities", {})
        if status != 200:
            failures.append(f"/predict {image.name}: {status} {body}")
        elif body.get("label") not in labels or set(probabilities) != set(labels):
            failures.append(f"/predict {image.name}: label or probabilities not in {labels}: {body}")
        elif abs(sum(probabilities.values()) - 1) > 1e-4:
            failures.append(f"/predict {image.name}: probabilities sum to {sum(probabilities.values())}")
        elif body.get("model_version") != ready.get("model_version"):
            failures.append(f"/predict {image.name}: model_version {body.get('model_version')} != /ready's")
        else:
            print(f"ok  {image.name}: {body['label']} {max(probabilities.values()):.3f} ({body['latency_ms']:.1f} ms)")
    return failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for /ready")
    parser.add_argument("--expect-sha256", help="fail unless /ready serves the model file with this sha256")
    parser.add_argument("images", nargs="+", type=Path, help="real photos to classify")
    args = parser.parse_args(argv)
    failures = smoke(args.url.rstrip("/"), args.images, args.wait, args.expect_sha256)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"smoke test passed: {args.url}")


if __name__ == "__main__":
    main()
