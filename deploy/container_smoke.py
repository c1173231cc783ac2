"""Smoke test of the serve image as a container: healthcheck, /ready, real photos, non-root, no torch, clean stop.

Runs the image directly (`--image`) or the compose file's `serve` service (`--compose "docker compose"`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from deploy.client import free_port
from deploy.smoke import smoke


def run(command: list[str], check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, check=check, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def wait_healthy(engine: str, container: str, timeout: float) -> None:
    """The image's own HEALTHCHECK: podman runs it on demand (no systemd timers here), docker on its schedule."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(engine).name == "podman":
            if run([engine, "healthcheck", "run", container], check=False).returncode == 0:
                return
        else:
            status = run([engine, "inspect", "-f", "{{.State.Health.Status}}", container], check=False).stdout.strip()
            if status == "healthy":
                return
        time.sleep(1)
    logs = run([engine, "logs", container], check=False)
    raise TimeoutError(f"{container} not healthy in {timeout:.0f} s\n{logs.stdout}{logs.stderr}")


def check_container(engine: str, container: str, url: str, photos: list[Path]) -> None:
    wait_healthy(engine, container, 60)
    failures = smoke(url, photos, timeout=30)
    uid = run([engine, "exec", container, "id", "-u"]).stdout.strip()
    if uid == "0":
        failures.append("the service runs as root")
    if run([engine, "exec", container, "python", "-c", "import torch"], check=False).returncode == 0:
        failures.append("torch is importable in the serve image")
    if run([engine, "exec", container, "touch", "/app/written"], check=False).returncode == 0:
        failures.append("the root filesystem is writable")
    if failures:
        raise SystemExit("container smoke test failed:\n" + "\n".join(failures))
    print(f"ok  {container}: healthy, ready, {len(photos)} photos classified, uid {uid}, no torch, read-only")


def stop(engine: str, container: str) -> None:
    run([engine, "stop", "--time", "30", container])
    logs = run([engine, "logs", container], check=False).stdout
    if '"message": "shutdown"' not in logs:
        raise SystemExit(f"{container} did not shut down cleanly:\n{logs[-2000:]}")
    print(f"ok  {container}: stopped cleanly")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default=os.environ.get("CONTAINER", "docker"))
    parser.add_argument("--image", help="run this image directly")
    parser.add_argument("--compose", help='run the compose "serve" service with this command, e.g. "docker compose"')
    parser.add_argument("--models", type=Path, required=True, help="folder holding model.onnx, mounted read-only")
    parser.add_argument("photos", nargs="+", type=Path)
    args = parser.parse_args(argv)
    models = args.models.resolve()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.image:
        container = f"catsdogs-smoke-{port}"
        run([args.engine, "run", "-d", "--name", container, "-p", f"127.0.0.1:{port}:8000", "--read-only",
             "--tmpfs", "/tmp", "-v", f"{models}:/models:ro", args.image])  # fmt: skip
        try:
            check_container(args.engine, container, url, args.photos)
            stop(args.engine, container)
        finally:
            run([args.engine, "rm", "-f", container], check=False)
    elif args.compose:
        compose = shlex.split(args.compose)
        env = {**os.environ, "PORT": str(port), "MODELS_DIR": str(models)}
        run([*compose, "up", "-d", "--no-build", "serve"], env=env)
        try:
            container = run([args.engine, "ps", "-q", "--filter", "label=com.docker.compose.service=serve"]).stdout
            container = container.split()[0]
            check_container(args.engine, container, url, args.photos)
            stop(args.engine, container)
        finally:
            run([*compose, "down"], env=env, check=False)
    else:
        parser.error("give --image or --compose")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as error:
        sys.exit(f"{shlex.join(error.cmd)} failed ({error.returncode}):\n{error.stdout}{error.stderr}")
