"""dvc.yaml end to end on a small copy of the project: every stage runs, then only what a change touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, WEIGHTS, photos

BIN = Path(sys.executable).parent


def dvc(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PRETRAINED": str(WEIGHTS),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=workspace, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_only_what_a_param_change_touches(tmp_path):
    workspace = tmp_path / "project"
    workspace.mkdir()
    for name in ("imaging", "training", "export", "server"):  # export scores the not-a-pet sets through server.model
        shutil.copytree(ROOT / name, workspace / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", workspace)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(batch_size=8, num_workers=0)
    params["train"]["baseline"].update(epochs=1)
    params["train"]["final"].update(epochs=1, unfreeze_blocks=1)
    params["export"].update(min_accuracy=0.5)
    params["pet"].update(not_pets_dir=str((ROOT / params["pet"]["not_pets_dir"]).resolve()), synthetic_per_kind=2)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    dvc(workspace, "init", "-q")
    for label in ("cat", "dog"):
        (workspace / "data" / "raw" / f"{label}s").mkdir(parents=True, exist_ok=True)
        for photo in photos(label, 25):
            shutil.copyfile(photo, workspace / "data" / "raw" / f"{label}s" / photo.name)
    dvc(workspace, "add", "-q", "data/raw")

    first = dvc(workspace, "repro").stdout
    for stage in ("prepare", "train_baseline", "train_final", "export", "evaluate", "quantize"):
        assert f"Running stage '{stage}'" in first, first
    assert (workspace / "models" / "model.onnx").is_file()
    served = json.loads((workspace / "reports" / "quantize.json").read_text())["served"]  # the gate decides
    assert (workspace / "models" / "model.int8.onnx").is_file() == (served == "int8")
    assert json.loads((workspace / "reports" / "evaluate.json").read_text())["count"] > 0
    assert "up to date" in dvc(workspace, "status").stdout

    params["train"]["final"]["lr"] = params["train"]["final"]["lr"] / 2
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    changed = json.loads(dvc(workspace, "status", "--json").stdout)
    assert "train_final" in changed and "prepare" not in changed and "train_baseline" not in changed
    second = dvc(workspace, "repro").stdout
    assert "Running stage 'train_final'" in second and "Running stage 'prepare'" not in second
    assert "Running stage 'train_baseline'" not in second
