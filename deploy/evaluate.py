"""Post-deployment evaluation: labelled photos (one folder per class) sent to a running service.

Class folders match the model's labels whatever their case and number (`cat`, `cats`, `Cat`). A failed request
counts as a wrong answer, never skipped. Exits 1 unless the accuracy is shown at least --min-accuracy (server.floor:
the lower end of its Wilson 95% interval, never the point estimate), 2 on a usage error (no folder, no service).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deploy.client import predict, request, wait_ready
from imaging import is_image_file, label_for_name
from server.floor import floor

DEFAULT_OUT = Path("build/eval-deployed.json")


class UsageError(Exception):
    """Something the user can fix before any photo is sent; reported as one line."""


def labelled_photos(root: Path, labels: list[str]) -> list[tuple[Path, str]]:
    """(photo, model label) for every image under root/<class folder>/; a folder matching no label is an error."""
    if not root.is_dir():
        raise UsageError(f"no such folder: {root}")
    photos: list[tuple[Path, str]] = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        images = sorted(path for path in folder.iterdir() if is_image_file(path))
        label = label_for_name(folder.name, labels)
        if images and label is None:
            raise UsageError(f"folder {folder} matches none of the model's labels ({', '.join(labels)})")
        photos += [(path, label) for path in images if label]
    if not photos:
        raise UsageError(
            f"no labelled photos under {root} (expected {root}/<label>/*.jpg, labels: {', '.join(labels)})"
        )
    return photos


def model_labels(base_url: str, wait: float) -> list[str]:
    """The labels the deployed model predicts, from GET /model; fails fast when nothing listens at the URL."""
    try:
        request(f"{base_url}/health", timeout=5)
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise UsageError(f"cannot reach the service at {base_url}: {reason}") from None
    try:
        wait_ready(base_url, wait)
    except TimeoutError as error:
        raise UsageError(str(error)) from None
    status, body = request(f"{base_url}/model", timeout=10)
    try:
        return list(body["preprocess"]["labels"])
    except (KeyError, TypeError):
        raise UsageError(f"{base_url}/model answered {status} without the model's labels") from None


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
        if body.get("label") not in labels:
            return None, elapsed, f"{item[0].name}: label {body.get('label')!r} is none of {labels}"
        return body["label"], elapsed, None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(ask, photos))
    index = {label: i for i, label in enumerate(labels)}
    size = len(labels)
    failed = size  # the last column counts failed requests
    truths = np.array([index[truth] for _, truth in photos], dtype=int)
    answered = np.array([index[label] if label else failed for label, _, _ in answers], dtype=int)
    matrix = confusion_matrix(truths, answered, size + 1)[:size]
    precision, recall = precision_recall(matrix[:, :size], matrix.sum(1))
    latencies = np.array([elapsed for _, elapsed, _ in answers]) * 1000
    errors = [error for _, _, error in answers if error]
    assert len(errors) == matrix[:, failed].sum(), "every failed request sits in the failed column"
    return {
        "url": base_url,
        "images": len(photos),
        "accuracy": float(np.trace(matrix[:, :size]) / max(len(photos), 1)),
        "precision": {label: float(precision[i]) for label, i in index.items()},
        "recall": {label: float(recall[i]) for label, i in index.items()},
        "confusion_matrix": {"rows_true": labels, "columns_predicted": [*labels, "failed"], "counts": matrix.tolist()},
        "latency_ms": {"p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))},
        "errors": len(errors),
        "error_samples": errors[:10],
    }


def confusion_matrix(truths: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """Counts with true classes as rows and predictions as columns (scikit-learn's layout; the serve side has no
    scikit-learn: tests/test_deploy.py checks the two agree)."""
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (truths, predictions), 1)
    return matrix


def precision_recall(matrix: np.ndarray, row_totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, from a square confusion matrix: precision over the predictions, recall over `row_totals` (every
    photo of the class, failed requests included); 0 where nothing was predicted or there is no photo."""
    hits = np.diag(matrix).astype(float)
    predicted = matrix.sum(0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, row_totals, out=np.zeros_like(hits), where=row_totals > 0)
    return precision, recall


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
    lines += [f"failed: {sample}" for sample in report["error_samples"]]
    return "\n".join(lines)


def floor_value(text: str) -> float:
    """A floor is a rate in [0, 1): checked before the evaluation runs, not after it."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a floor in [0, 1), not {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, required=True, help="one folder per class: <data>/<label>/*.jpg")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--min-accuracy", type=floor_value, default=0.90,
                        help="the floor: the lower end of the accuracy's Wilson 95%% interval must reach it (0.90: a "
                        "sound model, ~98%% on the ~200 test photos, shows it with room to spare; a broken deployment "
                        "cannot)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON report (default: {DEFAULT_OUT})")
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for /ready once the service answers")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    base_url = args.url.rstrip("/")
    try:
        if not args.data.is_dir():
            raise UsageError(f"no such folder: {args.data}")
        labels = model_labels(base_url, args.wait)
        photos = labelled_photos(args.data, labels)
    except UsageError as error:
        print(f"deploy.evaluate: {error}", file=sys.stderr)
        sys.exit(2)
    report = evaluate(base_url, photos, labels, args.concurrency)
    correct = int(np.trace(np.array(report["confusion_matrix"]["counts"])[:, : len(labels)]))
    report["floor"] = floor(correct, report["images"], args.min_accuracy, "--min-accuracy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"report written to {args.out}")
    if not report["floor"]["accepted"]:
        sys.exit(f"deploy.evaluate refused: {report['floor']['reason']}")
    print(f"floor: {report['floor']['reason']}")


if __name__ == "__main__":
    main()
