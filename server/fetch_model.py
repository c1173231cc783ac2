"""Fetch a pinned model file and refuse it unless its sha256 matches: `make fetch-model` and the init container of a
Kubernetes pod.

`python -m server.fetch_model --url URL --sha256 HEX --out /models/model.onnx` (or MODEL_URL, MODEL_SHA256,
MODEL_PATH from the environment). URL is an https:// address (or, for tests and air-gapped hosts, a local file
path); any other scheme is refused. The whole download has one deadline (--deadline, 300 s), so a server that
drips bytes cannot hold the pod in Init for ever, and it may not grow past --max-bytes nor past the free space of
the target's volume. The file is streamed to a temporary name beside the target, hashed on the way, and renamed
into place only when the digest matches; otherwise nothing is left, and one line says why (exit status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from server.model_file import sha256_file

CHUNK = 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")
HEADROOM = 1024 * 1024  # left free on the volume


class FetchError(Exception):
    """The model could not be fetched, or it is not the pinned file."""


def chunks(url: str, deadline: float, read_timeout: float, limit: int) -> Iterator[bytes]:
    """The bytes at an https:// URL or a local path, as they arrive; FetchError past the deadline, or when the
    server declares more than `limit` bytes."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "":
        with open(url, "rb") as local:
            yield from iter(lambda: local.read(CHUNK), b"")
        return
    if scheme != "https":
        raise FetchError(f"only https:// URLs (or a local file path) are fetched, not {scheme}://")
    with urllib.request.urlopen(url, timeout=min(read_timeout, deadline - time.monotonic())) as response:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise FetchError(f"{url} is {declared} bytes, more than {limit} (--max-bytes, or the volume's free space)")
        while chunk := response.read1(CHUNK):  # read1: what has arrived, so the deadline is checked as it drips
            if time.monotonic() > deadline:
                raise FetchError(f"{url} did not arrive within the deadline")
            yield chunk


def room(out: Path, max_bytes: int) -> int:
    """The most bytes the download may take: --max-bytes, and what the target's volume has free."""
    return min(max_bytes, shutil.disk_usage(out.parent).free - HEADROOM)


def fetch(url: str, sha256: str, out: Path, max_bytes: int, deadline_s: float = 300, read_timeout: float = 60) -> bool:
    """Download url to out when out is not already the pinned file; True when it downloaded."""
    if not SHA256.match(sha256):
        raise FetchError(f"Invalid sha256 {sha256!r}: expected 64 lower-case hex digits")
    if out.is_file() and sha256_file(out) == sha256:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    limit = room(out, max_bytes)
    deadline = time.monotonic() + deadline_s
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as partial:
        try:
            for chunk in chunks(url, deadline, read_timeout, limit):
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"{url} is larger than {limit} bytes (--max-bytes, or the volume's free space)")
                digest.update(chunk)
                partial.write(chunk)
            if time.monotonic() > deadline:
                raise FetchError(f"{url} did not arrive within {deadline_s:g} s")
            if digest.hexdigest() != sha256:
                raise FetchError(f"{url} has sha256 {digest.hexdigest()}, not the pinned {sha256}")
            partial.close()
            Path(partial.name).chmod(0o444)
            Path(partial.name).replace(out)
        except BaseException:
            partial.close()
            Path(partial.name).unlink(missing_ok=True)
            raise
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MODEL_URL"), help="https:// address (or a local path)")
    parser.add_argument("--sha256", default=os.environ.get("MODEL_SHA256"), help="its expected sha256")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("MODEL_PATH", "models/model.onnx")))
    parser.add_argument("--max-bytes", type=int, default=512 * 1024 * 1024)
    parser.add_argument("--deadline", type=float, default=300, help="seconds for the whole download")
    args = parser.parse_args(argv)
    if not args.url or not args.sha256:
        parser.error("give --url and --sha256 (or MODEL_URL and MODEL_SHA256)")
    if args.out.is_dir():  # MODEL_PATH names the models folder (the serve image's default): the file goes in it
        args.out = args.out / "model.onnx"
    try:
        downloaded = fetch(args.url, args.sha256.lower(), args.out, args.max_bytes, args.deadline)
    except (FetchError, OSError) as error:
        sys.exit(f"fetch_model: {error}")
    print(f"fetch_model: {args.out} sha256 {args.sha256} ({'downloaded' if downloaded else 'already present'})")


if __name__ == "__main__":
    main()
