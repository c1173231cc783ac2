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
3. Decision, by the one champion rule (loop/champion.py, as `make export` decides): the model production runs
   (--production VERSION, default the `champion` alias) and the challenger, both as CD ships a model, classify the
   same images through the service's own code. The challenger becomes the candidate only when it is not worse on the
   accuracy of the original evaluation photos and of the recent photos, on the pets kept among them and on the pooled
   non-pets flagged (params.yaml `gates`, training/gates.py), and better on the accuracy of at least one of the two
   sets (McNemar's exact p < alpha / 2: two sets, Bonferroni). Too few images make an interval too wide to show "not
   worse", and production's model stays. With no production model the challenger is refused unless --bootstrap. The
   decision is recorded on the challenger's version (`decided_against`), then the winner gets the `candidate` alias.
4. The registry follows production: `champion` is what production runs. CD deploys the candidate (the retrain
   workflow dispatches it, pinned) only when it was decided against the version production runs now
   (deploy.model_release --check-decided-against), and only once its smoke test, post-deployment evaluation and the
   public switch have passed does `deploy.model_release --follow` move `champion` to it; a rollback moves it back.

reports/retrain.json records the data versions, the counts used, held out and left out, both evaluations, the rule,
the statistics and the decision (`candidate`: the version CD should deploy, or null).
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

import yaml
from mlflow.tracking import MlflowClient

from export import convert, quantize
from export.answers import gate_not_pets
from imaging import EXTENSIONS, Decoder, label_for_name
from loop import champion
from server.model_file import choose_model_file
from training import gates, tracking
from training.config import DEFAULT_PARAMS, load_params
from training.data import MANIFEST_FIELDS, SPLITS, Skip, validate
from training.model import add_pretrained_argument
from training.train import STAGES, train_stage
from training.utils import git_commit, sha256_file, write_json

RECENT = "recent"  # the harvested photos held out for evaluation
RULE = (
    "The challenger becomes the candidate only when, against the model production runs on the same images (both as "
    "CD ships them), it is not worse on the accuracy of the original evaluation photos and of the recent photos, on "
    "the pets kept among them and on the pooled non-pets flagged, and better on the accuracy of at least one of the "
    "two sets, by params.yaml gates: "
)


@dataclass(frozen=True)
class Rule:
    """params.yaml `retrain` (how harvested photos are split, the challenger's alias) and `gates` (the one rule a
    challenger must pass to become champion)."""

    recent_share: float
    recent_salt: str
    challenger_alias: str
    gates: gates.Rule

    @classmethod
    def from_params(cls, path: Path) -> Rule:
        raw = yaml.safe_load(path.read_text())
        retrain = raw["retrain"]
        names = [name for name in cls.__dataclass_fields__ if name != "gates"]
        rule = cls(**{name: retrain[name] for name in names}, gates=gates.Rule.from_dict(raw.get("gates")))
        if not 0 < rule.recent_share < 1:
            raise ValueError(f"params.yaml retrain: recent_share must lie in (0, 1): {rule}")
        return rule

    def text(self) -> str:
        return RULE + self.gates.text()

    def summary(self) -> dict[str, Any]:
        return {"recent_share": self.recent_share, "recent_salt": self.recent_salt, "text": self.text(),
                "challenger_alias": self.challenger_alias, "gates": vars(self.gates)}  # fmt: skip


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


def feedback_version(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for the harvested folder (`make harvest` runs dvc add), or None."""
    if not dvc_file.is_file():
        return None
    md5 = (yaml.safe_load(dvc_file.read_text()).get("outs") or [{}])[0].get("md5")
    return str(md5) if md5 else None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="the original prepared data (default: params)")
    parser.add_argument("--feedback", type=Path, default=Path("data/feedback"), help="what make harvest wrote")
    parser.add_argument("--work", type=Path, default=Path("build/retrain"), help="assembled data, models, reports")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8", help="as make export's QUANTIZE")
    parser.add_argument("--report", type=Path, default=Path("reports/retrain.json"))
    champion.add_reference_arguments(parser)
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
    client, registered = MlflowClient(), params.mlflow.registered_model
    production = champion.production_version(client, registered, args.production, params.mlflow.champion_alias,
                                              bootstrap=args.bootstrap)  # fmt: skip
    reports = {name: train_stage(name, params, data, args.pretrained, models) for name in STAGES}
    common = ["--data", str(data), "--params", str(args.params)]
    convert.main(["--checkpoint", str(models / "final.pt"), "--out", str(models / "model.onnx"),
                  "--report", str(args.work / "export.json"), *common])  # fmt: skip
    if args.quantize == "int8":
        quantize.main(["--model", str(models / "model.onnx"), "--report", str(args.work / "quantize.json"), *common])
    run_id, version = reports["final"]["run_id"], str(reports["final"]["registered_version"])
    versions = {"original": sha256_file(processed / "manifest.csv"), "assembled": sha256_file(data / "manifest.csv"),
                "feedback_dvc_md5": feedback_version(args.feedback.with_suffix(".dvc"))}  # fmt: skip
    for key, value in {"retrain": "true", "feedback_version": str(versions["feedback_dvc_md5"]),
                       "recent_share": str(rule.recent_share), "recent_salt": rule.recent_salt}.items():  # fmt: skip
        client.set_tag(run_id, key, value)
    client.set_registered_model_alias(registered, rule.challenger_alias, version)  # complete: trained and exported
    sets = {"original": champion.labelled_files(data, ("val", "test"), labels),
            RECENT: champion.labelled_files(data, (RECENT,), labels)}  # fmt: skip
    settled = champion.settle(registered, version, choose_model_file(models).path, sets, labels, rule.gates,
                              gate_not_pets(params.pet), args.work, production=production, bootstrap=args.bootstrap,
                              candidate_alias=params.mlflow.candidate_alias)  # fmt: skip
    client.set_tag(run_id, "retrain_promoted", str(settled["decision"]["promoted"]))
    settled["champion_after"] = tracking.champion_version(client, registered, params.mlflow.champion_alias)
    decision = settled["decision"]
    report = {
        "data_versions": versions,
        "counts": {**assembly.summary(), "evaluated": decision["evaluated"]},
        "left_out_photos": assembly.left_out,
        "rule": rule.summary(),
        **settled,
        "git_commit": git_commit(),
    }
    write_json(args.report, report)
    verdict = "the candidate, for CD to deploy" if decision["promoted"] else "not a candidate"
    print(f"retrain: challenger v{version}: {verdict}: {decision['reason']} ({args.report})", flush=True)
    return report


if __name__ == "__main__":
    main()
