"""dvc.yaml end to end on a small copy of the project: every stage runs, then only what a change touches."""

from __future__ import annotations

import ast
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


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (imports for type hints only)."""
    found, pending = [], [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            pending += node.orelse
            continue
        found.append(node)
        pending += ast.iter_child_nodes(node)
    return found


def local_imports(module: str) -> set[Path]:
    """The repository's Python files that running `python -m module` can import, followed transitively (imports
    inside functions too: they run as well)."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        candidates = [ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                pending += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
    return seen


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    """Otherwise a code change leaves `dvc status` saying up to date, and the committed lock lies about the code."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    module = spec["cmd"].split("python -m ")[1].split()[0]
    deps = [ROOT / (dep if isinstance(dep, str) else next(iter(dep))) for dep in spec["deps"]]
    missing = sorted(
        path.relative_to(ROOT).as_posix()
        for path in local_imports(module)
        if path.name != "__init__.py" and not any(path == dep or dep in path.parents for dep in deps)
    )
    assert not missing, f"{stage} runs code that is not among its deps: {missing}"


def test_the_committed_lock_records_the_committed_code_and_params():
    """`dvc status` may find the data and models missing or different (they live where training ran), but never a
    code or params change: then dvc.lock and reports/ would describe a run of other code."""
    result = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "DVC_NO_ANALYTICS": "1"}, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    stale = {}
    for stage, changes in json.loads(result.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):
                continue
            code = {path: state for path, state in change.get("changed deps", {}).items()
                    if not path.startswith(("data/", "models/"))}  # fmt: skip
            if code or change.get("changed params"):
                stale[stage] = {**code, **change.get("changed params", {})}
    assert not stale, f"dvc.lock is stale for the committed code or params (run make train export): {stale}"


def test_git_commit_is_dirty_for_code_changes_not_for_what_the_pipeline_rewrites(tmp_path, monkeypatch):
    from training.utils import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  s:\n    cmd: x\n    outs:\n      - out.csv:\n          cache: false\n    metrics:\n"
        "      - reports/m.json:\n          cache: false\n"
    )
    (tmp_path / "reports").mkdir()
    for name in ("dvc.lock", "out.csv", "reports/m.json", "code.py"):
        (tmp_path / name).write_text("before\n")
    git("init", "-q"), git("add", "."), git("commit", "-qm", "c")
    monkeypatch.chdir(tmp_path)
    clean = git_commit()
    for name in ("dvc.lock", "out.csv", "reports/m.json"):  # what make train export rewrites
        (tmp_path / name).write_text("after\n")
    assert git_commit() == clean and not clean.endswith("-dirty") and len(clean) == 40
    (tmp_path / "code.py").write_text("changed\n")
    assert git_commit() == f"{clean}-dirty"
