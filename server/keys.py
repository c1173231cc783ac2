"""API keys: the file the service reads them from (API_KEYS_FILE), how one is made, and how one is checked.

The file holds one JSON object per line: {"name", "sha256", "scopes", "created"}. Only the key's SHA-256 is kept:
a key is 256 random bits, so a fast hash is enough (a slow password hash protects guessable secrets; nothing about
a random key is guessable), and the file leaks no key if read. Deleting a key's line revokes it: the service looks
at the file's size, inode and modification time at most once a second (`RELOAD_S`) and rereads it when they
changed. A line that cannot be read is skipped and logged; a file that cannot be read at all refuses every key
until it can (fail closed).

Scopes (SCOPES): `label` (a trusted labeller: its labels may become training data without review) and `predict`
(needed for the predicting routes when PREDICT_REQUIRES_KEY=true). `make api-key NAME=... SCOPES=...` runs `main`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.logs import get_logger
from server.store import ANONYMOUS  # the source of every label given without a key; no key may take this name

SCOPES = {
    "label": "give labels that may become training data without a person's review",
    "predict": "call the predicting routes when PREDICT_REQUIRES_KEY=true",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RELOAD_S = 1.0


@dataclass(frozen=True)
class Identity:
    """Who made a request: a key's name and scopes, or ANONYMOUS with none."""

    name: str
    scopes: frozenset[str]

    @property
    def anonymous(self) -> bool:
        return self.name == ANONYMOUS


NOBODY = Identity(ANONYMOUS, frozenset())


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    return "cdk_" + secrets.token_urlsafe(32)


def parse_line(line: str) -> tuple[str, Identity]:
    """(sha256, identity) from one line of the file, or ValueError saying what is wrong."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    name, sha, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not NAME.match(name) or name == ANONYMOUS:
        raise ValueError(f"bad name {name!r}")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"key {name!r}: sha256 must be 64 hex digits")
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise ValueError(f"key {name!r}: scopes must be a non-empty list of {sorted(SCOPES)}")
    return sha, Identity(name, frozenset(scopes))


class KeyRing:
    """The keys of API_KEYS_FILE, reread within RELOAD_S of a change. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[tuple[bytes, Identity]] = []
        self.stamp: tuple[int, int, int] | None = None
        self.checked = -RELOAD_S
        self.lock = threading.Lock()
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.checked < RELOAD_S:
            return
        with self.lock:
            self.checked = now
            try:
                status = self.path.stat()
                stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
                if stamp == self.stamp:
                    return
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                if self.stamp is not None or force:
                    get_logger().warning("API_KEYS_FILE cannot be read: every key is refused",
                                         extra={"path": str(self.path), "error": type(error).__name__})  # fmt: skip
                self.entries, self.stamp = [], None
                return
            entries: list[tuple[bytes, Identity]] = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    sha, identity = parse_line(line)
                except ValueError as error:  # json's errors are ValueErrors too; never log the line (a key?)
                    where = {"path": str(self.path), "line": number, "error": str(error)[:200]}
                    get_logger().warning("API_KEYS_FILE: a line is skipped", extra=where)
                    continue
                entries.append((bytes.fromhex(sha), identity))
            self.entries, self.stamp = entries, stamp
            get_logger().info("API keys read", extra={"path": str(self.path), "keys": len(entries)})

    def identify(self, key: str) -> Identity | None:
        """The identity of `key`, or None. The same work whatever the key: its hash is compared with every entry's
        in constant time, and the loop never stops early."""
        self.refresh()
        presented = bytes.fromhex(digest(key))
        found: Identity | None = None
        for stored, identity in self.entries:
            if hmac.compare_digest(stored, presented) and found is None:
                found = identity
        return found


def add_key(path: Path, name: str, scopes: list[str]) -> str:
    """A new key for `name` with `scopes`, its hash appended to `path` (created 0600 if absent); the key itself."""
    if not NAME.match(name) or name == ANONYMOUS:
        raise ValueError(f"NAME must match {NAME.pattern} and not be {ANONYMOUS!r}: {name!r}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"SCOPES must be one or more of {sorted(SCOPES)} (comma-separated), not {unknown or scopes}")
    taken = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                taken.add(parse_line(line)[1].name)
            except ValueError:
                continue
    if name in taken:
        raise ValueError(f"{path} already has a key named {name!r}: delete its line first to replace it")
    key = new_key()
    entry = {"name": name, "sha256": digest(key), "scopes": sorted(set(scopes)),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")
    return key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--file", type=Path, default=os.environ.get("API_KEYS_FILE") or None,
                        help="API_KEYS_FILE: the keys file the service reads")  # fmt: skip
    parser.add_argument("--name", required=True, help="who holds the key (recorded as the source of its labels)")
    parser.add_argument("--scopes", default="label", help=f"comma-separated, of {sorted(SCOPES)} (default: label)")
    args = parser.parse_args(argv)
    if args.file is None:
        parser.error("give the keys file: --file or API_KEYS_FILE")
    try:
        key = add_key(args.file, args.name, [s.strip() for s in args.scopes.split(",") if s.strip()])
    except ValueError as error:
        parser.error(str(error))
    print(f"added key {args.name!r} ({args.scopes}) to {args.file}; only its hash is kept: copy the key now,")
    print("it is not shown again. Clients send it as 'Authorization: Bearer <key>'. The key:")
    print(key)


if __name__ == "__main__":
    main()
