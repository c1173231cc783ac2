"""Shared fixtures: real photos and weights from ../shared, copied into small temporary raw folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASET = SHARED / "datasets" / "cats-vs-dogs-2k"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pt"
PROBLEM_FILES = {
    "cats/Thumbs.db": "not an image",
    "cats/cat.90001.jpg": "empty",
    "cats/cat.90003.jpg": "not an image",  # an HTML error page
    "dogs/dog.90002.jpg": "truncated",
}
GRAYSCALE, CMYK, LARGE = "cats/cat.90004.jpg", "cats/cat.90005.jpg", "cats/cat.90008.jpg"
RGBA_PNG, EXIF_ROTATED = "dogs/dog.90006.jpg", "dogs/dog.90007.jpg"
AWKWARD = [GRAYSCALE, CMYK, LARGE, RGBA_PNG, EXIF_ROTATED]


def photos(label: str, count: int, start: int = 1) -> list[Path]:
    """The first `count` ordinary photos of a class (cat.1.jpg, cat.2.jpg, ...)."""
    return [DATASET / f"{label}s" / f"{label}.{i}.jpg" for i in range(start, start + count)]


def labelled_folder(folder: Path, count: int, start: int = 1) -> Path:
    """`folder`/cat and `folder`/dog, each with `count` photos of its class from `start` on (an evaluation set)."""
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for photo in photos(label, count, start):
            shutil.copyfile(photo, folder / label / photo.name)
    return folder


@pytest.fixture(scope="session")
def dataset() -> Path:
    assert DATASET.is_dir(), f"the shared dataset is missing at {DATASET}"
    return DATASET


@pytest.fixture(scope="session")
def weights() -> Path:
    assert WEIGHTS.is_file(), f"the shared weights are missing at {WEIGHTS}"
    return WEIGHTS


@pytest.fixture
def make_raw(tmp_path: Path) -> Callable[..., Path]:
    """Build a raw folder in one of the three public layouts from real photos."""

    def build(per_class: int = 5, layout: str = "folders", extra: list[str] = (), name: str = "raw") -> Path:
        root = tmp_path / name
        sources = [*photos("cat", per_class), *photos("dog", per_class), *(DATASET / e for e in extra)]
        for source in sources:
            label = source.parent.name[:-1]  # cats -> cat
            target = {
                "folders": root / f"{label}s" / source.name,
                "petimages": root / "PetImages" / label.capitalize() / source.name.split(".", 1)[1],
                "kaggle": root / "train" / (source.name if source.name.startswith(label) else f"{label}.{source.name}"),
            }[layout]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return root

    return build


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported model: CATSDOGS_TEST_MODEL when set (the torch-free serve venv), else exported here."""
    given = os.environ.get("CATSDOGS_TEST_MODEL")
    if given:
        return Path(given)
    from tests.seeded_model import export_seeded_model

    return export_seeded_model(tmp_path_factory.mktemp("seeded"), WEIGHTS)


@pytest.fixture(scope="session")
def int8_model(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real int8 copy of onnx_model, quantized and pinned to it by sha256 as `make export` does (calibrated on 16
    real photos instead of 256 training images)."""
    import numpy as np

    from export.convert import write_metadata
    from export.evaluate import read_metadata
    from export.quantize import quantize_int8, quantized_metadata
    from server.model import Model

    model = Model(onnx_model, threads=2, max_pixels=50_000_000)
    calibration = np.stack([model.preprocess(p.read_bytes()) for p in [*photos("cat", 8), *photos("dog", 8)]])
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    quantize_int8(onnx_model, path, model.input_name, calibration)
    write_metadata(path, quantized_metadata(read_metadata(onnx_model), onnx_model))
    return path


def running_service(model: Path, **env: str) -> Iterator:
    """`python -m server` on a free port with `model` and extra environment, ready until the generator ends."""
    from tests.service import Service

    running = Service(model, **env)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def service(onnx_model: Path) -> Iterator:
    """`python -m server` on a free port with the real model, ready, shared by one test module."""
    yield from running_service(onnx_model)


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server for the session (tests/postgres.py); the URL of its `postgres` database."""
    import tempfile

    from tests.postgres import postgres_server

    directory = Path(tempfile.mkdtemp(prefix="catsdogs-postgres-"))  # not under pytest's root-only tmp: the server
    with postgres_server(directory) as url:  # may run as the postgres user
        yield url
    shutil.rmtree(directory, ignore_errors=True)
