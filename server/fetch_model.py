"""Fetch a pinned model file and refuse it unless its sha256 matches: the init container of a Kubernetes pod.

`python -m server.fetch_model --url URL --sha256 HEX --out /models/model.onnx` (or MODEL_URL, MODEL_SHA256,
MODEL_PATH from the environment). The file is streamed to a temporary name beside the target, hashed on the way,
and renamed into place only when the digest matches; otherwise nothing is left and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

from server.model_file import sha256_file

CHUNK = 1024 * 1024
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(Exception):
    """The model could not be fetched, or it is not the pinned file."""


def fetch(url: str, sha256: str, out: Path, max_bytes: int, timeout: float = 60) -> bool:
    """Download url to out when out is not already the pinned file; True when it downloaded."""
    if not SHA256.match(sha256):
        raise FetchError(f"Invalid sha256 {sha256!r}: expected 64 lower-case hex digits")
    if out.is_file() and sha256_file(out) == sha256:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as partial:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(f"{url} is larger than {max_bytes} bytes")
                    digest.update(chunk)
                    partial.write(chunk)
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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=os.environ.get("MODEL_URL"), help="where the pinned model file is")
    parser.add_argument("--sha256", default=os.environ.get("MODEL_SHA256"), help="its expected sha256")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("MODEL_PATH", "models/model.onnx")))
    parser.add_argument("--max-bytes", type=int, default=512 * 1024 * 1024)
    args = parser.parse_args(argv)
    if not args.url or not args.sha256:
        parser.error("give --url and --sha256 (or MODEL_URL and MODEL_SHA256)")
    if args.out.is_dir():  # MODEL_PATH names the models folder (the serve image's default): the file goes in it
        args.out = args.out / "model.onnx"
    try:
        downloaded = fetch(args.url, args.sha256.lower(), args.out, args.max_bytes)
    except (FetchError, OSError) as error:
        sys.exit(f"fetch_model: {error}")
    print(f"fetch_model: {args.out} sha256 {args.sha256} ({'downloaded' if downloaded else 'already present'})")


if __name__ == "__main__":
    main()
