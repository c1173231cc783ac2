"""`make harvest`: recorded feedback becomes labelled photos, a new data version under data/feedback/<label>/.

It reads what the service wrote, through the service's own store code, read-only: FEEDBACK_DB (a SQLite file or a
PostgreSQL URL; a path that holds no store is an error, never a new database) and FEEDBACK_IMAGES (the kept
photos, named by sha256), and API_KEYS_FILE (the service's keys, through server.keys). Each photo is considered once,
whatever number of predictions and feedbacks it had. Every label has a source: a key's name (a labeller the operator
trusts: `make api-key SCOPES=label`) or `anonymous`. A key's label is trusted only while API_KEYS_FILE holds that key
valid, with the `label` scope: a revoked key's labels (or an unknown name's) are set aside, never used, and a label
under a key's name on a prediction older than that key is reviewed as an anonymous one is (a name can come back
only by hand). Keyed labels with no readable API_KEYS_FILE are an error. The rules, applied in this order
(params.yaml `feedback`):

  left out   the photo is no longer kept (expired, or past the folder's cap)
  left out   it is identical (sha256) to a validation or test photo of the original data: no leakage
  left out   it is identical to a training photo of the original data: not new (counted apart, as such), and
             counted apart again when a label given contradicts that training photo's label (noise, or an attack)
  left out   its only labels are from revoked or unknown keys
  used       a person confirmed its label in the review file (REVIEWED=)
  held       its trusted labels disagree (two keys gave it different labels): a person decides
  held       a trusted label contradicts an answer the serving model gave with probability >= review_confidence:
             a careless label is likelier there than a model that sure being wrong; a person decides
  used       a trusted label otherwise: copied to data/feedback/<label>/<sha256>.<ext>
  left out   only anonymous labels, on a photo the serving model called not a pet (is_pet false): never harvested
  held       only anonymous labels otherwise: anyone who can reach the service can send one, so a person decides
  held       a label under a key's name on a prediction older than the key: as an anonymous one

A photo harvested before is counted, not copied or held again: its label changes only through a review naming it
(REVIEWED=), and then it keeps only the new label. Copies are atomic (a crash leaves no truncated photo in
data/feedback). A trusted label's photo waits in FEEDBACK_IMAGES's labelled area (server.images) until harvest
takes it or leaves it out for good; then harvest deletes it there (so harvest needs write access to that folder),
and marks its labels harvested in the store (PredictionStore.mark_harvested), which may then evict them. A photo
there whose record the store no longer holds is deleted only when it was listed before the store was read and was
linked there over an hour before (the inode's ctime: a link made changes it; its mtime is when it was last sent).

Held photos go to a review CSV (`--review-out`, reports/harvest-review.csv): a row per photo, its `photo` column the
file to look at, and a person fills its `confirmed_label` column (a label of the model, `none` to drop the photo, or
empty to decide later); `make harvest REVIEWED=reports/harvest-review.csv` takes the decided ones in. Every cell a
harvest reads is checked (a photo's sha256, a label or none): a bad row is an error naming it, never applied. The
review file is merged, never overwritten: a row still held keeps what a person typed in it. It prints and writes
(`reports/harvest.json`) what this run used, held and left out, and why, by source (`this_run`), apart from what
data/feedback holds in all (`totals`). `make harvest` then `dvc add`s data/feedback, so each harvest is a data version.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from server.images import ANONYMOUS_LABELLED, LABELLED
from server.keys import labellers as valid_labellers
from server.store import ANONYMOUS, STORE_ERRORS, PredictionRecord, PredictionStore, StoreError

REVIEW_FIELDS = ["image", "photo", "labels_given", "sources", "predicted", "probability", "reason", "confirmed_label"]
REVIEWED_BY = "review"  # the source of a label a person confirmed in the review file
IN_TRAINING = "identical to a training photo"  # already in the data: not new
CONTRADICTS_TRAINING = "identical to a training photo, with another label"  # label noise, or an attack: a signal
IN_EVALUATION = "identical to an evaluation photo"
REVOKED = "labels only from revoked or unknown keys"
KEPT_NAME = re.compile(r"^[0-9a-f]{64}\.[a-z0-9]{1,8}$")  # server.images: <sha256>.<extension>
REVIEW_IMAGE = re.compile(r"^([0-9a-f]{64})(\.[a-z0-9]{1,8})?$")  # a review row's photo: <sha256>[.<extension>]
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

    def hold(self, row: dict[str, str]) -> None:
        self.held.append(row)
        self.count(row["sources"], "held")

    def leave_out(self, sha: str, sources: str, why: str) -> None:
        self.left_out.append((sha, why))
        self.count(sources, "left_out")

    def summary(self) -> dict:
        """This run's counts: what it found for each photo the store holds a label of."""
        return {
            "used": len(self.used),
            "used_by_label": dict(Counter(item.split("/")[0] for item in self.used)),
            "already_harvested": len(self.already),
            "relabelled": len(self.relabelled),
            "held_for_review": dict(Counter(row["reason"] for row in self.held)),
            "left_out": dict(Counter(why for _, why in self.left_out)),
            "by_source": {source: dict(outcomes) for source, outcomes in sorted(self.by_source.items())},
        }


