"""The serving side needs nothing but requirements-serve.txt: no torch, no training code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ALLOWED = {"onnxruntime", "numpy", "PIL", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client",
           "anyio", "psycopg", "server", "imaging"}  # fmt: skip
SERVER_TESTS = [
    "tests/test_app.py",
    "tests/test_preprocess.py",
    "tests/test_imaging.py",
    "tests/test_server_process.py",
    "tests/test_feedback.py",  # the store on SQLite and on a real PostgreSQL server, psycopg from requirements-serve
]
SERVER_TESTS += ["tests/test_classify.py"]  # make classify runs in the serve-only venv


def test_server_imports_only_the_serving_stack():
    for path in [*(ROOT / "server").glob("*.py"), *(ROOT / "imaging").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def dev_pins(*names: str) -> list[str]:
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    return [line for line in lines if line.split("==")[0] in names]


@pytest.mark.slow
def test_server_suite_passes_in_a_clean_venv_built_from_requirements_serve(tmp_path, onnx_model):
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-serve.txt"),
               *dev_pins("pytest", "httpx2")]  # fmt: skip
    subprocess.run(install, check=True)
    for banned in ("torch", "torchvision", "mlflow", "training", "export"):
        probe = subprocess.run([str(python), "-c", f"import {banned}"], cwd=tmp_path, capture_output=True)
        assert probe.returncode != 0, f"{banned} is importable in the serve venv"
    env = {**os.environ, "CATSDOGS_TEST_MODEL": str(onnx_model), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SERVER_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
