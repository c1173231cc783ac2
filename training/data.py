"""Prepare stage: decode every raw photo as the server would, drop the broken and duplicated, split by content hash."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imaging import EXTENSIONS, Decoder, ImageError, label_for_name
from training.config import DEFAULT_PARAMS, SplitParams, load_params
from training.utils import sha256_bytes, write_json

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ["file", "source", "sha256", "label", "split", "width", "height", "format"]


class Skip(Exception):
    """A raw file that cannot be used; the message is the reason written to the report."""


@dataclass(frozen=True)
class Record:
    file: str
    source: str
    sha256: str
    label: str
    split: str
    width: int
    height: int
    format: str


def infer_label(path: Path, root: Path, labels: tuple[str, ...]) -> str | None:
    """Class from the nearest class-named folder (cats/, Cat/), else from a 'cat.123.jpg' file name."""
    for parent in reversed(path.relative_to(root).parent.parts):
        if label := label_for_name(parent, labels):
            return label
    return label_for_name(path.name.split(".", 1)[0], labels)


def discover(root: Path, labels: tuple[str, ...]) -> list[tuple[Path, str | None]]:
    """Every file below root, sorted, with its inferred class (None when it has none)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [(p, infer_label(p, root, labels)) for p in files]


def validate(data: bytes, decoder: Decoder) -> tuple[str, int, int]:
    """Decode a raw file through the server's decoder; its format and stored size, or Skip with the server's reason."""
    try:
        image = decoder.open(data)
        width, height = image.size
        decoder(data)
    except ImageError as error:
        raise Skip(error.message) from None
    return image.format or "", width, height


def assign_split(sha256: str, fractions: SplitParams, salt: str) -> str:
    """Split from a salted hash of the content: stable when files are added, ~stratified when done per class."""
    point = int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:16], 16) / 16**16
    if point < fractions.train:
        return "train"
    if point < fractions.train + fractions.val:
        return "val"
    return "test"


def prepare(
    raw_dir: Path,
    out_dir: Path,
    reports_dir: Path,
    *,
    labels: tuple[str, ...],
    fractions: SplitParams,
    salt: str,
    preprocess: Mapping[str, Any],
) -> dict[str, object]:
    """Run the whole stage; returns the summary written to reports/prepare.json.

    Each kept photo is written byte for byte, so training reads it through the same decoder (imaging.Decoder:
    JPEG draft, reduction, EXIF orientation, alpha background from the spec) as the server reads an upload.
    """
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {raw_dir}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for split in SPLITS:
        for label in labels:
            (out_dir / split / label).mkdir(parents=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    decoder = Decoder.from_spec(preprocess)

    records: dict[str, Record] = {}
    skipped: list[dict[str, str]] = []
    conflicts: set[str] = set()
    for path, label in tqdm(discover(raw_dir, labels), desc="prepare", unit="img"):
        source = path.relative_to(raw_dir).as_posix()
        data = path.read_bytes()
        digest = sha256_bytes(data)
        try:
            if label is None:
                raise Skip("no class in folder or file name")
            if digest in records:
                first = records[digest]
                if first.label != label:
                    conflicts.add(digest)
                    raise Skip(f"same content as {first.source}, which is labelled {first.label}")
                raise Skip(f"duplicate of {first.source}")
            fmt, width, height = validate(data, decoder)
        except Skip as reason:
            skipped.append({"source": source, "reason": str(reason)})
            continue
        split = assign_split(digest, fractions, salt)
        name = f"{split}/{label}/{digest[:16]}{EXTENSIONS[fmt]}"
        (out_dir / name).write_bytes(data)
        records[digest] = Record(name, source, digest, label, split, width, height, fmt)

    for digest in conflicts:  # a photo filed under two classes is trusted in neither
        dropped = records.pop(digest)
        (out_dir / dropped.file).unlink()
        skipped.append({"source": dropped.source, "reason": "same content filed under another class"})
    _write_csv(out_dir / "manifest.csv", MANIFEST_FIELDS, [asdict(r) for r in records.values()])
    _write_csv(reports_dir / "skipped.csv", ["source", "reason"], skipped)
    counts = {s: dict.fromkeys(labels, 0) for s in SPLITS}
    for record in records.values():
        counts[record.split][record.label] += 1
    summary: dict[str, object] = {
        "images": len(records),
        "skipped": len(skipped),
        "label_conflicts": len(conflicts),
        "formats": dict(sorted(Counter(r.format for r in records.values()).items())),
        "counts": counts,
        "manifest_sha256": sha256_bytes((out_dir / "manifest.csv").read_bytes()),
    }
    write_json(reports_dir / "prepare.json", summary)
    return summary


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, default=None, help="raw folder (default: params data.raw_dir)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: params data.processed_dir)")
    parser.add_argument("--reports", type=Path, default=None, help="reports folder (default: params data.reports_dir)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    summary = prepare(
        args.raw or Path(params.data.raw_dir),
        args.out or Path(params.data.processed_dir),
        args.reports or Path(params.data.reports_dir),
        labels=tuple(params.preprocess["labels"]),
        fractions=params.data.split,
        salt=params.data.split_salt,
        preprocess=params.preprocess,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