def evaluation_photos(manifest: Path, splits: tuple[str, ...] = ("val", "test")) -> set[str]:
    """The sha256 of every photo of these splits of the original data (data/processed/manifest.csv)."""
    if not manifest.exists():
        return set()
    with manifest.open(newline="") as rows:
        return {row["sha256"] for row in csv.DictReader(rows) if row["split"] in splits}


def read_decisions(path: Path, labels: list[str], only_reason: str | None = None) -> dict[str, str]:
    """sha256 -> the label (or DROPPED) of each decided row of a review CSV (`only_reason`: of the rows with that
    reason only). Every cell read is checked first: a bad row stops the harvest, named, and nothing of the file is
    applied (a cell `*` would otherwise glob every harvested photo)."""
    allowed = [*labels, DROPPED]
    decisions: dict[str, str] = {}
    bad: list[str] = []
    with path.open(newline="") as rows:
        reader = csv.DictReader(rows)
        if not {"image", "confirmed_label"} <= set(reader.fieldnames or []):
            raise SystemExit(f"{path}: a review CSV needs the columns image and confirmed_label ({REVIEW_FIELDS})")
        for row in reader:
            if not any((cell or "").strip() for cell in row.values() if isinstance(cell, str)):
                continue  # an empty row, as spreadsheets write them
            if only_reason is not None and row.get("reason") != only_reason:
                continue
            image, label = (row["image"] or "").strip(), (row["confirmed_label"] or "").strip()
            found = REVIEW_IMAGE.match(image)
            where = f"row {reader.line_num - 1} (line {reader.line_num})"
            if not found:
                bad.append(f"{where}: image {image[:80]!r} is not a photo's sha256 (64 lowercase hex digits, then "
                           "optionally its extension)")  # fmt: skip
            elif label and label not in allowed:
                bad.append(f"{where}: confirmed_label {label[:40]!r} must be one of {allowed} or empty")
            elif label and decisions.get(found[1], label) != label:
                bad.append(f"{where}: {found[1][:12]}... decided {label!r} here and {decisions[found[1]]!r} above")
            elif label:
                decisions[found[1]] = label
    if bad:
        raise SystemExit(f"{path}: nothing of it applied; fix these rows:\n  " + "\n  ".join(bad[:20]))
    return decisions


def training_labels(manifest: Path) -> dict[str, str]:
    """sha256 -> label of every training photo of the original data (data/processed/manifest.csv)."""
    if not manifest.exists():
        return {}
    with manifest.open(newline="") as rows:
        return {row["sha256"]: row["label"] for row in csv.DictReader(rows) if row["split"] == "train"}


def reviewed(path: Path | None, labels: list[str]) -> dict[str, str]:
    """sha256 -> the label a person confirmed (or DROPPED), from a filled review CSV (an empty one: not decided)."""
    return {} if path is None else read_decisions(path, labels)


