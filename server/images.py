"""Photos kept on disk: one folder, each photo named by its sha256 (the same photo is kept once), written atomically,
never more than `max_bytes` in all. Used for the prediction log's samples (PREDICTION_LOG_SAMPLE_EVERY) and for the
photos feedback may label (FEEDBACK_IMAGES): there, a photo is deleted `retention_s` after it was last sent, and
past the size cap the least recently sent photos go first.

A photo that gets a label is linked into a labelled area (a hard link: no second copy) the moment the label is
recorded, and stays there until `make harvest` takes it or leaves it out for good: neither the cap nor the retention
touches those areas. A key's label goes to `LABELLED` (bound: FEEDBACK_LABELLED_MAX_BYTES), a label without a key to
`ANONYMOUS_LABELLED` (FEEDBACK_ANONYMOUS_LABELLED_MAX_BYTES), so a client without a key can fill only its own area.
Past an area's bound POST /feedback refuses the label (503 label_store_full, counted in
`catsdogs_labels_refused_total`): an acknowledged label is never left without its photo. A photo gone before its label
came (past the cap or the retention) is no bound: the label is recorded, its photo not kept, which the
`catsdogs_labelled_photos_refused_total` counter and its alert say."""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import stat
import time
from collections import OrderedDict
from pathlib import Path

LABELLED = "labelled"  # the subfolder of photos a key labelled, waiting for `make harvest`
ANONYMOUS_LABELLED = "labelled-anonymous"  # photos labelled without a key, waiting for a person's review


class ImageFolder:
    """Content-addressed photos in one folder, least recently sent first in `sizes`. Other processes may write the
    same folder (blue and green, WORKERS > 1): each keeps its own account, made true again from the disk at every
    `expire`, so the folder can exceed the cap by at most what the others wrote since."""

    def __init__(self, folder: Path, max_bytes: int, retention_s: float | None = None,
                 labelled_max_bytes: int = 0, anonymous_labelled_max_bytes: int = 0) -> None:  # fmt: skip
        self.folder, self.max_bytes, self.retention_s = folder, max_bytes, retention_s
        self.bounds = {LABELLED: labelled_max_bytes, ANONYMOUS_LABELLED: anonymous_labelled_max_bytes}
        folder.mkdir(parents=True, exist_ok=True)
        for partial in folder.glob("**/.*.partial"):  # a crash cut it short
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

    def labelled_bytes(self, area: str = LABELLED) -> int:
        """What a labelled area holds (read from the disk: other processes add to it, harvest empties it)."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for path in (self.folder / area).iterdir():
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size if not path.name.startswith(".") else 0
        return total

    def present(self, name: str) -> bool:
        """Whether this photo is still on disk: in the folder or in a labelled area (False once gone: past the cap or
        the retention, and harvested or never labelled)."""
        return any((self.folder / where / name).is_file() for where in ("", *self.bounds))

    def keep_labelled(self, name: str, area_name: str = LABELLED) -> bool:
        """Keep this labelled photo until it is harvested: linked into the labelled area, within its bound. False
        when the photo is gone already (past the cap or the retention before its label came) or would pass the
        bound."""
        area = self.folder / area_name
        target = area / name
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            pass
        else:
            # linked already (a repeat, or an orphan of a label that never committed): its ctime made now, as a new
            # link's, so harvest takes it for an orphan only an hour after the label that wants it checked its room
            with contextlib.suppress(OSError):
                target.chmod(stat.S_IMODE(mode))
            return True
        sources = [self.folder / name, *(self.folder / other / name for other in self.bounds if other != area_name)]
        source = next((path for path in sources if path.is_file()), sources[0])  # gone from the folder: another area
        try:
            size = source.stat().st_size
        except FileNotFoundError:
            return False
        if self.labelled_bytes(area_name) + size > self.bounds[area_name]:
            return False
        area.mkdir(exist_ok=True)
        partial = area / f".{name}.partial"
        partial.unlink(missing_ok=True)
        try:
            partial.hardlink_to(source)
        except FileNotFoundError:
            return False
        except OSError:  # a file system without hard links: a copy
            partial.write_bytes(source.read_bytes())
        partial.replace(target)
        return True

    def expire(self, now: float | None = None) -> int:
        """Delete the photos last sent longer ago than the retention time (a labelled one lives on in the labelled
        area); how many. The account is made true from the disk first."""
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
            self.delete(name)
            expired += 1
        return expired
