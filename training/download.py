"""Fill the raw data folder: from a local folder, or by downloading the public archive with a checksum check."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from training.config import DEFAULT_PARAMS, load_params
from training.utils import sha256_file


def copy_local(source: Path, dest: Path) -> int:
    """Replace dest with a copy of the source folder; returns the number of files."""
    if not source.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {source}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    return sum(1 for p in dest.rglob("*") if p.is_file())


def download(url: str, sha256: str, target: Path) -> Path:
    """Download url to target with a progress bar; raise if its sha256 differs."""
    with urllib.request.urlopen(url) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {Path(url).name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    actual = sha256_file(target)
    if actual != sha256:
        target.unlink()
        raise ValueError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}")
    return target


def fetch_public(url: str, sha256: str, dest: Path) -> int:
    """Download and unpack the public archive into dest; returns the number of files."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = download(url, sha256, Path(tmp) / "raw.zip")
        if dest.exists():
            shutil.rmtree(dest)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(dest)
    return sum(1 for p in dest.rglob("*") if p.is_file())


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=None, help="local raw folder; omit to download")
    parser.add_argument("--dest", type=Path, default=None, help="raw folder to fill (default: params data.raw_dir)")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params).data
    dest = args.dest or Path(params.raw_dir)
    if args.source:
        count = copy_local(args.source, dest)
    else:
        count = fetch_public(params.source_url, params.source_sha256, dest)
    print(f"raw data: {count} files in {dest}")


if __name__ == "__main__":
    main()