def harvested_as(out: Path, sha: str) -> dict[str, Path]:
    """label -> the harvested copy of this photo, wherever a earlier harvest put it."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha):  # a glob pattern here would match, and delete, other photos
        raise ValueError(f"not a sha256: {sha!r}")
    return {path.parent.name: path for path in out.glob(f"*/{sha}.*")}


def held_row(photo: Path, given: list[str], answer: dict[str, str], reason: str) -> dict[str, str]:
    """A row of the review file: the photo's name and where to look at it, the labels given, the model's answer."""
    return {"image": photo.name, "photo": str(photo), "labels_given": " ".join(given), **answer, "reason": reason,
            "confirmed_label": ""}  # fmt: skip


def copy_atomically(source: Path, target: Path) -> None:
    """`target` appears whole or not at all: written beside it under a hidden name, then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def harvest(rows: list[PredictionRecord], images: Path, out: Path, labels: list[str], evaluation: set[str],
            review_confidence: float, confirmed: dict[str, str], training: Mapping[str, str] | None = None, *,
            labellers: Mapping[str, float]) -> Harvest:  # fmt: skip
    """The rules, on the store's labelled rows. `training`: sha256 -> label of the original training photos;
    `labellers`: name -> creation time of the keys whose labels are trusted now (server.keys.labellers)."""
    training = training or {}
    result = Harvest()
    for partial in out.glob("*/.*.partial"):  # a copy a crash cut short
        partial.unlink()
    by_photo: dict[str, list[PredictionRecord]] = defaultdict(list)  # by sha256: the same bytes, whatever type
    for row in rows:
        if row.image and KEPT_NAME.match(row.image):  # a name the service wrote: never a path out of the folder
            by_photo[row.image.split(".")[0]].append(row)
    for sha, records in sorted(by_photo.items()):
        labelled = [r for r in records if r.feedback]
        keyed = [r for r in labelled if r.feedback_source not in (None, ANONYMOUS)]
        valid = [r for r in keyed if r.feedback_source in labellers]
        # a label under a valid key's name on a prediction made before that key existed: an earlier key's of the
        # same name (a line deleted by hand frees its name), so untrusted, reviewed as an anonymous one
        older = [r for r in valid if r.time < labellers[r.feedback_source or ""]]
        trusted_records = [r for r in valid if r.time >= labellers[r.feedback_source or ""]]
        revoked = sorted({r.feedback_source or "" for r in keyed if r.feedback_source not in labellers})
        trusted = sorted({r.feedback or "" for r in trusted_records})
        untrusted = [r for r in labelled if r.feedback_source in (None, ANONYMOUS)] + older
        anonymous = sorted({r.feedback or "" for r in untrusted})
        keys = sorted({r.feedback_source or "" for r in trusted_records})
        top = max(records, key=lambda r: r.probabilities[r.label])  # the surest answer the model gave it
        probability = top.probabilities[top.label]
        earlier = harvested_as(out, sha)
        kept = next((path for r in records if r.image for path in kept_paths(images, r.image) if path.is_file()), None)
        label = confirmed.get(sha)
        if label:
            source = REVIEWED_BY
        elif trusted:
            source = ",".join(keys)
        elif untrusted:
            source = ",".join(sorted({r.feedback_source or ANONYMOUS for r in untrusted}))
        else:
            source = ",".join(revoked)

        answer = {"sources": source, "predicted": top.label, "probability": f"{probability:.4f}"}
        # harvested before: its label changes only through a review (REVIEWED= naming it), never by more feedback;
        # a key's label that contradicts it goes to review, where a person can make that change
        contradicted = earlier and label is None and set(trusted) - set(earlier)
        if contradicted:
            result.hold(
                held_row(
                    kept or sorted(earlier.values())[0],
                    trusted,
                    answer,
                    "a trusted label contradicts the harvested one",
                )
            )
            continue
        if earlier and (label is None or (label in earlier and len(earlier) == 1)):
            first = sorted(earlier)[0]
            result.already.append(f"{first}/{earlier[first].name}")
            result.count(source, "already_harvested")
            continue
        if label == DROPPED:  # a person's review drops it, a harvested copy too
            for old in earlier.values():
                old.unlink()
            result.leave_out(sha, source, "dropped by a person's review")
            continue
        if kept is None and earlier:  # relabelled by a review after the service let go of it: the harvested copy
            kept = sorted(earlier.values())[0]
        if kept is None:
            result.leave_out(sha, source, "photo no longer kept")
            continue
        if sha in evaluation:
            result.leave_out(sha, source, IN_EVALUATION)
            continue
        if sha in training:
            given = {*trusted, *anonymous, *([label] if label else [])}
            result.leave_out(sha, source, CONTRADICTS_TRAINING if given - {training[sha]} else IN_TRAINING)
            continue
        if label is None and not trusted and not untrusted:
            result.leave_out(sha, source, REVOKED)
            continue
        reason = ""
        if label is None and not trusted and any(r.is_pet is False for r in records):
            result.leave_out(sha, source, "anonymous label on a photo the model called not a pet")
            continue
        if label is None and not trusted and older:
            reason = "a label under a key's name, on a prediction older than that key: a person confirms it"
        elif label is None and not trusted:
            reason = "anonymous label: a person confirms it"
        elif label is None and len(trusted) > 1:
            reason = "trusted labels disagree"
        elif label is None and trusted[0] != top.label and probability >= review_confidence:
            reason = f"contradicts an answer of probability >= {review_confidence}"
        if reason:
            result.hold(held_row(kept, trusted or anonymous, answer, reason))
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
    rows_out += [{"image": sha, "photo": "", "labels_given": "", "sources": REVIEWED_BY, "predicted": "",
                  "probability": "", "reason": DECIDED, "confirmed_label": label}
                 for sha, label in sorted(decisions.items()) if sha not in listed]  # fmt: skip
    return rows_out


