"""Task-agnostic helpers: seeding, hashing, git and device look-ups."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a repeatable run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: object) -> None:
    """Write data as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """dvc.lock and every output, metric and plot dvc.yaml declares: the tracked files the pipeline itself rewrites."""
    paths = ["dvc.lock"]
    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return paths
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            paths += [next(iter(entry)) if isinstance(entry, dict) else str(entry) for entry in stage.get(kind, [])]
    return paths


def git_commit() -> str:
    """The current commit, suffixed with -dirty when tracked files changed other than those the pipeline rewrites
    itself (a model trained by `make train export` on a clean checkout names its commit, not `-dirty`); 'unknown'
    outside git."""
    excluded = [f":(exclude){path}" for path in pipeline_outputs()]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
