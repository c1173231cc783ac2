"""A model is written and gated aside, and appears under the name it is served by only once its gate accepted it.

Whatever stops a stage between the write and the verdict (a refusal, an exception, Ctrl-C, the out-of-memory killer)
leaves nothing under the served name: `server.model_file` chooses among the served names only, so a file that was
never accepted is never served.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_folder(path: Path) -> Path:
    """The hidden folder beside `path` its candidate is written in: the same file system, so a rename is atomic."""
    return path.parent / f".{path.name}.staging"


@contextmanager
def aside(path: Path) -> Iterator[Path]:
    """A path with `path`'s name (the sidecar's `file` says so) in an empty staging folder, removed on the way out
    whatever happened; one left by a killed run is removed first."""
    folder = staging_folder(path)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder / path.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(candidate: Path, path: Path) -> None:
    """Move an accepted model and its sidecar under the served names. Each step is an atomic rename and a sidecar,
    when there is one, always describes the model beside it: the old sidecar goes first, the model's rename is the
    commit, its sidecar follows."""
    sidecar = path.with_suffix(".json")
    sidecar.unlink(missing_ok=True)
    candidate.replace(path)
    candidate.with_suffix(".json").replace(sidecar)


def remove(path: Path) -> None:
    """A model and its sidecar, model first (a sidecar alone is never served)."""
    for file in (path, path.with_suffix(".json")):
        file.unlink(missing_ok=True)
