"""`make harvest`: recorded feedback becomes labelled photos, a new data version under data/feedback/<label>/.

It reads what the service wrote, through the service's own store code: FEEDBACK_DB (a SQLite file or a PostgreSQL
URL) and FEEDBACK_IMAGES (the kept photos, named by sha256). Each photo is considered once, whatever number of
predictions and feedbacks it had. The rules, applied in this order (params.yaml `feedback`):

  left out   the photo is no longer kept (expired, or past the folder's cap)
  left out   it is identical (sha256) to a validation or test photo of the original data: no leakage
  held       its feedbacks disagree (two people gave it different labels): a person decides
  held       the feedback contradicts an answer the serving model gave with probability >= review_confidence: a
             careless or poisoned label is likelier there than a model that sure being wrong; a person decides
  used       otherwise: copied to data/feedback/<label>/<sha256>.<ext> (already there: counted, not copied again)

Held photos go to a review CSV (`--review-out`); a person fills its `confirmed_label` column (a label of the model,
or empty to drop it) and `make harvest REVIEWED=that.csv` takes the confirmed ones in. It prints and writes
(`reports/harvest.json`) what it used, held and left out, and why. `make harvest` then `dvc add`s data/feedback, so
each harvest is a data version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from server.store import PredictionRecord, PredictionStore

REVIEW_FIELDS = ["image", "labels_given", "predicted", "probability", "reason", "confirmed_label"]


@dataclass
class Harvest:
    used: list[str] = field(default_factory=list)  # "<label>/<image>"
    already: list[str] = field(default_factory=list)
    held: list[dict[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def summary(self) -> dict:
        return {
            "used": len(self.used),
            "already_harvested": len(self.already),
            "held_for_review": dict(Counter(row["reason"] for row in self.held)),
            "left_out": dict(Counter(why for _, why in self.left_out)),
            "used_by_label": dict(Counter(item.split("/")[0] for item in self.used + self.already)),
        }


def evaluation_photos(manifest: Path) -> set[str]:
    """The sha256 of every validation and test photo of the original data (data/processed/manifest.csv)."""
    if not manifest.exists():
        return set()
    with manifest.open(newline="") as rows:
        return {row["sha256"] for row in csv.DictReader(rows) if row["split"] in ("val", "test")}


def reviewed(path: Path | None, labels: list[str]) -> dict[str, str]:
    """image -> the label a person confirmed, from a filled review CSV."""
    if path is None:
        return {}
    with path.open(newline="") as rows:
        confirmed = {row["image"]: row["confirmed_label"].strip() for row in csv.DictReader(rows)}
    return {image: label for image, label in confirmed.items() if label in labels}


def harvest(rows: list[PredictionRecord], images: Path, out: Path, labels: list[str], evaluation: set[str],
            review_confidence: float, confirmed: dict[str, str]) -> Harvest:  # fmt: skip
    result = Harvest()
    by_image: dict[str, list[PredictionRecord]] = defaultdict(list)
    for row in rows:
        if row.image:
            by_image[row.image].append(row)
    for image, records in sorted(by_image.items()):
        given = sorted({r.feedback for r in records if r.feedback})
        top = max(records, key=lambda r: r.probabilities[r.label])  # the surest answer the model gave it
        probability = top.probabilities[top.label]
        if not (images / image).is_file():
            result.left_out.append((image, "photo no longer kept"))
            continue
        if image.split(".")[0] in evaluation:
            result.left_out.append((image, "identical to an evaluation photo"))
            continue
        label = confirmed.get(image)
        if label is None and len(given) > 1:
            reason = "feedbacks disagree"
        elif label is None and given[0] != top.label and probability >= review_confidence:
            reason = f"contradicts an answer of probability >= {review_confidence}"
        else:
            reason = ""
        if reason:
            held = {"image": image, "labels_given": " ".join(given), "predicted": top.label,
                    "probability": f"{probability:.4f}", "reason": reason, "confirmed_label": ""}  # fmt: skip
            result.held.append(held)
            continue
        label = label or given[0]
        target = out / label / image
        if target.exists():
            result.already.append(f"{label}/{image}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / image, target)
        result.used.append(f"{label}/{image}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.environ.get("FEEDBACK_DB"), help="FEEDBACK_DB: SQLite file or URL")
    parser.add_argument("--images", type=Path, default=os.environ.get("FEEDBACK_IMAGES"), help="FEEDBACK_IMAGES")
    parser.add_argument("--out", type=Path, default=Path("data/feedback"))
    parser.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.csv"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--reviewed", type=Path, help="a review CSV with confirmed_label filled in")
    parser.add_argument("--review-out", type=Path, default=Path("reports/harvest-review.csv"))
    parser.add_argument("--report", type=Path, default=Path("reports/harvest.json"))
    args = parser.parse_args(argv)
    if not args.db or not args.images:
        parser.error("give FEEDBACK_DB and FEEDBACK_IMAGES (environment or --db/--images): what the service wrote")
    params = yaml.safe_load(args.params.read_text())
    labels, review_confidence = params["preprocess"]["labels"], params["feedback"]["review_confidence"]
    store = PredictionStore(args.db, size=1)  # read only: nothing is added, so nothing is evicted
    try:
        rows = store.feedback_rows()
    finally:
        store.close()
    result = harvest(rows, args.images, args.out, labels, evaluation_photos(args.manifest), review_confidence,
                     reviewed(args.reviewed, labels))  # fmt: skip
    args.review_out.parent.mkdir(parents=True, exist_ok=True)
    with args.review_out.open("w", newline="") as review:
        writer = csv.DictWriter(review, REVIEW_FIELDS)
        writer.writeheader()
        writer.writerows(result.held)
    report = {**result.summary(), "feedback_rows": len(rows), "rule": {"review_confidence": review_confidence},
              "left_out_photos": result.left_out, "review_csv": str(args.review_out)}  # fmt: skip
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result.summary()))
    print(f"harvest: {len(result.used)} new photos in {args.out}, {len(result.already)} already there, "
          f"{len(result.held)} held for review ({args.review_out}), {len(result.left_out)} left out")  # fmt: skip


if __name__ == "__main__":
    main()
