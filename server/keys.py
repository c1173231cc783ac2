"""API keys: the file the service reads them from (API_KEYS_FILE), how one is made, and how one is checked.

The file holds one JSON object per line: {"name", "sha256", "scopes", "created"}. Only the key's SHA-256 is kept: a
key is 256 random bits, so a fast hash is enough (a slow password hash protects guessable secrets; nothing about a
random key is guessable), and the file leaks no key if read. `--revoke` keeps a key's line, so its name is never
given to another key: labels are recorded under a key's name, and a new key of a revoked name would inherit the
revoked key's waiting labels (`make harvest` takes a key's labels only while the key is valid, `labellers`). The
revoked line says when ("revoked", a UTC time) and its hash moves from "sha256" to "revoked_sha256": a release that
predates revocation ignores "revoked" but skips a line without "sha256", so the other blue/green colour, or a
rollback, refuses the key as well. The service looks at the file's size, inode and modification time at most once a
second (`RELOAD_S`) and rereads it when they changed. A line that cannot be read is skipped and logged; a file that
cannot be read at all refuses every key until it can (fail closed).

Scopes (SCOPES): `label` (a trusted labeller: its labels may become training data without review) and `predict`
(needed for the predicting routes when PREDICT_REQUIRES_KEY=true). `make api-key NAME=... SCOPES=...` runs `main`;
`python -m server.keys --name NAME --revoke` revokes.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
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
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


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


@dataclass(frozen=True)
class Entry:
    """One line of the file: a key's hash (None once revoked), who holds it, when it was made and, once revoked,
    when."""

    sha256: str | None
    identity: Identity
    created: float | None = None  # seconds since the epoch (None: a line written without it)
    revoked: str | None = None

    @property
    def valid(self) -> bool:
        return self.revoked is None


def parse_line(line: str) -> Entry:
    """The entry of one line of the file, or ValueError saying what is wrong."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    name, sha, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not NAME.match(name) or name == ANONYMOUS:
        raise ValueError(f"bad name {name!r}")
    revoked, created = entry.get("revoked"), entry.get("created")
    if revoked is not None and not isinstance(revoked, str):
        raise ValueError(f"key {name!r}: revoked must be a time ({TIME_FORMAT}) or absent")
    if (revoked is None or sha is not None) and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ValueError(f"key {name!r}: sha256 must be 64 hex digits")  # a revoked line needs none
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise ValueError(f"key {name!r}: scopes must be a non-empty list of {sorted(SCOPES)}")
    try:
        made = float(calendar.timegm(time.strptime(created, TIME_FORMAT)))
    except (TypeError, ValueError):  # a line written by hand: the key works, with no creation time to check
        made = None
    return Entry(sha, Identity(name, frozenset(scopes)), made, revoked)


