"""Photos kept on disk: one folder, each photo named by its sha256 (the same photo is kept once), written atomically,
never more than `max_bytes` in all. Used for the prediction log's samples (PREDICTION_LOG_SAMPLE_EVERY) and for the
photos feedback may label (FEEDBACK_IMAGES): there, a photo that got no feedback is deleted after `retention_s`, and
past the size cap the oldest photos without feedback go first."""

from __future__ import annotations

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
    """Content-addressed photos in one folder, oldest first in `sizes`."""

    def __init__(self, folder: Path, max_bytes: int, retention_s: float | None = None,
                 labelled: Labelled = never) -> None:  # fmt: skip
        self.folder, self.max_bytes, self.retention_s, self.labelled = folder, max_bytes, retention_s, labelled
        folder.mkdir(parents=True, exist_ok=True)
        kept = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)  # fmt: skip
        self.sizes: OrderedDict[str, int] = OrderedDict((p.name, p.stat().st_size) for p in kept)
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
        if name in self.sizes:
            self.sizes.move_to_end(name)
            path.touch()  # its retention starts again
            return name
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
        """Delete until `incoming` more bytes fit: the oldest photos without feedback first, then the oldest."""
        if self.bytes + incoming <= self.max_bytes:
            return
        for name in list(self.sizes):
            if not self.labelled(name):
                self.delete(name)
                if self.bytes + incoming <= self.max_bytes:
                    return
        while self.sizes and self.bytes + incoming > self.max_bytes:
            self.delete(next(iter(self.sizes)))

    def expire(self, now: float | None = None) -> int:
        """Delete the photos without feedback kept longer than the retention time; how many."""
        if self.retention_s is None:
            return 0
        cutoff = (now or time.time()) - self.retention_s
        expired = []
        for name in list(self.sizes):
            path = self.folder / name
            if path.stat().st_mtime >= cutoff:
                continue
            if not self.labelled(name):
                expired.append(name)
        for name in expired:
            self.delete(name)
        return len(expired)
