"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, `initdb` and `pg_ctl` in a temporary
directory, on a free port, trusting local connections. As root (CI here), the server runs as the `postgres` user
the package creates, since PostgreSQL refuses to run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from deploy.client import free_port


def binaries() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise FileNotFoundError("no PostgreSQL server here: apt-get install postgresql (.ci/run does)")
    return found[-1].parent


def as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def restart(directory: Path) -> None:
    """Stop and start the server in `directory` with the options it had (what a database failover looks like)."""
    pg_ctl = [*as_postgres(), str(binaries() / "pg_ctl"), "-D", str(directory / "data"), "-l", str(directory / "log")]
    subprocess.run([*pg_ctl, "-m", "fast", "-w", "restart"], check=True, capture_output=True, timeout=60)


@contextmanager
def postgres_server(directory: Path) -> Iterator[str]:
    """Start a server with its data in `directory`; yields the URL of its `postgres` database."""
    bin_dir, port = binaries(), free_port()
    data = directory / "data"
    as_user = as_postgres()
    if as_user:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "postgres")
    run = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "catsdogs", "-E", "UTF8"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run, "-o", options, "-l", str(directory / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://catsdogs@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run, "-m", "fast", "-w", "stop"], capture_output=True)


def fresh_database(server_url: str) -> str:
    """A new, empty database on the server; its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
