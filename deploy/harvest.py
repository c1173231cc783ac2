"""`make harvest`: recorded feedback becomes labelled photos, a new data version under data/feedback/<label>/.

It reads what the service wrote, through the service's own store code: FEEDBACK_DB (a SQLite file or a PostgreSQL
URL) and FEEDBACK_IMAGES (the kept photos, named by sha256). Each photo is considered once, whatever number of
predictions and feedbacks it had. The rules, applied in this order (params.yaml `feedback`):

  left out   the photo is no longer kept (expired, or past the folder's cap)
  left out   it is identical (sha256) to a validation or test photo of the original data: no leakage
  held       its feedbacks disagree (two people gave it different labels): a person decides
  held       the feedback contradicts an answer the serving model gave with probability >= review_confidence: a
             careless or poisoned label is likelier there than a model that sure being wrong; a person decides
  used       otherwise: copied to data/feedback/<label>/<sha256>.<ext>. A photo harvested before is counted, not
             copied or held again: its label changes only through a review naming it (REVIEWED=), and then it
             keeps only the new label

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
    relabelled: list[str] = field(default_factory=list)
    held: list[dict[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (image, why)

    def summary(self) -> dict:
        return {
            "used": len(self.used),
            "already_harvested": len(self.already),
            "relabelled": len(self.relabelled),
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
    """sha256 -> the label a person confirmed, from a filled review CSV (an empty confirmed_label leaves it out)."""
    if path is None:
        return {}
    with path.open(newline="") as rows:
        reader = csv.DictReader(rows)
        if not {"image", "confirmed_label"} <= set(reader.fieldnames or []):
            raise SystemExit(f"{path}: a review CSV needs the columns image and confirmed_label ({REVIEW_FIELDS})")
        confirmed = {(row["image"] or "").split(".")[0]: (row["confirmed_label"] or "").strip() for row in reader}
    unusable = sorted(f"{sha[:12]}: {label!r}" for sha, label in confirmed.items() if label and label not in labels)
    if unusable:
        raise SystemExit(f"{path}: confirmed_label must be one of {labels} or empty; not {', '.join(unusable)}")
    return {sha: label for sha, label in confirmed.items() if label}


def harvested_as(out: Path, sha: str) -> dict[str, Path]:
    """label -> the harvested copy of this photo, wherever a earlier harvest put it."""
    return {path.parent.name: path for path in out.glob(f"*/{sha}.*")}


def harvest(rows: list[PredictionRecord], images: Path, out: Path, labels: list[str], evaluation: set[str],
            review_confidence: float, confirmed: dict[str, str]) -> Harvest:  # fmt: skip
    result = Harvest()
    by_photo: dict[str, list[PredictionRecord]] = defaultdict(list)  # by sha256: the same bytes, whatever type
    for row in rows:
        if row.image:
            by_photo[row.image.split(".")[0]].append(row)
    for sha, records in sorted(by_photo.items()):
        given = sorted({r.feedback for r in records if r.feedback})
        top = max(records, key=lambda r: r.probabilities[r.label])  # the surest answer the model gave it
        probability = top.probabilities[top.label]
        earlier = harvested_as(out, sha)
        kept = next((images / r.image for r in records if r.image and (images / r.image).is_file()), None)
        label = confirmed.get(sha)
        # harvested before: its label changes only through a review (REVIEWED= naming it), never by more feedback
        if earlier and (label is None or (label in earlier and len(earlier) == 1)):
            first = sorted(earlier)[0]
            result.already.append(f"{first}/{earlier[first].name}")
            continue
        if kept is None:
            result.left_out.append((sha, "photo no longer kept"))
            continue
        if sha in evaluation:
            result.left_out.append((sha, "identical to an evaluation photo"))
            continue
        reason = ""
        if label is None and len(given) > 1:
            reason = "feedbacks disagree"
        elif label is None and given[0] != top.label and probability >= review_confidence:
            reason = f"contradicts an answer of probability >= {review_confidence}"
        if reason:
            held = {"image": kept.name, "labels_given": " ".join(given), "predicted": top.label,
                    "probability": f"{probability:.4f}", "reason": reason, "confirmed_label": ""}  # fmt: skip
            result.held.append(held)
            continue
        label = label or given[0]
        for old_label, old in earlier.items():  # a photo relabelled (by a review) keeps one label only
            if old_label != label:
                old.unlink()
                result.relabelled.append(f"{old_label} -> {label}: {old.name}")
        target = out / label / kept.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, target)
        result.used.append(f"{label}/{kept.name}")
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