def read_entries(text: str) -> tuple[list[Entry], list[tuple[int, str, str | None]]]:
    """The entries of the file's text, and (line number, what is wrong, its name if one can be read) for each line
    that cannot be used. Blank lines and lines starting with # are comments."""
    entries: list[Entry] = []
    skipped: list[tuple[int, str, str | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(parse_line(line))
        except ValueError as error:  # json's errors are ValueErrors too
            named = None
            with contextlib.suppress(ValueError, AttributeError):
                named = json.loads(line).get("name")
            skipped.append((number, str(error)[:200], named if isinstance(named, str) else None))
    return entries, skipped


def labellers(path: Path) -> dict[str, float]:
    """name -> creation time (0 when not recorded) of every key whose labels may train a model now: a valid key of
    the `label` scope whose name no revoked line, and no line that cannot be read, also carries. OSError or
    UnicodeDecodeError when the file cannot be read: trusting nobody is the caller's decision, never this one's."""
    entries, skipped = read_entries(path.read_text(encoding="utf-8"))
    barred = {entry.identity.name for entry in entries if not entry.valid} | {name for *_, name in skipped if name}
    return {entry.identity.name: entry.created or 0.0 for entry in entries
            if entry.valid and "label" in entry.identity.scopes and entry.identity.name not in barred}  # fmt: skip


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
            parsed, skipped = read_entries(text)
            for number, error, _ in skipped:  # never log the line (a key?)
                where = {"path": str(self.path), "line": number, "error": error}
                get_logger().warning("API_KEYS_FILE: a line is skipped", extra=where)
            entries = [
                (bytes.fromhex(entry.sha256), entry.identity) for entry in parsed if entry.valid and entry.sha256
            ]
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


@contextlib.contextmanager
def locked(path: Path) -> Iterator[int]:
    """The keys file (created 0600 if absent), open for appending and locked against another add or revoke. A
    revocation replaces the file: a caller that waited on the replaced one opens the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            if os.fstat(descriptor).st_ino == path.stat().st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def add_key(path: Path, name: str, scopes: list[str]) -> str:
    """A new key for `name` with `scopes`, its hash appended to `path` (created 0600 if absent); the key itself. A
    name any line of the file carries, a revoked key's included, is never given again."""
    if not NAME.match(name) or name == ANONYMOUS:
        raise ValueError(f"NAME must match {NAME.pattern} and not be {ANONYMOUS!r}: {name!r}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"SCOPES must be one or more of {sorted(SCOPES)} (comma-separated), not {unknown or scopes}")
    with locked(path) as descriptor:
        entries, skipped = read_entries(path.read_text(encoding="utf-8"))
        if any(entry.identity.name == name and not entry.valid for entry in entries):
            raise ValueError(f"{path}: the key named {name!r} was revoked, and a revoked name is never given again "
                             "(its labels stay untrusted): choose another NAME")  # fmt: skip
        if name in {entry.identity.name for entry in entries} | {named for *_, named in skipped}:
            raise ValueError(f"{path} already has a key named {name!r}: revoke it (--revoke) and choose another NAME")
        key = new_key()
        entry = {"name": name, "sha256": digest(key), "scopes": sorted(set(scopes)),
                 "created": time.strftime(TIME_FORMAT, time.gmtime())}  # fmt: skip
        os.write(descriptor, (json.dumps(entry) + "\n").encode("utf-8"))
    return key


def revoke_key(path: Path, name: str) -> int:
    """Mark every valid key named `name` revoked, keeping its line (the name stays taken) without its sha256 (moved to
    revoked_sha256, which no release reads as a key); how many. A line of the name revoked earlier that still
    carries its sha256 (written before revoked lines dropped it) loses it too. The file is replaced whole (written
    aside, then renamed): the service never reads half of it."""
    with locked(path):
        lines = path.read_text(encoding="utf-8").splitlines()
        entries, _ = read_entries("\n".join(lines))
        if not any(entry.identity.name == name for entry in entries):
            raise ValueError(f"{path} has no key named {name!r}")
        revoked, now = 0, time.strftime(TIME_FORMAT, time.gmtime())
        for number, line in enumerate(lines):
            try:
                entry = parse_line(line)
            except ValueError:
                continue
            record = json.loads(line)
            if entry.identity.name != name or not (entry.valid or "sha256" in record):
                continue
            sha = record.pop("sha256")
            lines[number] = json.dumps({**record, "revoked": record.get("revoked") or now, "revoked_sha256": sha})
            revoked += entry.valid
        partial = path.with_name(f".{path.name}.partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("".join(f"{line}\n" for line in lines))
        partial.replace(path)
    return revoked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--file", type=Path, default=os.environ.get("API_KEYS_FILE") or None,
                        help="API_KEYS_FILE: the keys file the service reads")  # fmt: skip
    parser.add_argument("--name", required=True, help="who holds the key (recorded as the source of its labels)")
    parser.add_argument("--scopes", default="label", help=f"comma-separated, of {sorted(SCOPES)} (default: label)")
    parser.add_argument("--revoke", action="store_true", help="revoke the key of this name (the name stays taken)")
    args = parser.parse_args(argv)
    if args.file is None:
        parser.error("give the keys file: --file or API_KEYS_FILE")
    try:
        if args.revoke:
            revoked = revoke_key(args.file, args.name)
            print(f"revoked {revoked} key(s) named {args.name!r} in {args.file} (0: revoked already); the service "
                  "refuses it within a second, make harvest no longer takes its labels, and the name is never given "
                  "again")  # fmt: skip
            return
        key = add_key(args.file, args.name, [s.strip() for s in args.scopes.split(",") if s.strip()])
    except ValueError as error:
        parser.error(str(error))
    print(f"added key {args.name!r} ({args.scopes}) to {args.file}; only its hash is kept: copy the key now,")
    print("it is not shown again. Clients send it as 'Authorization: Bearer <key>'. The key:")
    print(key)


if __name__ == "__main__":
    main()
