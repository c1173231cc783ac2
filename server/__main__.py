"""`python -m server`: run the service under uvicorn with the settings from the environment."""

from __future__ import annotations

import uvicorn

from server.config import Settings
from server.logs import logging_config


def main() -> None:
    settings = Settings.from_env()
    uvicorn.run(
        "server.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout,
        server_header=False,
    )


if __name__ == "__main__":
    main()
