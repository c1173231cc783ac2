"""Choose the model a deployment ships, explicitly: the MLflow `champion` (or a pinned registered version).

Resolves the registered model version, downloads the ONNX file `make export` serves, as its run's `served_model`
tag names it (`onnx/model.int8.onnx` when the int8 gate accepted it, else `onnx/model.onnx`; a run without the tag:
`onnx/model.onnx`), saves it as model.onnx, and writes what a deployment records and pins: a JSON release
(registered model, version, run id, artifact, precision, sha256) and, for the Kubernetes overlays, a `model.env`
with MODEL_VERSION, MODEL_URL and MODEL_SHA256.

    python -m deploy.model_release --alias champion --out build/release
    python -m deploy.model_release --follow 7       # production now runs v7 (CD, after its checks; a rollback)
    python -m deploy.model_release --check-decided-against 7 --version 9 --sha256 HEX  # CD: v9's file HEX vs v7?
    python -m deploy.model_release --version 7 --out build/release --env-out deploy/k8s/overlays/production/model.env \
        --url-template '{mlflow}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/{artifact}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVED_TAG = "served_model"  # set by export.quantize / export.served
PRECISIONS = {"model.onnx": "float32", "model.int8.onnx": "int8"}  # the files `make export` logs under onnx/
# The champion decision's record on a registered version (loop/champion.py): "candidate" or "refused", the version
# production ran that it was compared with (NO_PRODUCTION: none ran, a bootstrap), and the sha256 of the served file
# it judged (an export of the same checkpoint again logs onnx/* to the same run: the version's file can change)
DECISION, DECIDED_AGAINST, DECIDED_SHA256, NO_PRODUCTION = "decision", "decided_against", "decided_sha256", "none"


def registry_defaults() -> tuple[str, str]:
    """(registered model, champion alias) from params.yaml: one source of truth with training."""
    mlflow = yaml.safe_load((ROOT / "params.yaml").read_text())["mlflow"]
    return mlflow["registered_model"], mlflow["champion_alias"]


def alias_version(client: Any, registered_model: str, alias: str) -> str | None:
    """The version holding `alias`, or None when no version does (any other registry error is raised)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(registered_model, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def version_number(text: str) -> str | None:
    """The number in "7" or "<registered model>-v7" (a release's model_version); None for "" or "none" (no model)."""
    text = text.strip()
    return None if text in ("", NO_PRODUCTION) else text.rsplit("-v", 1)[-1]


def follow(registered_model: str, version: str, champion: str, candidate: str) -> dict[str, Any]:
    """The registry follows production: `champion` moves to the version production now runs (after CD's checks
    passed, or after a rollback), and `candidate` is cleared while it is that version. What moved."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    version = version.rsplit("-v", 1)[-1]
    client.get_model_version(registered_model, version)  # a version that does not exist is an error, not an alias
    before = alias_version(client, registered_model, champion)
    client.set_registered_model_alias(registered_model, champion, version)
    cleared = clear_candidate(client, registered_model, candidate, version)
    return {"registered_model": registered_model, "alias": champion, "before": before, "after": version,
            "candidate_cleared": cleared}  # fmt: skip


def clear_candidate(client: Any, registered_model: str, candidate: str, deployed: str) -> bool:
    """Delete the `candidate` alias only while it names `deployed`. MLflow has no conditional delete: a decision that
    names a newer candidate between the read and the delete loses its alias, so the delete is checked afterwards:
    the newest version above `deployed` that a decision made a candidate (its `decision` tag, written before its
    alias) gets the alias back, unless another alias was set since."""
    if alias_version(client, registered_model, candidate) != deployed:
        return False
    client.delete_registered_model_alias(registered_model, candidate)
    newer = [int(v.version) for v in client.search_model_versions(f"name='{registered_model}'")
             if int(v.version) > int(deployed) and v.tags.get(DECISION) == "candidate"]  # fmt: skip
    if newer and alias_version(client, registered_model, candidate) is None:
        client.set_registered_model_alias(registered_model, candidate, str(max(newer)))
        return False
    return True


def check_decided_against(registered_model: str, candidate: str, production: str, sha256: str | None = None) -> str:
    """CD's guard: `candidate` may replace `production` (the version production runs now; "none": nothing runs) only
    when loop/champion.py made it a candidate against that very version, judging the very file CD ships (`sha256`,
    its release.json's). A redeploy of what runs is not checked, neither its decision nor its file. Returns what was
    checked; raises SystemExit saying what to do otherwise."""
    from mlflow.tracking import MlflowClient

    wanted, running = version_number(candidate), version_number(production)
    if wanted is None:
        raise SystemExit("deploy.model_release: --check-decided-against needs --version CANDIDATE")
    if wanted == running:
        return f"v{wanted} is what production runs: a redeploy, no decision needed"
    if not sha256 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise SystemExit("deploy.model_release: --check-decided-against needs --sha256 HEX, the sha256 of the file "
                         f"CD ships (release.json's), 64 lowercase hex digits, not {sha256!r}: refused")  # fmt: skip
    tags = MlflowClient().get_model_version(registered_model, wanted).tags
    against, decision, judged = tags.get(DECIDED_AGAINST), tags.get(DECISION), tags.get(DECIDED_SHA256)
    runs = f"v{running}" if running else "no model (a first deploy)"
    flag = f"--production {running}" if running else "--production none --bootstrap"
    how = f"against what production runs (python -m loop.champion --version {wanted} {flag}, or make retrain "
    how += f"{'PRODUCTION=' + running if running else 'BOOTSTRAP=1'}) and deploy the candidate it names"
    if decision != "candidate":
        recorded = f"{decision or 'none recorded'}{', against ' + against if against else ''}"
        raise SystemExit(f"deploy.model_release: v{wanted} is no candidate (its decision: {recorded}): refused; "
                         f"decide it {how}")  # fmt: skip
    if against != (running or NO_PRODUCTION):
        was = f"v{against}" if against != NO_PRODUCTION else "no production model"
        raise SystemExit(f"deploy.model_release: v{wanted} was decided against {was} but production runs {runs}: "
                         f"refused; decide it {how}")  # fmt: skip
    if judged is None:
        raise SystemExit(f"deploy.model_release: v{wanted}'s decision records no {DECIDED_SHA256} (the served file it "
                         f"judged; decisions made before it was recorded): refused; decide it again {how}")  # fmt: skip
    if judged != sha256:
        raise SystemExit(f"deploy.model_release: v{wanted} was decided on the served file {judged} but the file to "
                         f"ship is {sha256}: its run's served file changed since the decision (an export again?), "
                         f"and the champion rule never compared it: refused; decide it again {how}")  # fmt: skip
    return f"v{wanted} was made a candidate against {runs}, what production runs, judging the file it ships ({sha256})"


def release(
    registered_model: str, out: Path, *, alias: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Download the chosen version's served ONNX file (its run's served_model tag) into out/model.onnx and describe
    it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias (e.g. champion) or version")
    client = MlflowClient()
    chosen = (
        client.get_model_version_by_alias(registered_model, alias)
        if alias
        else client.get_model_version(registered_model, version)
    )
    run = client.get_run(chosen.run_id)
    served = run.data.tags.get(SERVED_TAG, "model.onnx")
    if served not in PRECISIONS:
        raise ValueError(f"Invalid {SERVED_TAG}={served!r} on run {chosen.run_id}. Only {', '.join(PRECISIONS)} "
                         "are supported.")  # fmt: skip
    artifact = f"onnx/{served}"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=chosen.run_id, artifact_path=artifact, dst_path=tmp))
        shutil.copyfile(local, out / "model.onnx")
    return {
        "registered_model": registered_model,
        "version": str(chosen.version),
        "alias": alias,
        "model_version": f"{registered_model}-v{chosen.version}",
        "run_id": chosen.run_id,
        "experiment_id": run.info.experiment_id,
        "artifact": artifact,
        "precision": PRECISIONS[served],
        "sha256": hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest(),
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def model_env(record: dict[str, Any], url: str) -> str:
    """The kustomize configMapGenerator file the init container reads (server.fetch_model)."""
    return (
        f"# {record['registered_model']} version {record['version']}"
        f"{' (alias ' + record['alias'] + ')' if record['alias'] else ''}, run {record['run_id']}, "
        f"{record['precision']} ({record['artifact']})\n"
        f"MODEL_VERSION={record['model_version']}\nMODEL_URL={url}\nMODEL_SHA256={record['sha256']}\n"
    )


def main(argv: list[str] | None = None) -> None:
    registered, champion = registry_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registered-model", default=registered)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--alias", help=f"a registry alias (default: {champion})")
    choice.add_argument("--version", help="a pinned registered version number instead of the alias")
    choice.add_argument("--follow", metavar="VERSION",
                        help="move the champion alias to VERSION, what production now runs (and clear the candidate "
                        "alias if it is VERSION); downloads nothing")  # fmt: skip
    parser.add_argument("--check-decided-against", metavar="PRODUCTION",
                        help="with --version: exit 1 unless that version was made the candidate against PRODUCTION, "
                        "the version production runs now (none: nothing runs yet); downloads nothing")  # fmt: skip
    parser.add_argument("--sha256", metavar="HEX",
                        help="with --check-decided-against: the sha256 of the file CD ships (release.json's); "
                        "exit 1 unless the decision judged that file (a redeploy of what runs: unchecked)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("build/release"), help="gets model.onnx and release.json")
    parser.add_argument("--url-template", help="MODEL_URL for model.env, with {mlflow} {experiment_id} {run_id} "
                        "{version} {sha256} {artifact} filled in")  # fmt: skip
    parser.add_argument("--env-out", type=Path, help="write the kustomize model.env here (needs --url-template)")
    args = parser.parse_args(argv)
    if args.env_out and not args.url_template:
        parser.error("--env-out needs --url-template")
    if args.check_decided_against is not None:
        print(check_decided_against(args.registered_model, args.version or "", args.check_decided_against, args.sha256))
        return
    if args.follow:
        mlflow_params = yaml.safe_load((ROOT / "params.yaml").read_text())["mlflow"]
        moved = follow(args.registered_model, args.follow, champion, mlflow_params.get("candidate_alias", "candidate"))
        print(json.dumps(moved))
        return
    alias = None if args.version else (args.alias or champion)
    try:
        record = release(args.registered_model, args.out, alias=alias, version=args.version)
    except ValueError as error:
        raise SystemExit(f"deploy.model_release: {error}") from None
    if args.url_template:
        record["url"] = args.url_template.format(mlflow=os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/"), **record)
        url = urllib.parse.urlparse(record["url"])
        parts = [url.path, *(v for values in urllib.parse.parse_qs(url.query).values() for v in values)]
        named = {Path(part).name for part in parts} & set(PRECISIONS)  # in the path or a query (?path=onnx/...)
        if named - {Path(record["artifact"]).name}:
            raise SystemExit(f"deploy.model_release: the served file is {record['artifact']} but --url-template "
                             f"names {', '.join(sorted(named))}: write {{artifact}} in its place")  # fmt: skip
    (args.out / "release.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.env_out:
        args.env_out.write_text(model_env(record, record["url"]))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