def decided(path: Path, labels: list[str]) -> dict[str, str]:
    """sha256 -> label (or none) of every decision a harvest took in before, from the review file it keeps: a
    person's decision stays taken in every later harvest, with or without REVIEWED=. (A label typed in a held row
    counts only once a harvest is given the file with REVIEWED=.) Its cells are checked as REVIEWED='s are."""
    return read_decisions(path, labels, only_reason=DECIDED) if path.exists() else {}


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def feedback_rows(db: str) -> list[PredictionRecord]:
    """The store's labelled rows, read through the service's own store code, read-only."""
    try:
        store = PredictionStore(db, size=1, read_only=True)  # nothing added, nothing evicted, nothing created
        try:
            return store.feedback_rows()
        finally:
            store.close()
    except (StoreError, *STORE_ERRORS) as error:
        raise SystemExit(f"harvest: cannot read the feedback store: {error}") from None


def labelled_area(images: Path) -> list[tuple[Path, float]]:
    """Every photo waiting in the labelled areas, with its inode's ctime (when its link was made, or later)."""
    listed = []
    for area in (LABELLED, ANONYMOUS_LABELLED):
        for path in (images / area).glob("*.*"):
            if not path.name.startswith("."):
                try:
                    listed.append((path, path.stat().st_ctime))
                except FileNotFoundError:  # taken meanwhile
                    continue
    return listed


def trusted_keys(path: Path | None, rows: list[PredictionRecord]) -> dict[str, float]:
    """server.keys.labellers of API_KEYS_FILE; an error when the store holds keyed labels and the file is not
    given or cannot be read (never "trust every name": a revoked key's labels would be used)."""
    keyed = sorted({r.feedback_source for r in rows if r.feedback and r.feedback_source not in (None, ANONYMOUS)})
    if path is None and not keyed:
        return {}
    if path is None:
        raise SystemExit(f"harvest: the store holds labels given with keys ({', '.join(keyed[:5])}), and no "
                         "API_KEYS_FILE (--keys) says which are still valid: give the service's keys file")  # fmt: skip
    try:
        return valid_labellers(path)
    except (OSError, UnicodeDecodeError) as error:
        if not keyed:
            return {}
        raise SystemExit(
            f"harvest: cannot read API_KEYS_FILE {path} ({error}); the store holds labels given "
            "with keys, and harvest takes a key's labels only while the file holds it valid"
        ) from None


