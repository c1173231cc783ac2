"""`make harvest`: recorded feedback becomes labelled photos, a new data version under data/feedback/<label>/.

It reads what the service wrote, through the service's own store code, read-only: FEEDBACK_DB (a SQLite file or a
PostgreSQL URL; a path that holds no store is an error, never a new database) and FEEDBACK_IMAGES (the kept
photos, named by sha256). Each photo is considered once, whatever number of predictions and feedbacks it had. Every
label has a source: a key's name (a labeller the operator trusts: `make api-key SCOPES=label`) or `anonymous`. The
rules, applied in this order (params.yaml `feedback`):

  left out   the photo is no longer kept (expired, or past the folder's cap)
  left out   it is identical (sha256) to a validation or test photo of the original data: no leakage
  left out   it is identical to a training photo of the original data: not new (counted apart, as such)
  used       a person confirmed its label in the review file (REVIEWED=)
  held       its trusted labels disagree (two keys gave it different labels): a person decides
  held       a trusted label contradicts an answer the serving model gave with probability >= review_confidence:
             a careless label is likelier there than a model that sure being wrong; a person decides
  used       a trusted label otherwise: copied to data/feedback/<label>/<sha256>.<ext>
  left out   only anonymous labels, on a photo the serving model called not a pet (is_pet false): never harvested
  held       only anonymous labels otherwise: anyone who can reach the service can send one, so a person decides

A photo harvested before is counted, not copied or held again: its label changes only through a review naming it
(REVIEWED=), and then it keeps only the new label. Copies are atomic (a crash leaves no truncated photo in
data/feedback). A trusted label's photo waits in FEEDBACK_IMAGES's labelled area (server.images) until harvest
takes it or leaves it out for good; then harvest deletes it there (so harvest needs write access to that folder).

Held photos go to a review CSV (`--review-out`); a person fills its `confirmed_label` column (a label of the model,
`none` to drop the photo, or empty to decide later) and `make harvest REVIEWED=that.csv` takes the decided ones in.
The review file is merged, never overwritten: a row still held keeps what a person typed in it. It prints and writes
(`reports/harvest.json`) what it used, held and left out, and why, by source. `make harvest` then `dvc add`s
data/feedback, so each harvest is a data version.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from server.images import ANONYMOUS_LABELLED, LABELLED
from server.store import ANONYMOUS, STORE_ERRORS, PredictionRecord, PredictionStore, StoreError

REVIEW_FIELDS = ["image", "labels_given", "sources", "predicted", "probability", "reason", "confirmed_label"]
REVIEWED_BY = "review"  # the source of a label a person confirmed in the review file
IN_TRAINING = "identical to a training photo"  # already in the data: not new
IN_EVALUATION = "identical to an evaluation photo"
KEPT_NAME = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,8}$")  # server.images: <sha256>.<extension>
ORPHAN_AFTER_S = 3600
DECIDED = "decided by a person's review"  # a review-file row that records a decision taken in
DROPPED = "none"  # a confirmed_label that drops the photo: a person said it is no training photo


@dataclass
class Harvest:
    used: list[str] = field(default_factory=list)  # "<label>/<image>"
    already: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    held: list[dict[str, str]] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (image, why)
    by_source: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # source -> outcome -> n

    def count(self, sources: str, outcome: str) -> None:
        self.by_source[sources][outcome] += 1

    def summary(self) -> dict:
        return {
            "used": len(self.used),
            "already_harvested": len(self.already),
            "relabelled": len(self.relabelled),
            "held_for_review": dict(Counter(row["reason"] for row in self.held)),
            "left_out": dict(Counter(why for _, why in self.left_out)),
            "used_by_label": dict(Counter(item.split("/")[0] for item in self.used + self.already)),
            "by_source": {source: dict(outcomes) for source, outcomes in sorted(self.by_source.items())},
        }


def evaluation_photos(manifest: Path, splits: tuple[str, ...] = ("val", "test")) -> set[str]:
    """The sha256 of every photo of these splits of the original data (data/processed/manifest.csv)."""
    if not manifest.exists():
        return set()
    with manifest.open(newline="") as rows:
        return {row["sha256"] for row in csv.DictReader(rows) if row["split"] in splits}


def reviewed(path: Path | None, labels: list[str]) -> dict[str, str]:
    """sha256 -> the label a person confirmed (or DROPPED), from a filled review CSV (an empty one: not decided)."""
    if path is None:
        return {}
    with path.open(newline="") as rows:
        reader = csv.DictReader(rows)
        if not {"image", "confirmed_label"} <= set(reader.fieldnames or []):
            raise SystemExit(f"{path}: a review CSV needs the columns image and confirmed_label ({REVIEW_FIELDS})")
        confirmed = {(row["image"] or "").split(".")[0]: (row["confirmed_label"] or "").strip() for row in reader}
    allowed = [*labels, DROPPED]
    unusable = sorted(f"{sha[:12]}: {label!r}" for sha, label in confirmed.items() if label and label not in allowed)
    if unusable:
        raise SystemExit(f"{path}: confirmed_label must be one of {allowed} or empty; not {', '.join(unusable)}")
    return {sha: label for sha, label in confirmed.items() if label}


def harvested_as(out: Path, sha: str) -> dict[str, Path]:
    """label -> the harvested copy of this photo, wherever a earlier harvest put it."""
    return {path.parent.name: path for path in out.glob(f"*/{sha}.*")}


def copy_atomically(source: Path, target: Path) -> None:
    """`target` appears whole or not at all: written beside it under a hidden name, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def harvest(rows: list[PredictionRecord], images: Path, out: Path, labels: list[str], evaluation: set[str],
            review_confidence: float, confirmed: dict[str, str], training: frozenset[str] = frozenset()
            ) -> Harvest:  # fmt: skip
    result = Harvest()
    for partial in out.glob("*/.*.partial"):  # a copy a crash cut short
        partial.unlink()
    by_photo: dict[str, list[PredictionRecord]] = defaultdict(list)  # by sha256: the same bytes, whatever type
    for row in rows:
        if row.image and KEPT_NAME.match(row.image):  # a name the service wrote: never a path out of the folder
            by_photo[row.image.split(".")[0]].append(row)
    for sha, records in sorted(by_photo.items()):
        trusted = sorted({r.feedback for r in records if r.feedback and r.feedback_source not in (None, ANONYMOUS)})
        anonymous = sorted({r.feedback for r in records if r.feedback and r.feedback_source in (None, ANONYMOUS)})
        keys = sorted({r.feedback_source for r in records if r.feedback and r.feedback_source not in (None, ANONYMOUS)})
        top = max(records, key=lambda r: r.probabilities[r.label])  # the surest answer the model gave it
        probability = top.probabilities[top.label]
        earlier = harvested_as(out, sha)
        kept = next((path for r in records if r.image for path in kept_paths(images, r.image) if path.is_file()), None)
        label = confirmed.get(sha)
        source = REVIEWED_BY if label else ",".join(keys) if trusted else ANONYMOUS
        # harvested before: its label changes only through a review (REVIEWED= naming it), never by more feedback;
        # a key's label that contradicts it goes to review, where a person can make that change
        contradicted = earlier and label is None and set(trusted) - set(earlier)
        if contradicted and kept is not None:
            held = {"image": kept.name, "labels_given": " ".join(trusted), "sources": source, "predicted": top.label,
                    "probability": f"{probability:.4f}", "reason": "a trusted label contradicts the harvested one",
                    "confirmed_label": ""}  # fmt: skip
            result.held.append(held)
            result.count(source, "held")
            continue
        if earlier and (label is None or (label in earlier and len(earlier) == 1)):
            first = sorted(earlier)[0]
            result.already.append(f"{first}/{earlier[first].name}")
            result.count(source, "already_harvested")
            continue
        if label == DROPPED:  # a person's review drops it, a harvested copy too
            for old in earlier.values():
                old.unlink()
            result.left_out.append((sha, "dropped by a person's review"))
            result.count(source, "left_out")
            continue
        if kept is None and earlier:  # relabelled by a review after the service let go of it: the harvested copy
            kept = sorted(earlier.values())[0]
        if kept is None:
            result.left_out.append((sha, "photo no longer kept"))
            result.count(source, "left_out")
            continue
        if sha in evaluation:
            result.left_out.append((sha, IN_EVALUATION))
            result.count(source, "left_out")
            continue
        if sha in training:
            result.left_out.append((sha, IN_TRAINING))
            result.count(source, "left_out")
            continue
        reason = ""
        if label is None and not trusted and any(r.is_pet is False for r in records):
            result.left_out.append((sha, "anonymous label on a photo the model called not a pet"))
            result.count(source, "left_out")
            continue
        if label is None and not trusted:
            reason = "anonymous label: a person confirms it"
        elif label is None and len(trusted) > 1:
            reason = "trusted labels disagree"
        elif label is None and trusted[0] != top.label and probability >= review_confidence:
            reason = f"contradicts an answer of probability >= {review_confidence}"
        if reason:
            held = {"image": kept.name, "labels_given": " ".join(trusted or anonymous), "sources": source,
                    "predicted": top.label, "probability": f"{probability:.4f}", "reason": reason,
                    "confirmed_label": ""}  # fmt: skip
            result.held.append(held)
            result.count(source, "held")
            continue
        label = label or trusted[0]
        target = out / label / f"{sha}{kept.suffix}"
        if kept != target:
            copy_atomically(kept, target)
        for old_label, old in earlier.items():  # a photo relabelled (by a review) keeps one label only
            if old_label != label:
                old.unlink()
                result.relabelled.append(f"{old_label} -> {label}: {old.name}")
        result.used.append(f"{label}/{target.name}")
        result.count(source, "used")
    for sha, label in sorted(confirmed.items()):  # a decision on a photo the store no longer holds: its harvested copy
        if sha in by_photo:
            continue
        earlier = harvested_as(out, sha)
        if not earlier and label == DROPPED:
            continue  # dropped, and nothing of it left
        if not earlier:
            result.left_out.append((sha, "the review names a photo harvest has no record of"))
            result.count(REVIEWED_BY, "left_out")
        elif label == DROPPED:
            for old in earlier.values():
                old.unlink()
            result.left_out.append((sha, "dropped by a person's review"))
            result.count(REVIEWED_BY, "left_out")
        elif label not in earlier or len(earlier) > 1:
            source_copy = sorted(earlier.values())[0]
            target = out / label / source_copy.name
            copy_atomically(source_copy, target)
            for old_label, old in earlier.items():
                if old_label != label:
                    old.unlink()
                    result.relabelled.append(f"{old_label} -> {label}: {old.name}")
            result.used.append(f"{label}/{target.name}")
            result.count(REVIEWED_BY, "used")
    return result


