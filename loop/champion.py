"""The one champion rule: a registered model becomes the `candidate`, the version CD may deploy, only when its served
answers are shown not worse than those of the model production runs, on every protected measure.

`make export` (after `make train`) and `make retrain` decide here, and nowhere else. Both models are compared as CD
ships them: each registered version's served ONNX file (deploy.model_release), classified through the service's own
code (export.answers), on the same images: accuracy on every set of labelled photos, pets kept over all of them and
the pooled non-pets flagged, by training/gates.py's rule (params.yaml `gates`); and better on the accuracy of at
least one set. Photos the production model trained on (its run's logged manifest) are no test of it and are left
out.

The reference is what production runs: `--production VERSION` (a version number, `<registered model>-vN` as a release
records it, or `none`), else the `champion` alias, which CD moves to what production runs once a deploy passed its
checks. With no production model there is nothing to be shown not worse than: the decision refuses unless told
`--bootstrap` (the first model, deployed by hand: docs/gates.md). The decision is recorded on the registered version
(tags `decision`, `decided_against`, `decision_reason`, and `decided_sha256`: the served file it judged; `decision`
is `pending` while they are written) before the `candidate` alias moves, and CD refuses a candidate decided against
another version than the one production runs, or on another file than the one it ships (deploy.model_release
--check-decided-against --sha256): an export of the same checkpoint again changes the version's served file, and that
file is decided again.

    python -m loop.champion                    # models/'s served file against the champion alias (make export)
    python -m loop.champion --production 7     # against v7, what production runs (current.json's release)
    python -m loop.champion --bootstrap        # no production model yet: this one is the first candidate
    python -m loop.champion --version 9 --production 7   # a registered version decided again, on data/processed
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from deploy.model_release import (
    DECIDED_AGAINST,
    DECIDED_SHA256,
    DECISION,
    NO_PRODUCTION,
    alias_version,
    release,
    version_number,
)
from export.answers import Answers, gate_not_pets, served_answers
from server.model_file import choose_model_file, read_metadata
from training import gates, tracking
from training.config import DEFAULT_PARAMS, load_params
from training.utils import sha256_file, write_json

Photos = list[tuple[Path, int]]  # (photo, index of its label)
BOOTSTRAP = (
    "no production model to compare with: refused. The first model is a candidate only when asked explicitly: "
    "python -m loop.champion --bootstrap (make export BOOTSTRAP=1; make retrain BOOTSTRAP=1), or name what "
    "production runs with --production VERSION (docs/gates.md)"
)


def labelled_files(root: Path, splits: tuple[str, ...], labels: tuple[str, ...]) -> Photos:
    """(photo, label index) for every photo of the splits under root, in a fixed order."""
    return [(path, index) for split in splits for index, label in enumerate(labels)
            for path in sorted((root / split / label).glob("*"))]  # fmt: skip


def decide(answers_by_set: dict[str, tuple[Answers, Answers]], rule: gates.Rule) -> dict[str, Any]:
    """training.gates' rule on each set's (production, challenger) answers: accuracy on every set and pets kept over
    all of them not worse, the pooled non-pets flagged not worse, better on the accuracy of at least one set."""
    comparisons: dict[str, tuple[str, np.ndarray, np.ndarray]] = {
        f"accuracy: {name}": ("accuracy", reference.right, challenger.right)
        for name, (reference, challenger) in answers_by_set.items()
    }
    pairs = list(answers_by_set.values())
    if any(reference.kept is not None for reference, _ in pairs):  # a challenger that lost the pet output: refused
        if all(a.kept is not None for pair in pairs for a in pair):
            kept = [np.concatenate([pair[k].kept for pair in pairs]) for k in (0, 1)]
            flagged = [pairs[0][0].flagged, pairs[0][1].flagged]
        else:
            kept = flagged = [np.zeros(0, bool)] * 2
        comparisons["pets kept: " + " + ".join(answers_by_set)] = ("pets_kept", *kept)
        comparisons["non-pets flagged: pooled non-pets"] = ("not_pets_flagged", *flagged)
    verdict = gates.judge(comparisons, rule, better_on=tuple(f"accuracy: {name}" for name in answers_by_set))
    return {"promoted": verdict["accepted"], "reason": verdict["reason"], "evaluations": verdict["comparisons"],
            "rule": verdict["rule"]}  # fmt: skip


def trained_on(client: MlflowClient, run_id: str) -> set[str]:
    """sha256 of every photo a model's run trained on (the manifest training.train logs; make retrain's, earlier),
    empty when the run logged none; a registry that cannot be read raises, never looks like an empty set."""
    for manifest in tracking.MANIFESTS:
        if manifest in {artifact.path for artifact in client.list_artifacts(run_id, str(Path(manifest).parent))}:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=manifest))
            with local.open(newline="") as handle:
                return {row["sha256"] for row in csv.DictReader(handle) if row["split"] == "train"}
    return set()


def production_version(client: MlflowClient, registered: str, production: str | None, champion_alias: str, *,
                       bootstrap: bool = False) -> str | None:  # fmt: skip
    """The version production runs: `production` when given (None for "none"; a version that does not exist is an
    error), else the champion alias's (None when no version holds it). A bootstrap while one runs is an error."""
    if production is None:
        number = tracking.champion_version(client, registered, champion_alias)
    elif (number := version_number(production)) is not None:
        client.get_model_version(registered, number)
    if bootstrap and number is not None:
        raise SystemExit(f"champion: production runs v{number}: --bootstrap is only for the first model")
    return number


