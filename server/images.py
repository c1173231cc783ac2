"""Photos kept on disk: one folder, each photo named by its sha256 (the same photo is kept once), written atomically,
never more than `max_bytes` in all. Used for the prediction log's samples (PREDICTION_LOG_SAMPLE_EVERY) and for the
photos feedback may label (FEEDBACK_IMAGES): there, a photo that got no feedback is deleted `retention_s` after it
was last sent. Past the size cap, the least recently sent photos go first, labelled or not (a labelled photo is
harvested long before it is the oldest, and no photo can hold the folder against new ones)."""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

Labelled = Callable[[str], bool]  # whether the photo of this name got a feedback


def never(name: str) -> bool:
    return False


class ImageFolder:
    """Content-addressed photos in one folder, least recently sent first in `sizes`. Other processes may write the
    same folder (blue and green, WORKERS > 1): each keeps its own account, made true again from the disk at every
    `expire`, so the folder can exceed the cap by at most what the others wrote since."""

    def __init__(self, folder: Path, max_bytes: int, retention_s: float | None = None,
                 labelled: Labelled = never) -> None:  # fmt: skip
        self.folder, self.max_bytes, self.retention_s, self.labelled = folder, max_bytes, retention_s, labelled
        folder.mkdir(parents=True, exist_ok=True)
        for partial in folder.glob(".*.partial"):  # a write a crash cut short
            partial.unlink(missing_ok=True)
        self.sizes: OrderedDict[str, int] = OrderedDict()
        self.bytes = 0
        self.resync()

    def resync(self) -> None:
        """The account from the disk: every kept photo, least recently sent first; then within the cap."""
        kept = []
        for path in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another process
                if path.is_file() and not path.name.startswith("."):
                    kept.append((path.stat().st_mtime, path.name, path.stat().st_size))
        self.sizes = OrderedDict((name, size) for _, name, size in sorted(kept))
        self.bytes = sum(self.sizes.values())
        self.trim(0)

    @staticmethod
    def name_for(data: bytes, content_type: str) -> str:
        return hashlib.sha256(data).hexdigest() + (mimetypes.guess_extension(content_type) or ".bin")

    def save(self, data: bytes, content_type: str) -> str | None:
        """The photo's name once it is kept (written unless it is there already); None for a photo larger than the
        whole cap."""
        name = self.name_for(data, content_type)
        path = self.folder / name
        if name in self.sizes and path.is_file():
            self.sizes.move_to_end(name)
            path.touch()  # sent again: its retention starts again
            return name
        if name in self.sizes:  # deleted by someone else: written again
            self.bytes -= self.sizes.pop(name)
        if len(data) > self.max_bytes:
            return None
        self.trim(len(data))  # room first: the folder never holds more than max_bytes
        partial = path.with_name(f".{name}.partial")
        partial.write_bytes(data)
        partial.replace(path)
        self.sizes[name] = len(data)
        self.bytes += len(data)
        return name

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)
        self.bytes -= self.sizes.pop(name)

    def trim(self, incoming: int) -> None:
        """Delete the least recently sent photos until `incoming` more bytes fit."""
        while self.sizes and self.bytes + incoming > self.max_bytes:
            self.delete(next(iter(self.sizes)))

    def expire(self, now: float | None = None) -> int:
        """Delete the photos without feedback that were last sent longer ago than the retention time; how many.
        The account is made true from the disk first."""
        if self.retention_s is None:
            return 0
        self.resync()
        cutoff = (now or time.time()) - self.retention_s
        expired = 0
        for name in list(self.sizes):
            try:
                if (self.folder / name).stat().st_mtime >= cutoff:
                    break  # least recently sent first: the rest are younger
            except FileNotFoundError:
                self.bytes -= self.sizes.pop(name)
                continue
            if not self.labelled(name):
                self.delete(name)
                expired += 1
        return expired
