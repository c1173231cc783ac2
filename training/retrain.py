"""`make retrain`: the harvested feedback photos join the training data, and a challenger earns its way to champion.

1. Data: the original prepared data (data/processed) stays as it is, its validation and test photos frozen. Each
   harvested photo (data/feedback/<label>/, `make harvest`) goes either to training or to the "recent photos"
   evaluation set, by a salted hash of its content (params.yaml `retrain.recent_share`, `retrain.recent_salt`): the
   same photo lands on the same side in every retrain, whatever else was harvested. A harvested photo identical to
   any original photo, filed under two labels, or that no longer decodes is left out, with the reason.
2. Training: the same two stages as `make train` (training/train.py) on original train + harvested train, then the
   same export (export/convert.py, and export/quantize.py's int8 gate unless --quantize none). The model is
   registered and given the alias `challenger`; its MLflow run gets the ONNX file CD would ship.
3. Decision, by the rule in params.yaml `retrain`, fixed before the run and copied into the report: the champion (as
   CD ships it: deploy/model_release.py) and the challenger (as it would ship) classify the same photos through the
   service's own code (server.model). The challenger becomes champion only when, on the original evaluation photos
   and on the recent photos alike, it is not worse (the lower end of the 95% interval of the paired accuracy
   difference, Newcombe's for paired proportions, is above -max_relative_loss x the champion's accuracy: MLPerf's
   99% of the reference, as the int8 gate) and on at least one of them it is better (more photos only it gets
   right, McNemar's exact p < alpha / 2: two sets, Bonferroni). Too few photos make the interval too wide to show
   "not worse", and the champion stays.

reports/retrain.json records the data versions, the counts used, held out and left out, both evaluations, the rule,
the statistics and the decision. CD then ships whichever version holds the champion alias, as it does after
`make train export`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from deploy.model_release import release
from export import convert, quantize
from imaging import DEFAULT_MAX_PIXELS, EXTENSIONS, Decoder, ImageError, label_for_name
from server.model import Model
from server.model_file import choose_model_file
from training import tracking
from training.config import DEFAULT_PARAMS, load_params
from training.data import MANIFEST_FIELDS, SPLITS, Skip, validate
from training.model import add_pretrained_argument
from training.stats import paired_difference, proportion
from training.train import STAGES, train_stage
from training.utils import git_commit, sha256_bytes, sha256_file, write_json

RECENT = "recent"  # the harvested photos held out for evaluation
RULE = (
    "The challenger becomes champion only when, on the original evaluation photos and on the recent photos alike, "
    "the lower end of the 95% interval of its paired accuracy difference with the champion (Newcombe 1998, paired "
    "proportions) is at least -{rule.max_relative_loss} x the champion's accuracy there (not worse: MLPerf's 99% of "
    "the reference), and on at least one of the two it gets more photos right that the champion gets wrong than the "
    "reverse with McNemar's exact p < {bonferroni} (better: alpha {rule.alpha}, Bonferroni over two sets)."
)


@dataclass(frozen=True)
class Rule:
    """params.yaml `retrain`: how a challenger becomes champion."""

    recent_share: float
    recent_salt: str
    max_relative_loss: float
    alpha: float
    challenger_alias: str

    @classmethod
    def from_params(cls, path: Path) -> Rule:
        raw = yaml.safe_load(path.read_text())["retrain"]
        rule = cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        if not 0 < rule.recent_share < 1 or not 0 <= rule.max_relative_loss < 1 or not 0 < rule.alpha < 1:
            raise ValueError(f"params.yaml retrain: shares and alpha must lie in (0, 1): {rule}")
        return rule


def is_recent(sha256: str, share: float, salt: str) -> bool:
    """Whether a harvested photo is held out as a recent photo: a salted hash of its content, so never moved."""
    return int(hashlib.sha256(f"{salt}:{sha256}".encode()).hexdigest()[:16], 16) / 16**16 < share


@dataclass
class Assembly:
    root: Path
    original: Counter = field(default_factory=Counter)  # split -> photos
    harvested: Counter = field(default_factory=Counter)  # "train"/"recent" -> photos
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (harvested file, why)

    def summary(self) -> dict[str, Any]:
        return {"original": dict(self.original), "harvested": dict(self.harvested),
                "left_out": dict(Counter(why for _, why in self.left_out))}  # fmt: skip


def place(source: Path, target: Path) -> None:
    """The photo at target: a hard link where the file system allows it, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def assemble(processed: Path, feedback: Path, out: Path, labels: tuple[str, ...], rule: Rule,
             preprocess: dict[str, Any]) -> Assembly:  # fmt: skip
    """out/{train,val,test}/<label>/ = the original prepared data plus the harvested training photos, out/recent/ = the
    held-out harvested photos, out/manifest.csv = every photo with its split (its sha256 is the data version)."""
    if out.exists():
        shutil.rmtree(out)
    for split in (*SPLITS, RECENT):  # every class folder, even an empty one: the class order must not shift
        for label in labels:
            (out / split / label).mkdir(parents=True)
    with (processed / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assembly = Assembly(out)
    for row in rows:
        place(processed / row["file"], out / row["file"])
        assembly.original[row["split"]] += 1
    original = {row["sha256"] for row in rows}
    files = sorted(p for p in feedback.glob("*/*") if p.is_file()) if feedback.is_dir() else []
    digests = Counter(sha256_bytes(p.read_bytes()) for p in files)
    decoder = Decoder.from_spec(preprocess)
    for path in files:
        data = path.read_bytes()
        digest, label = sha256_bytes(data), label_for_name(path.parent.name, labels)
        name = f"{path.parent.name}/{path.name}"
        try:
            if label is None:
                raise Skip(f"folder {path.parent.name} is none of the labels {list(labels)}")
            if digest in original:
                raise Skip("identical to a photo of the original data")
            if digests[digest] > 1:
                raise Skip("filed under more than one label")
            fmt, width, height = validate(data, decoder)
        except (Skip, ImageError) as reason:
            assembly.left_out.append((name, str(reason)))
            continue
        split = RECENT if is_recent(digest, rule.recent_share, rule.recent_salt) else "train"
        file = f"{split}/{label}/{digest[:16]}{EXTENSIONS[fmt]}"
        place(path, out / file)
        rows.append({"file": file, "source": f"feedback/{name}", "sha256": digest, "label": label, "split": split,
                     "width": width, "height": height, "format": fmt})  # fmt: skip
        assembly.harvested[split] += 1
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return assembly


def labelled_files(root: Path, splits: tuple[str, ...], labels: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(photo, label index) for every photo of the splits under root, in a fixed order."""
    return [(path, index) for split in splits for index, label in enumerate(labels)
            for path in sorted((root / split / label).glob("*"))]  # fmt: skip


def correct(model_path: Path, photos: list[tuple[Path, int]], labels: tuple[str, ...]) -> np.ndarray:
    """Right or wrong, photo by photo, as the service answers (server.model: its decoding, preprocessing, mirror)."""
    model = Model(model_path, threads=0, max_pixels=DEFAULT_MAX_PIXELS)
    if tuple(model.labels) != labels:
        raise SystemExit(f"{model_path} predicts {model.labels}, the data has {list(labels)}")
    predictions = model.classify_all([path.read_bytes() for path, _ in photos])[0]
    return np.array([getattr(p, "label", None) == labels[i] for p, (_, i) in zip(predictions, photos, strict=True)])


def decide(sets: dict[str, tuple[np.ndarray, np.ndarray]], rule: Rule) -> dict[str, Any]:
    """The rule on each set's (champion right, challenger right): not worse on every set, better on at least one."""
    evaluations: dict[str, Any] = {}
    for name, (champion, challenger) in sets.items():
        if len(champion) == 0:
            evaluations[name] = {"n": 0, "not_worse": False, "better": False, "why": "no photos"}
            continue
        comparison = paired_difference(champion, challenger)
        margin = rule.max_relative_loss * comparison["accuracy_reference"]
        not_worse = comparison["difference_ci95"][0] >= -margin
        better = (comparison["only_candidate_right"] > comparison["only_reference_right"]
                  and comparison["mcnemar_p"] < rule.alpha / len(sets))  # fmt: skip
        evaluations[name] = {
            "champion": proportion(int(champion.sum()), len(champion)),
            "challenger": proportion(int(challenger.sum()), len(challenger)),
            **comparison, "margin": margin, "not_worse": bool(not_worse), "better": bool(better),
        }  # fmt: skip
    worse = [name for name, e in evaluations.items() if not e["not_worse"]]
    better = [name for name, e in evaluations.items() if e["better"]]
    promoted = not worse and bool(better)
    if worse:
        why = "not shown to be not worse on " + ", ".join(
            f"{name} (lower 95% bound {evaluations[name]['difference_ci95'][0]:+.4f} < "
            f"-{evaluations[name]['margin']:.4f})"
            if evaluations[name]["n"]
            else f"{name} (no photos)"
            for name in worse
        )
    elif not better:
        why = f"not worse, but not better beyond the noise on any set (McNemar p < {rule.alpha / len(sets):.3f})"
    else:
        why = f"not worse on every set and better on {', '.join(better)}"
    return {"promoted": promoted, "reason": why, "evaluations": evaluations}


def feedback_version(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for the harvested folder (`make harvest` runs dvc add), or None."""
    if not dvc_file.is_file():
        return None
    return str(yaml.safe_load(dvc_file.read_text()).get("outs", [{}])[0].get("md5"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="the original prepared data (default: params)")
    parser.add_argument("--feedback", type=Path, default=Path("data/feedback"), help="what make harvest wrote")
    parser.add_argument("--work", type=Path, default=Path("build/retrain"), help="assembled data, models, reports")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8", help="as make export's QUANTIZE")
    parser.add_argument("--report", type=Path, default=Path("reports/retrain.json"))
    add_pretrained_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    params, rule = load_params(args.params), Rule.from_params(args.params)
    labels = tuple(params.preprocess["labels"])
    processed = args.data or Path(params.data.processed_dir)
    data, models = args.work / "data", args.work / "models"
    assembly = assemble(processed, args.feedback, data, labels, rule, params.preprocess)
    print(f"retrain: {assembly.summary()}", flush=True)
    if not assembly.harvested["train"]:
        raise SystemExit(f"retrain: no harvested photo to train on in {args.feedback} (run make harvest first)")

    tracking.configure(params.mlflow.experiment)
    reports = {name: train_stage(name, params, data, args.pretrained, models, decide_champion=False) for name in STAGES}
    common = ["--data", str(data), "--params", str(args.params)]
    convert.main(["--checkpoint", str(models / "final.pt"), "--out", str(models / "model.onnx"),
                  "--report", str(args.work / "export.json"), *common])  # fmt: skip
    if args.quantize == "int8":
        quantize.main(["--model", str(models / "model.onnx"), "--report", str(args.work / "quantize.json"), *common])
    client, registered = MlflowClient(), params.mlflow.registered_model
    version = str(reports["final"]["registered_version"])
    client.set_registered_model_alias(registered, rule.challenger_alias, version)
    challenger_file = choose_model_file(models).path

    photos = {
        "original": labelled_files(data, ("val", "test"), labels),
        "recent": labelled_files(data, (RECENT,), labels),
    }
    try:
        champion = release(registered, args.work / "champion", alias=params.mlflow.champion_alias)
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is None:
        decision: dict[str, Any] = {"promoted": True, "reason": "no champion yet", "evaluations": {}}
    else:
        served = args.work / "champion" / "model.onnx"
        right = {name: (correct(served, files, labels), correct(challenger_file, files, labels))
                 for name, files in photos.items()}  # fmt: skip
        decision = decide(right, rule)
    if decision["promoted"]:
        client.set_registered_model_alias(registered, params.mlflow.champion_alias, version)
    run_id = reports["final"]["run_id"]
    versions = {"original": sha256_file(processed / "manifest.csv"), "assembled": sha256_file(data / "manifest.csv"),
                "feedback_dvc_md5": feedback_version(args.feedback.with_suffix(".dvc"))}  # fmt: skip
    client.set_tag(run_id, "retrain", "true")
    client.set_tag(run_id, "feedback_version", str(versions["feedback_dvc_md5"]))
    client.set_tag(run_id, "retrain_promoted", str(decision["promoted"]))
    report = {
        "data_versions": versions,
        "counts": {**assembly.summary(), "evaluated": {name: len(files) for name, files in photos.items()}},
        "left_out_photos": assembly.left_out,
        "rule": {**vars(rule), "text": RULE.format(rule=rule, bonferroni=rule.alpha / len(photos))},
        "champion": {k: champion[k] for k in ("version", "run_id", "precision", "sha256")} if champion else None,
        "challenger": {
            "version": version,
            "run_id": run_id,
            "file": challenger_file.name,
            "sha256": sha256_file(challenger_file),
        },
        "decision": decision,
        "champion_after": version if decision["promoted"] else (champion or {}).get("version"),
        "git_commit": git_commit(),
    }
    write_json(args.report, report)
    verdict = "promoted to champion" if decision["promoted"] else "champion kept"
    print(f"retrain: challenger v{version}: {verdict}: {decision['reason']} ({args.report})", flush=True)
    return report


if __name__ == "__main__":
    main()