def mark_harvested(db: str, labels: list[PredictionRecord]) -> tuple[int | None, str]:
    """Tell the store these labels, as read, are done with (taken in a data version that came back, or left out for
    good), so it may evict them: how many it marked (None: none, it cannot), and what happened, in words. A label
    that replaced one of them since is not marked. Never an error: the harvest itself is done, and the next one
    marks them again (marking is idempotent)."""
    if not labels:
        return 0, "no labels to mark harvested in the store"
    later = f"{len(labels)} labels taken stay in the store, and count against its bound, until a harvest marks them"
    try:
        store = PredictionStore(db, size=1, read_only=True)
        try:
            if not hasattr(store, "mark_harvested"):
                return None, f"WARNING labels NOT marked harvested: this store code has no mark_harvested; {later}"
            marked = store.mark_harvested(labels)
        finally:
            store.close()
    except (StoreError, *STORE_ERRORS) as error:
        return None, f"WARNING labels NOT marked harvested: the store said: {error}; {later}"
    return marked, f"{marked} labels marked harvested in the store (it may evict them now)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=os.environ.get("FEEDBACK_DB"), help="FEEDBACK_DB: SQLite file or URL")
    parser.add_argument("--images", type=Path, default=os.environ.get("FEEDBACK_IMAGES"), help="FEEDBACK_IMAGES")
    parser.add_argument("--keys", type=Path, default=os.environ.get("API_KEYS_FILE") or None,
                        help="API_KEYS_FILE: the service's keys (a key's labels count while it is valid)")  # fmt: skip
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
    decisions = {**decided(args.review_out, labels), **reviewed(args.reviewed, labels)}  # checked before any change
    # The labelled areas are listed before the store is read: the service links a label's photo, then records it (a
    # link found there already is made anew), so a photo listed here without its record is either just linked (under
    # an hour old, kept) or an orphan (evicted, or a label refused or never committed).
    waiting = labelled_area(args.images)
    rows = feedback_rows(args.db)
    labellers = trusted_keys(args.keys, rows)
    result = harvest(rows, args.images, args.out, labels, evaluation_photos(args.manifest), review_confidence,
                     decisions, training_labels(args.manifest), labellers=labellers)  # fmt: skip
    # The labelled area lets go of a photo once it is in a data version that came back (found harvested before:
    # data/feedback as checked out, dvc pull'ed), never of one just copied, which exists only here until the new
    # version is pushed and merged.
    released = {Path(item).name.split(".")[0] for item in result.already} | {sha for sha, _ in result.left_out}
    # a label given since the store was read (while the rules ran) keeps its photo: the next harvest decides on it
    seen = {(row.prediction_id, row.feedback, row.feedback_source) for row in rows}
    since = [
        row for row in feedback_rows(args.db) if (row.prediction_id, row.feedback, row.feedback_source) not in seen
    ]
    released -= {row.image.split(".")[0] for row in since if row.image}
    recorded = {row.image.split(".")[0] for row in rows + since if row.image}
    for path, linked in waiting:
        sha = path.name.split(".")[0]
        # harvested before, or left out for good (an evaluation photo, dropped, not a pet); or a photo whose record
        # the store no longer holds, linked there an hour ago at least (ctime: a link changes it, sending does not
        # make it older; the mtime is the upload's, when it was last sent)
        orphan = sha not in recorded and time.time() - linked > ORPHAN_AFTER_S
        if sha in released or orphan:
            path.unlink(missing_ok=True)
    rows_out = merge_review(args.review_out, result.held, decisions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, REVIEW_FIELDS)
    writer.writeheader()
    writer.writerows(rows_out)
    write_atomically(args.review_out, buffer.getvalue())
    in_data = Counter(path.parent.name for path in args.out.glob("*/*") if not path.name.startswith("."))
    totals = {"data_feedback_photos": sum(in_data.values()),
              "data_feedback_photos_by_label": dict(sorted(in_data.items())),
              "review_rows_undecided": sum(1 for row in rows_out if not row["confirmed_label"])}  # fmt: skip
    report = {"this_run": result.summary(), "totals": totals, "feedback_rows": len(rows),
              "rule": {"review_confidence": review_confidence}, "left_out_photos": result.left_out,
              "review_csv": str(args.review_out)}  # fmt: skip
    # the labels of photos let go of above (harvested before, or left out for good), as read; never those just copied
    done = [row for row in rows if row.image and row.image.split(".")[0] in released]
    marked, marking = mark_harvested(args.db, done)
    report["store"] = {"labels_done": len(done), "marked_harvested": marked}
    write_atomically(args.report, json.dumps(report, indent=2) + "\n")
    print(json.dumps({"this_run": result.summary(), "totals": totals}))
    reasons = Counter(why for _, why in result.left_out)
    apart = (IN_TRAINING, CONTRADICTS_TRAINING, IN_EVALUATION)
    print(f"harvest: {len(result.used)} new photos in {args.out} ({totals['data_feedback_photos']} there in all); "
          f"not new: {len(result.already)} harvested before, {reasons[IN_TRAINING]} already training photos, "
          f"{reasons[IN_EVALUATION]} evaluation photos (left out); {len(result.held)} held for review; "
          f"{len(result.left_out) - sum(reasons[why] for why in apart)} otherwise left out")  # fmt: skip
    if reasons[CONTRADICTS_TRAINING]:
        print(
            f"harvest: WARNING {reasons[CONTRADICTS_TRAINING]} photos identical to a training photo were given "
            "another label than its own (label noise, or someone poisoning the data; left out): see their sources in "
            f"by_source and the photos in {args.report}'s left_out_photos"
        )
    if result.held:
        print(
            f"harvest: to review the {len(result.held)} held photos, open {args.review_out}: look at each row's "
            f"photo (the `photo` column), type its label in `confirmed_label` (one of {', '.join(labels)}, or "
            f"{DROPPED} to drop it; empty decides later), then run: make harvest REVIEWED={args.review_out}"
        )
    print(f"harvest: {marking}")


if __name__ == "__main__":
    main()