def kept_paths(images: Path, name: str) -> list[Path]:
    """Where the service may keep a photo: its labelled areas first (server.images), then the folder."""
    return [images / LABELLED / name, images / ANONYMOUS_LABELLED / name, images / name]


def merge_review(path: Path, held: list[dict[str, str]], decisions: dict[str, str]) -> list[dict[str, str]]:
    """The held rows, each keeping the confirmed_label a person already typed for it in `path`, then a row for each
    decision taken in (`decisions`: sha256 -> label or none), kept so that it is never forgotten or asked again
    (other rows of photos no longer held are done: used, harvested or left out)."""
    typed: dict[str, str] = {}
    if path.exists():
        with path.open(newline="") as rows:
            typed = {row.get("image") or "": (row.get("confirmed_label") or "").strip() for row in csv.DictReader(rows)}
    rows_out = [{**row, "confirmed_label": typed.get(row["image"], "") or row["confirmed_label"]} for row in held]
    listed = {row["image"].split(".")[0] for row in rows_out}
    rows_out += [{"image": sha, "labels_given": "", "sources": REVIEWED_BY, "predicted": "", "probability": "",
                  "reason": DECIDED, "confirmed_label": label}
                 for sha, label in sorted(decisions.items()) if sha not in listed]  # fmt: skip
    return rows_out


