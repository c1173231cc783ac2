"""Classify every image under a folder into a CSV (or JSON lines) file: a backfill of an unlabelled catalogue.

In process by default, through the service's own code (server.model.Model: the same decoding, preprocessing,
limits and model), or against a running service with --url. A file that cannot be classified gets a row with its
error; the run never stops for one. When OUTPUT exists, the rows already there are kept and skipped (resume).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from deploy.client import predict
from imaging import ImageError, find_images, is_image_file

RETRIED_ON_RESUME = {"unreachable", "server_error"}  # the service's fault, not the file's: asked again on resume
FIRST_COLUMNS = ["path", "label"]
MAX_NAMED = 10  # files left out named in the summary
LAST_COLUMNS = ["error_code", "error"]

Row = dict[str, Any]
Classifier = Callable[[list[tuple[Path, bytes]]], list[Row]]

if TYPE_CHECKING:
    from server.config import Settings


def error_row(code: str, message: str) -> Row:
    return {"error_code": code, "error": message}


# --- two ways to classify: in process, or over HTTP -----------------------------------------------------------------


def in_process(settings: Settings, workers: int) -> tuple[Classifier, str]:
    """Batches through server.model.Model built as the service builds it (its limits, decode budget, pet threshold
    and mirror view), `workers` images at a time, each on one onnxruntime thread: the service's own setting,
    which gives the most images per second (bench/serve.py's in-process capacity), in the files' order."""
    from imaging import limit_pillow
    from server.model import Model, Prediction

    limit_pillow(settings.max_image_pixels)
    model = Model.from_settings(settings, threads=1)
    pool = ThreadPoolExecutor(max_workers=workers)

    def to_row(result: Prediction | ImageError) -> Row:
        if isinstance(result, ImageError):
            return error_row(result.code, result.message)
        return {**asdict(result), "model_version": model.version}

    def classify_one(data: bytes) -> Row:
        [result], _ = model.classify_all([data])  # a bad file is its own ImageError row
        return to_row(result)

    def classify_batch(batch: list[tuple[Path, bytes]]) -> list[Row]:
        return list(pool.map(classify_one, [data for _, data in batch]))

    return classify_batch, f"{model.path} (in process, model {model.version}, {workers} at a time)"


def over_http(base_url: str, concurrency: int, timeout: float) -> tuple[Classifier, str]:
    """POST /predict per file (deploy.client), `concurrency` requests in flight."""
    pool = ThreadPoolExecutor(max_workers=concurrency)

    def one(item: tuple[Path, bytes]) -> Row:
        path, data = item
        try:
            status, body = predict(base_url, data, path.name, timeout=timeout)
        except (urllib.error.URLError, OSError) as error:
            return error_row("unreachable", str(getattr(error, "reason", error)))
        if status == 200:
            # the same columns as in process: no latency, and no prediction_id (a bulk run is not for feedback)
            return {key: value for key, value in body.items() if key not in ("latency_ms", "prediction_id")}
        error = body.get("error") or {}
        code = error.get("code") or ("server_error" if status >= 500 else f"http_{status}")
        return error_row("server_error" if status >= 500 else code, f"HTTP {status}: {error.get('message', body)}")

    def classify_batch(batch: list[tuple[Path, bytes]]) -> list[Row]:
        return list(pool.map(one, batch))

    return classify_batch, f"{base_url} (over HTTP, {concurrency} at a time)"


# --- output ---------------------------------------------------------------------------------------------------------


def flatten(row: Row) -> Row:
    """Nested values (the probabilities) as one column each: probabilities.cat, probabilities.dog."""
    flat: Row = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": inner for sub, inner in value.items()})
        else:
            flat[key] = value
    return flat


def columns_for(row: Row) -> list[str]:
    middle = [key for key in flatten(row) if key not in FIRST_COLUMNS + LAST_COLUMNS]
    return [*FIRST_COLUMNS, *middle, *LAST_COLUMNS]


class ResultsFile:
    """The predictions file: CSV or JSON lines by extension; appends, and knows which paths are already done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
        self.columns: list[str] | None = None
        self.pending: list[Row] = []  # CSV rows waiting for the first prediction to fix the columns
        self.done: dict[str, Row] = {}
        if path.exists():
            self.done = self.read_and_trim()

    def read_and_trim(self) -> dict[str, Row]:
        """The rows already written (a half-written last line cut off); rows the service failed are dropped."""
        original = self.path.read_text(encoding="utf-8")
        text = original if original.endswith("\n") or not original else original[: original.rfind("\n") + 1]
        if self.jsonl:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            reader = csv.DictReader(text.splitlines())
            rows = list(reader)
            self.columns = list(reader.fieldnames or []) or None
        kept = [row for row in rows if row.get("error_code") not in RETRIED_ON_RESUME]
        if self.columns == [*FIRST_COLUMNS, *LAST_COLUMNS]:  # errors only so far: the next prediction sets columns
            self.columns = None
        if len(kept) != len(rows) or text != original or (self.columns is None and not self.jsonl):
            self.rewrite(kept)
        return {row["path"]: row for row in kept}

    def rewrite(self, rows: list[Row]) -> None:
        """The file with only `rows`, written beside it and renamed into place: an interrupt before the rename leaves
        the old file whole, after it the new one."""
        final, self.path = self.path, self.path.with_name(f".{self.path.name}.partial")
        try:
            self.path.write_text("")
            if self.columns:
                self.write_header(self.columns)
            for row in rows:
                self.write(row)
            self.path.replace(final)
        finally:
            self.path.unlink(missing_ok=True)
            self.path = final

    def write_header(self, columns: list[str]) -> None:
        self.columns = columns
        with self.path.open("a", newline="", encoding="utf-8") as file:
            csv.writer(file).writerow(columns)

    def append(self, rows: list[Row]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, self.columns or [], extrasaction="ignore").writerows(flatten(r) for r in rows)

    def write(self, row: Row) -> None:
        if self.jsonl:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(row) + "\n")
        elif self.columns is not None:
            self.append([row])
        else:  # the first prediction fixes the columns; errors before it wait
            self.pending.append(row)
            if row.get("label") not in (None, ""):
                self.write_header(columns_for(row))
                rows, self.pending = self.pending, []
                self.append(rows)

    def flush(self) -> None:
        """Rows held back because no prediction has fixed the columns yet (only errors so far)."""
        if self.pending:
            self.write_header(self.columns or [*FIRST_COLUMNS, *LAST_COLUMNS])
            rows, self.pending = self.pending, []
            self.append(rows)


