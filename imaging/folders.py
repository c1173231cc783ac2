"""Image files in folders: which files are images, and which class a folder or file name stands for."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from imaging.decode import IMAGE_SUFFIXES


def is_image_file(path: Path) -> bool:
    """An image by its name: one of IMAGE_SUFFIXES, in any case."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(root: Path) -> list[Path]:
    """Every image file under root, recursively, hidden files and folders left out, sorted."""
    hidden = lambda path: any(part.startswith(".") for part in path.relative_to(root).parts)  # noqa: E731
    return sorted(path for path in root.rglob("*") if path.is_file() and is_image_file(path) and not hidden(path))


def label_for_name(name: str, labels: Iterable[str]) -> str | None:
    """The label a folder or file name stands for, ignoring case and an English plural: `cat`, `Cats` and `CAT` are
    `cat`, `foxes` is `fox`; None when it names none of the labels."""
    by_name = {label.lower(): label for label in labels}
    name = name.lower()
    for candidate in (name, name.removesuffix("s"), name.removesuffix("es")):
        if candidate in by_name:
            return by_name[candidate]
    return None
