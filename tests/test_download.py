"""The raw-data fetcher: a local copy, and the download path exercised offline through a file:// URL."""

from __future__ import annotations

import zipfile

import pytest

from tests.conftest import photos
from training.download import copy_local, fetch_public
from training.utils import sha256_file


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "PetImages.zip"
    with zipfile.ZipFile(path, "w") as bundle:
        for label in ("cat", "dog"):
            for photo in photos(label, 2):
                bundle.write(photo, f"PetImages/{label.capitalize()}/{photo.name}")
    return path


def test_download_checks_the_checksum_and_unpacks(archive, tmp_path):
    dest = tmp_path / "raw"
    assert fetch_public(archive.as_uri(), sha256_file(archive), dest) == 4
    assert sorted(p.name for p in (dest / "PetImages").iterdir()) == ["Cat", "Dog"]


def test_download_with_a_wrong_checksum_is_refused(archive, tmp_path):
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch_public(archive.as_uri(), "0" * 64, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_local_copy_replaces_the_raw_folder(tmp_path):
    source = photos("cat", 1)[0].parent
    dest = tmp_path / "raw"
    (dest / "stale").mkdir(parents=True)
    assert copy_local(source, dest) == sum(1 for p in source.iterdir() if p.is_file())
    assert not (dest / "stale").exists()
    with pytest.raises(FileNotFoundError):
        copy_local(tmp_path / "missing", dest)