def decided(path: Path) -> dict[str, str]:
    """sha256 -> label (or none) of every decision a harvest took in before, from the review file it keeps: a
    person's decision stays taken in every later harvest, with or without REVIEWED=. (A label typed in a held row
    counts only once a harvest is given the file with REVIEWED=.)"""
    if not path.exists():
        return {}
    with path.open(newline="") as rows:
        taken = [row for row in csv.DictReader(rows) if row.get("reason") == DECIDED and row.get("confirmed_label")]
    return {(row.get("image") or "").split(".")[0]: (row.get("confirmed_label") or "").strip() for row in taken}


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.environ.get("FEEDBACK_DB"), help="FEEDBACK_DB: SQLite file or URL")
    parser.add_argument("--images", type=Path, default=os.environ.get("FEEDBACK_IMAGES"), help="FEEDBACK_IMAGES")
    parser.add_argument("--out", type=Path, default=Path("data/feedback"))
    parser.add_argument("--manifest", type=Path, default=Path("data/processed/manifest.csv"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--reviewed", type=Path, default=os.environ.get("REVIEWED") or None,
                        help="REVIEWED: a review CSV with confirmed_label filled in")  # fmt: skip
    parser.add_argument("--review-out", type=Path, default=Path("reports/harvest-review.csv"))
    parser.add_argument("--report", type=Path, default=Path("reports/harvest.json"))
    args = parser.parse_args(argv)
    if not args.db or not args.images:
        parser.error("give FEEDBACK_DB and FEEDBACK_IMAGES (environment or --db/--images): what the service wrote")
    params = yaml.safe_load(args.params.read_text())
    labels, review_confidence = params["preprocess"]["labels"], params["feedback"]["review_confidence"]
    try:
        store = PredictionStore(args.db, size=1, read_only=True)  # nothing added, nothing evicted, nothing created
        try:
            rows = store.feedback_rows()
        finally:
            store.close()
    except (StoreError, *STORE_ERRORS) as error:
        raise SystemExit(f"harvest: cannot read the feedback store: {error}") from None
    training = frozenset(evaluation_photos(args.manifest, ("train",)))
    decisions = {**decided(args.review_out), **reviewed(args.reviewed, labels)}
    result = harvest(rows, args.images, args.out, labels, evaluation_photos(args.manifest), review_confidence,
                     decisions, training)  # fmt: skip
    # The labelled area lets go of a photo once it is in a data version that came back (found harvested before:
    # data/feedback as checked out, dvc pull'ed), never of one just copied, which exists only here until the new
    # version is pushed and merged.
    recorded = {row.image.split(".")[0] for row in rows if row.image}
    released = {Path(item).name.split(".")[0] for item in result.already} | {sha for sha, _ in result.left_out}
    for area in (LABELLED, ANONYMOUS_LABELLED):
        for path in (args.images / area).glob("*.*"):
            sha = path.name.split(".")[0]
            # harvested before, or left out for good (an evaluation photo, dropped, not a pet); or a photo whose
            # record the store no longer holds (an hour old at least: not one labelled while this harvest ran)
            orphan = sha not in recorded and time.time() - path.stat().st_mtime > ORPHAN_AFTER_S
            if not path.name.startswith(".") and (sha in released or orphan):
                path.unlink(missing_ok=True)
    rows_out = merge_review(args.review_out, result.held, decisions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, REVIEW_FIELDS)
    writer.writeheader()
    writer.writerows(rows_out)
    write_atomically(args.review_out, buffer.getvalue())
    report = {**result.summary(), "feedback_rows": len(rows), "rule": {"review_confidence": review_confidence},
              "left_out_photos": result.left_out, "review_csv": str(args.review_out)}  # fmt: skip
    write_atomically(args.report, json.dumps(report, indent=2) + "\n")
    print(json.dumps(result.summary()))
    reasons = Counter(why for _, why in result.left_out)
    print(f"harvest: {len(result.used)} new photos in {args.out}; not new: {len(result.already)} harvested before, "
          f"{reasons[IN_TRAINING]} already training photos, {reasons[IN_EVALUATION]} evaluation photos (left out); "
          f"{len(result.held)} held for review ({args.review_out}); "
          f"{len(result.left_out) - reasons[IN_TRAINING] - reasons[IN_EVALUATION]} otherwise left out")  # fmt: skip


if __name__ == "__main__":
    main()