def settle(registered: str, version: str, local: Path, sets: dict[str, Photos], labels: tuple[str, ...],
           rule: gates.Rule, not_pets: list[bytes], work: Path, *, production: str | None, bootstrap: bool = False,
           candidate_alias: str = "candidate") -> dict[str, Any]:  # fmt: skip
    """Decide the registered `version` (as CD would ship it: its run's served file, which must be `local`) against
    `production`, the version production runs (None: none runs), on every set of photos; record the decision on the
    version and give it the candidate alias when it wins. Returns the record."""
    client = MlflowClient()
    challenger = release(registered, work / "challenger", version=version)
    if challenger["sha256"] != sha256_file(local):
        raise SystemExit(f"champion: the registry's file for v{version} ({challenger['artifact']}) is not the exported "
                         f"{local}: the export did not reach MLflow, nothing is decided")  # fmt: skip
    reference, excluded = None, {name: [] for name in sets}
    if production is None:
        decision = {"promoted": bootstrap, "evaluations": {},
                    "reason": "bootstrap: the first model, no production model to compare with" if bootstrap
                    else BOOTSTRAP}  # fmt: skip
    elif bootstrap:
        raise SystemExit(f"champion: production runs v{production}: --bootstrap is only for the first model")
    else:
        reference = release(registered, work / "production", version=production)
        seen = trained_on(client, reference["run_id"])
        excluded = {name: [path.name for path, _ in items if sha256_file(path) in seen] for name, items in sets.items()}
        sets = {
            name: [(path, i) for path, i in items if path.name not in excluded[name]] for name, items in sets.items()
        }
        files = {name: work / name / "model.onnx" for name in ("production", "challenger")}
        read = {name: [(path.read_bytes(), i) for path, i in items] for name, items in sets.items()}
        decision = decide({name: (served_answers(files["production"], items, not_pets, labels),
                                  served_answers(files["challenger"], items, not_pets, labels))
                           for name, items in read.items()}, rule)  # fmt: skip
    decision["evaluated"] = {name: len(items) for name, items in sets.items()}
    decision["excluded_production_trained_on"] = excluded
    against = production or NO_PRODUCTION
    verdict = "candidate" if decision["promoted"] else "refused"
    tags = {DECIDED_AGAINST: against, "decision_reason": decision["reason"][:4000],
            DECIDED_SHA256: challenger["sha256"], DECISION: verdict}  # fmt: skip
    # the record first: CD reads it for the candidate the alias names. "pending" before the rest and the verdict last,
    # so a decision cut short never leaves an earlier "candidate" beside this one's decided_against or decided_sha256
    client.set_model_version_tag(registered, version, DECISION, "pending")
    for key, value in tags.items():
        client.set_model_version_tag(registered, version, key, value)
    if decision["promoted"]:  # last: nothing after it can fail and leave a candidate without its record
        client.set_registered_model_alias(registered, candidate_alias, version)
    elif alias_version(client, registered, candidate_alias) == version:  # decided again, and lost this time
        client.delete_registered_model_alias(registered, candidate_alias)
    keys = ("version", "run_id", "artifact", "precision", "sha256")
    return {
        "production": {k: reference[k] for k in keys} if reference else None,
        "challenger": {k: challenger[k] for k in keys},
        "decided_against": against,
        "decision": decision,
        "candidate": version if decision["promoted"] else None,
    }


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """--production and --bootstrap, as make export, make decide and make retrain take them."""
    parser.add_argument("--production", metavar="VERSION",
                        help="the version production runs (N, <registered model>-vN or none; default: the champion "
                        "alias, which CD moves to what production runs)")  # fmt: skip
    parser.add_argument("--bootstrap", action="store_true",
                        help="no production model yet: make this one the candidate without a comparison")  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--models", type=Path, default=Path("models"), help="the folder make export writes")
    parser.add_argument("--version", help="decide this registered version instead of the model in --models")
    parser.add_argument("--data", type=Path, default=None, help="prepared data: val+test decide (default: params)")
    parser.add_argument("--work", type=Path, default=Path("build/champion"), help="downloaded models, the report")
    add_reference_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    tracking.configure(params.mlflow.experiment)
    registered, labels = params.mlflow.registered_model, tuple(params.preprocess["labels"])
    if args.version:
        version = version_number(args.version)
        local = args.work / "registered" / "model.onnx"
        release(registered, local.parent, version=version)
    else:
        local = choose_model_file(args.models).path
        if not local.is_file():
            raise SystemExit(f"champion: no model to decide in {args.models} (run make export)")
        named = str(read_metadata(local).get("model_version", ""))
        if not named.startswith(f"{registered}-v"):
            raise SystemExit(f"champion: {local} is {named!r}, not a version of {registered}: not registered")
        version = version_number(named)
    client = MlflowClient()
    production = production_version(client, registered, args.production, params.mlflow.champion_alias,
                                    bootstrap=args.bootstrap)  # fmt: skip
    data = args.data or Path(params.data.processed_dir)
    record = settle(registered, version, local, {"val+test": labelled_files(data, ("val", "test"), labels)}, labels,
                    gates.Rule.from_dict(params.gates), gate_not_pets(params.pet), args.work, production=production,
                    bootstrap=args.bootstrap, candidate_alias=params.mlflow.candidate_alias)  # fmt: skip
    write_json(args.work / "decision.json", record)
    verdict = "the candidate, for CD to deploy" if record["candidate"] else "not a candidate"
    print(f"champion: v{version} against {record['decided_against']}: {verdict}: {record['decision']['reason']}")
    return record


if __name__ == "__main__":
    main()
