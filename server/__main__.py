"""`python -m server`: run the service under uvicorn with the settings from the environment."""

from __future__ import annotations

import argparse
import functools
import logging.config
import signal
import sys
from types import FrameType

import uvicorn

from server.config import Settings, settings_help
from server.logs import get_logger, logging_config
from server.protocol import HeaderDeadlineProtocol


def get_args_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m server",
        description="Serve the cat/dog classifier over HTTP. Every setting is an environment variable.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def stopped(signum: int, frame: FrameType | None) -> None:
    """uvicorn, once its graceful shutdown is done, raises again the signal that stopped it (for a parent to see):
    here that is the end of a clean stop, so the process exits 0 (no traceback for Ctrl-C, no "Terminated" from
    `make serve`)."""
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    get_args_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        settings.check_files()
    except ValueError as error:
        print(f"python -m server: {error}", file=sys.stderr)
        sys.exit(2)
    log_config = logging_config(settings.log_level, settings.log_format)
    warning = settings.oversubscription()
    if warning:
        logging.config.dictConfig(log_config)
        get_logger().warning(warning)
    http = functools.partial(
        HeaderDeadlineProtocol,
        timeout=settings.header_timeout,
        max_timeout=settings.header_timeout_max,
        min_rate=settings.read_min_rate,
        max_connections=settings.max_connections,
    )
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stopped)
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        http=http,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=log_config,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout,
        server_header=False,
    )


if __name__ == "__main__":
    main()
