"""Faults the tests control: a TCP proxy in front of a real server that can hang or be cut off, a SQLite file locked
by another process, a small file system that fills up, and what a client of the service sees meanwhile."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

CUT_AFTER_S = 0.5  # how long cut_after lets the server run the statement before the client's connection is reset


class FaultProxy:
    """Forwards TCP connections to `upstream`. `freeze()` stops moving bytes in both directions and accepting new
    connections: the connections stay open and this machine's kernel still acknowledges what is sent, which is what
    a hung server (a stopped process, a frozen VM behind a live host) looks like to its client; no TCP timeout fires.
    `cut()` resets every connection and every new one until `restore()`: a server that died. `cut_after(marker)`
    passes the next message holding `marker` on to the server, then swallows that connection's answers and resets it:
    a statement that ran (and committed), whose client only sees its connection break."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.moving = threading.Event()
        self.moving.set()
        self.down = False
        self.marker: bytes | None = None
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.moving.wait()  # frozen: the handshake is done by the kernel, nothing more happens
            if self.down:
                reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)  # connected: from here it waits as long as its peer does
            except OSError:
                reset(client)
                continue
            with self.lock:
                self.sockets += [client, server]
            swallowed = threading.Event()  # this connection's answers go nowhere from now on
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(source, target, client, swallowed), daemon=True).start()

    def pump(self, source: socket.socket, target: socket.socket, client: socket.socket,
             swallowed: threading.Event) -> None:  # fmt: skip
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.moving.wait()
                if self.down:
                    return
                if swallowed.is_set():
                    continue
                marker = self.marker
                if source is client and marker is not None and marker in data:
                    self.marker = None
                    swallowed.set()
                    target.sendall(data)
                    threading.Timer(CUT_AFTER_S, hang_up, (client,)).start()  # once the server has run it
                    continue
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def freeze(self) -> None:
        self.moving.clear()

    def thaw(self) -> None:
        self.moving.set()

    def cut(self) -> None:
        self.down = True
        with self.lock:
            for sock in self.sockets:
                reset(sock)
            self.sockets = []
        self.moving.set()

    def cut_after(self, marker: bytes) -> None:
        self.marker = marker

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a host whose server died answers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def hang_up(sock: socket.socket) -> None:
    """Reset a connection another thread is reading: shut down first, so that its read returns and the close is
    not held back by it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    reset(sock)


@contextlib.contextmanager
def sqlite_locked(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the SQLite file's exclusive lock (BEGIN EXCLUSIVE) until the block ends."""
    script = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.communicate("", timeout=10)  # stdin closed: it exits, the lock goes with it


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only: CI's machine and containers run the suite as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system `folder` is on; the filler file (delete it to end the fault)."""
    filler = folder / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


@dataclass
class Watch:
    """What a client sees on a few cheap routes, and the service's memory, sampled until stopped."""

    url: str
    pid: int
    routes: tuple[str, ...] = ("/health", "/v2/health/ready")
    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    rss: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                for route in self.routes:
                    started = time.perf_counter()
                    status = client.get(route).status_code
                    self.latencies.setdefault(route, []).append(time.perf_counter() - started)
                    self.statuses.setdefault(route, []).append(status)
                self.rss.append(rss_mb(self.pid))
                time.sleep(0.1)

    @contextlib.contextmanager
    def running(self) -> Iterator[Watch]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            thread.join(timeout=60)

    def worst_ms(self, route: str) -> float:
        return max(self.latencies[route]) * 1000

    def median_ms(self, route: str) -> float:
        values = sorted(self.latencies[route])
        return values[len(values) // 2] * 1000


def timed(call: Callable[[], httpx.Response]) -> tuple[int, float]:
    """A call's status and its seconds."""
    started = time.perf_counter()
    return call().status_code, time.perf_counter() - started