# --- the run --------------------------------------------------------------------------------------------------------


def batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(root: Path, output: ResultsFile, classify_batch: Classifier, batch_size: int) -> list[Row]:
    """Classify the images under root not yet in output; returns the new rows."""
    todo = [path for path in find_images(root) if path.relative_to(root).as_posix() not in output.done]
    new: list[Row] = []
    with tqdm(total=len(todo), unit="img", desc="classify", file=sys.stderr) as bar:
        for chunk in batches(todo, batch_size):
            loaded: list[tuple[Path, bytes]] = []
            for path in chunk:
                try:
                    loaded.append((path, path.read_bytes()))
                except OSError as error:
                    row = {"path": path.relative_to(root).as_posix(), **error_row("unreadable", str(error))}
                    output.write(row)
                    new.append(row)
            for (path, _), result in zip(loaded, classify_batch(loaded) if loaded else [], strict=True):
                row = {"path": path.relative_to(root).as_posix(), **result}
                output.write(row)
                new.append(row)
            bar.update(len(chunk))
    output.flush()
    return new


def left_out(root: Path) -> list[Path]:
    """Files under root that are not images by name (Thumbs.db, notes.txt): not classified, named in the summary."""
    return sorted(path for path in root.rglob("*") if path.is_file() and not is_image_file(path))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(rows: list[Row], new: int, seconds: float, output: Path, root: Path, others: list[Path]) -> str:
    """Rows, labels, not-a-pet rows, errors by code and the files left out, as a few lines for the terminal."""
    labels = Counter(str(row["label"]) for row in rows if row.get("label") not in (None, ""))
    errors = Counter(str(row["error_code"]) for row in rows if row.get("error_code"))
    not_pets = sum(str(row.get("is_pet")) == "False" for row in rows)  # a CSV row holds "False", JSON lines false
    rate = f", {new / seconds:.1f} images/s" if seconds > 0 and new else ""
    lines = [
        f"{plural(len(rows), 'row')} in {output} ({new} new, {len(rows) - new} already there) in {seconds:.1f} s{rate}",
        "labels: " + (", ".join(f"{label} {n}" for label, n in sorted(labels.items())) or "none"),
        f"not a pet (is_pet false, label not to be trusted): {plural(not_pets, 'row')}",
        f"errors: {sum(errors.values())}"
        + (" (" + ", ".join(f"{code} {n}" for code, n in sorted(errors.items())) + ")" if errors else ""),
    ]
    if others:
        names = ", ".join(path.relative_to(root).as_posix() for path in others[:MAX_NAMED])
        more = f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else ""
        lines.append(f"left out, not an image by name: {plural(len(others), 'file')} ({names}{more})")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("input", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("output", type=Path, help="predictions .csv, or .jsonl for JSON lines; resumed if it exists")
    parser.add_argument("--url", help="classify with a running service at this URL instead of in process")
    parser.add_argument("--model", type=Path, help="the ONNX model or its folder (default: MODEL_PATH, else models)")
    parser.add_argument("--workers", type=int, help="images classified at once in process (default: the CPUs)")
    parser.add_argument("--batch-size", type=int, default=64, help="images read and classified per batch (default: 64: "
                        "smaller batches leave the workers idle at each batch's end)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url (default: 4)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per request with --url (default: 60)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if not args.input.is_dir():
        sys.exit(f"deploy.classify: no such folder: {args.input}")
    if args.url:
        classify_batch, source = over_http(args.url.rstrip("/"), args.concurrency, args.timeout)
    else:
        from server.config import Settings, available_cpus
        from server.model import ModelError

        try:
            settings = Settings.from_env()
            if args.model:
                settings = dataclasses.replace(settings, model_path=args.model)
            classify_batch, source = in_process(settings, args.workers or available_cpus())
        except (ValueError, ModelError) as error:
            sys.exit(f"deploy.classify: {error}")
    output = ResultsFile(args.output)
    print(f"classifying {args.input} with {source} into {args.output}", file=sys.stderr)
    started = time.perf_counter()
    new = run(args.input, output, classify_batch, args.batch_size)
    rows = [*output.done.values(), *new]
    seconds = time.perf_counter() - started
    print(summary(rows, len(new), seconds, args.output, args.input, left_out(args.input)))


if __name__ == "__main__":
    main()
