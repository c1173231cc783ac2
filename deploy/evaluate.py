"""Post-deployment evaluation: labelled photos (ImageFolder layout) sent to a running service.

A failed request counts as a wrong answer, never skipped. Exits 1 below --min-accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deploy.client import predict, wait_ready

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def labelled_photos(root: Path) -> list[tuple[Path, str]]:
    """(photo, label) for every image under root/<label>/."""
    return sorted(
        (path, folder.name)
        for folder in root.iterdir()
        if folder.is_dir()
        for path in folder.iterdir()
        if path.suffix.lower() in IMAGE_SUFFIXES
    )


def evaluate(base_url: str, photos: list[tuple[Path, str]], labels: list[str], concurrency: int) -> dict[str, Any]:
    """Accuracy, per-class precision and recall, confusion matrix, latency percentiles and errors."""

    def ask(item: tuple[Path, str]) -> tuple[str | None, float, str | None]:
        started = time.perf_counter()
        try:
            status, body = predict(base_url, item[0].read_bytes(), item[0].name)
        except OSError as error:
            return None, time.perf_counter() - started, f"{item[0].name}: {error}"
        elapsed = time.perf_counter() - started
        if status != 200:
            return None, elapsed, f"{item[0].name}: HTTP {status} {body.get('error', body)}"
        return body["label"], elapsed, None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(ask, photos))
    index = {label: i for i, label in enumerate(labels)}
    size = len(labels)
    matrix = np.zeros((size, size + 1), dtype=int)  # the last column counts failed requests
    for (_, truth), (predicted, _, _) in zip(photos, answers, strict=True):
        matrix[index[truth], index.get(predicted, size) if predicted else size] += 1
    correct = np.diag(matrix[:, :size])
    predicted_totals = matrix[:, :size].sum(0)
    latencies = np.array([elapsed for _, elapsed, _ in answers]) * 1000
    return {
        "url": base_url,
        "images": len(photos),
        "accuracy": float(correct.sum() / max(len(photos), 1)),
        "precision": {
            lbl: float(correct[i] / predicted_totals[i]) if predicted_totals[i] else 0.0 for lbl, i in index.items()
        },
        "recall": {lbl: float(correct[i] / matrix[i].sum()) if matrix[i].sum() else 0.0 for lbl, i in index.items()},
        "confusion_matrix": {"rows_true": labels, "columns_predicted": [*labels, "failed"], "counts": matrix.tolist()},
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))},
        "errors": sum(error is not None for _, _, error in answers),
        "error_samples": [error for _, _, error in answers if error][:10],
    }


def summary(report: dict[str, Any]) -> str:
    labels = report["confusion_matrix"]["rows_true"]
    lines = [
        f"{report['images']} photos against {report['url']}: accuracy {report['accuracy']:.4f}, "
        f"{report['errors']} failed requests, latency p50 {report['latency_ms']['p50']:.1f} ms "
        f"p95 {report['latency_ms']['p95']:.1f} ms",
        "true \\ predicted  " + "  ".join(f"{c:>7}" for c in report["confusion_matrix"]["columns_predicted"]),
    ]
    for label, row in zip(labels, report["confusion_matrix"]["counts"], strict=True):
        lines.append(f"{label:>17}  " + "  ".join(f"{n:>7}" for n in row))
    for label in labels:
        lines.append(f"{label}: precision {report['precision'][label]:.4f} recall {report['recall'][label]:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder: <data>/<label>/*.jpg")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--min-accuracy", type=float, default=0.97)
    parser.add_argument("--out", type=Path, default=Path("reports/eval-deployed.json"))
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for /ready")
    args = parser.parse_args(argv)
    base_url = args.url.rstrip("/")
    wait_ready(base_url, args.wait)
    photos = labelled_photos(args.data)
    if not photos:
        sys.exit(f"no labelled photos under {args.data}")
    labels = sorted({label for _, label in photos})
    report = evaluate(base_url, photos, labels, args.concurrency)
    report["min_accuracy"] = args.min_accuracy
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    if report["accuracy"] < args.min_accuracy:
        sys.exit(f"accuracy {report['accuracy']:.4f} is below --min-accuracy {args.min_accuracy:.4f}")


if __name__ == "__main__":
    main()
