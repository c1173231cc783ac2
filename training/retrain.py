"""`make retrain`: the harvested feedback photos join the training data, and a challenger earns its way to champion.

1. Data: the original prepared data (data/processed) stays as it is, its validation and test photos frozen. Each
   harvested photo (data/feedback/<label>/, `make harvest`) goes either to training or to the "recent photos"
   evaluation set, by a salted hash of its content (params.yaml `retrain.recent_share`, `retrain.recent_salt`): the
   same photo lands on the same side in every retrain, whatever else was harvested. A harvested photo identical to
   any original photo, filed under two labels, or that no longer decodes is left out, with the reason.
2. Training: the same two stages as `make train` (training/train.py) on original train + harvested train, then the
   same export (export/convert.py, and export/quantize.py's int8 gate unless --quantize none). The model is
   registered and given the alias `challenger`; its MLflow run gets the ONNX file CD would ship and the manifest of
   what it trained on.
3. Decision, by the rule in params.yaml `retrain`, fixed before the run and copied into the report: the champion and
   the challenger, both as CD ships a model (downloaded from the registry by deploy/model_release.py), classify the
   same photos through the service's own code (server.model). The challenger becomes champion only when, on the
   original evaluation photos and on the recent photos alike, it is not worse (the lower end of the 95% interval of
   the paired accuracy difference, Newcombe's for paired proportions, is above -max_relative_loss x the champion's
   accuracy: MLPerf's 99% of the reference, as the int8 gate) and on at least one of them it is better (more photos
   only it gets right, McNemar's exact p < alpha / 2: two sets, Bonferroni). Too few photos make the interval too
   wide to show "not worse", and the champion stays. The champion alias moves last.

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
from imaging import DEFAULT_MAX_PIXELS, EXTENSIONS, Decoder, label_for_name
from server.model import Model
from server.model_file import choose_model_file
from training import tracking
from training.config import DEFAULT_PARAMS, load_params
from training.data import MANIFEST_FIELDS, SPLITS, Skip, validate
from training.model import add_pretrained_argument
from training.stats import paired_difference, proportion
from training.train import STAGES, train_stage
from training.utils import git_commit, sha256_file, write_json

RECENT = "recent"  # the harvested photos held out for evaluation
MANIFEST = "retrain/manifest.csv"  # the assembled data's manifest, in the challenger's MLflow run
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
    assembly = Assembly()
    for row in rows:
        place(processed / row["file"], out / row["file"])
        assembly.original[row["split"]] += 1
    original = {row["sha256"] for row in rows}
    files = sorted(p for p in feedback.glob("*/*") if p.is_file()) if feedback.is_dir() else []
    digest_of = {path: sha256_file(path) for path in files}
    copies = Counter(digest_of.values())
    decoder = Decoder.from_spec(preprocess)
    for path in files:
        digest, label = digest_of[path], label_for_name(path.parent.name, labels)
        name = f"{path.parent.name}/{path.name}"
        try:
            if label is None:
                raise Skip(f"folder {path.parent.name} is none of the labels {list(labels)}")
            if digest in original:
                raise Skip("identical to a photo of the original data")
            if copies[digest] > 1:
                raise Skip("filed under more than one label")
            fmt, width, height = validate(path.read_bytes(), decoder)
        except Skip as reason:
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
    md5 = (yaml.safe_load(dvc_file.read_text()).get("outs") or [{}])[0].get("md5")
    return str(md5) if md5 else None


def champion_version(client: MlflowClient, registered: str, alias: str) -> str | None:
    """The version holding the alias, or None when there is none yet; any other MLflow error is raised (a store that
    cannot be read must never look like "no champion", which would promote the challenger untested)."""
    try:
        model = client.get_registered_model(registered)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return str(version) if version is not None else None


def trained_on(client: MlflowClient, run_id: str) -> set[str]:
    """sha256 of every photo a retrained model's run trained on (its logged manifest); empty for a model of `make
    train`, whose training photos are the original ones (a harvested copy of one is left out anyway)."""
    if MANIFEST not in {artifact.path for artifact in client.list_artifacts(run_id, str(Path(MANIFEST).parent))}:
        return set()  # a model of make train; a registry that cannot be read raises, never looks like this
    manifest = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MANIFEST))
    with manifest.open(newline="") as handle:
        return {row["sha256"] for row in csv.DictReader(handle) if row["split"] == "train"}


def settle(registered: str, version: str, local: Path, data: Path, labels: tuple[str, ...], rule: Rule,
           champion_alias: str, work: Path) -> dict[str, Any]:  # fmt: skip
    """Compare the registered challenger (as CD would ship it: its run's served file, which must be the local one)
    with the champion (as CD ships it) by the rule, then move the champion alias when it wins. Returns the record."""
    client = MlflowClient()
    challenger = release(registered, work / "challenger", version=version)
    if challenger["sha256"] != sha256_file(local):
        raise SystemExit(f"retrain: the registry's file for v{version} ({challenger['artifact']}) is not the exported "
                         f"{local}: the export did not reach MLflow, nothing is decided")  # fmt: skip
    photos = {
        "original": labelled_files(data, ("val", "test"), labels),
        "recent": labelled_files(data, (RECENT,), labels),
    }
    current = champion_version(client, registered, champion_alias)
    champion = release(registered, work / "champion", version=current) if current else None
    excluded: list[str] = []
    if champion:  # a recent photo the champion trained on (a redrawn share or salt) is no test of it
        seen = trained_on(client, champion["run_id"])
        excluded = [path.name for path, _ in photos["recent"] if sha256_file(path) in seen]
        photos["recent"] = [(path, i) for path, i in photos["recent"] if path.name not in excluded]
        files = {name: work / name / "model.onnx" for name in ("champion", "challenger")}
        right = {name: (correct(files["champion"], items, labels), correct(files["challenger"], items, labels))
                 for name, items in photos.items()}  # fmt: skip
        decision = decide(right, rule)
    else:
        decision = {"promoted": True, "reason": "no champion yet", "evaluations": {}}
    decision["evaluated"] = {name: len(items) for name, items in photos.items()}
    decision["recent_excluded_champion_trained_on"] = excluded
    run_id = challenger["run_id"]
    for key, value in {"retrain": "true", "retrain_promoted": str(decision["promoted"]),
                       "recent_share": str(rule.recent_share), "recent_salt": rule.recent_salt}.items():  # fmt: skip
        client.set_tag(run_id, key, value)
    if decision["promoted"]:  # last: nothing after it can fail and leave a champion without its record
        client.set_registered_model_alias(registered, champion_alias, version)
    keys = ("version", "run_id", "artifact", "precision", "sha256")
    return {
        "champion": {k: champion[k] for k in keys} if champion else None,
        "challenger": {k: challenger[k] for k in keys},
        "decision": decision,
        "champion_after": version if decision["promoted"] else current,
    }


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
    run_id, version = reports["final"]["run_id"], str(reports["final"]["registered_version"])
    versions = {"original": sha256_file(processed / "manifest.csv"), "assembled": sha256_file(data / "manifest.csv"),
                "feedback_dvc_md5": feedback_version(args.feedback.with_suffix(".dvc"))}  # fmt: skip
    with mlflow.start_run(run_id=run_id):  # what it trained on, for the next retrain's comparison (trained_on)
        mlflow.log_artifact(str(data / "manifest.csv"), artifact_path=str(Path(MANIFEST).parent))
        mlflow.set_tag("feedback_version", str(versions["feedback_dvc_md5"]))
    client, registered = MlflowClient(), params.mlflow.registered_model
    client.set_registered_model_alias(registered, rule.challenger_alias, version)  # complete: trained and exported
    settled = settle(registered, version, choose_model_file(models).path, data, labels, rule,
                     params.mlflow.champion_alias, args.work)  # fmt: skip
    decision = settled["decision"]
    report = {
        "data_versions": versions,
        "counts": {**assembly.summary(), "evaluated": decision["evaluated"]},
        "left_out_photos": assembly.left_out,
        "rule": {**vars(rule), "text": RULE.format(rule=rule, bonferroni=rule.alpha / 2)},
        **settled,
        "git_commit": git_commit(),
    }
    write_json(args.report, report)
    verdict = "promoted to champion" if decision["promoted"] else "champion kept"
    print(f"retrain: challenger v{version}: {verdict}: {decision['reason']} ({args.report})", flush=True)
    return report


if __name__ == "__main__":
    main()
