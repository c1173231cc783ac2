"""Structured logging: one JSON object per line (or plain text), for the service and uvicorn alike."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

LOGGER_NAME = "catsdogs"
# color_message: uvicorn's copy of some messages with terminal colour codes, for its own console formatter
RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# one encoder for every line: json.dumps with `default` builds a new JSONEncoder per call (half its time)
ENCODE = json.JSONEncoder(default=str).encode


def escape(value: object) -> str:
    """Control characters as visible escapes (\\n, \\x1b), so a value can never start a new log line."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


class JsonFormatter(logging.Formatter):
    """The record's message plus every `extra` field, as one JSON line."""

    # the last second formatted and its text, swapped as one tuple: one strftime a second, not one a line
    last: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, stamp = self.last
        if second != int(record.created):
            second = int(record.created)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.last = (second, stamp)
        entry: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return ENCODE(entry)


class TextFormatter(logging.Formatter):
    """Human-readable: the message followed by key=value extras, control characters escaped (one record, one line;
    only an exception's traceback continues on the lines after it)."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={escape(v)}" for k, v in vars(record).items() if k not in RESERVED)
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {escape(record.getMessage())} {extras}"
        return line.rstrip() + (f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A dictConfig for the service's and uvicorn's loggers (uvicorn's access log is replaced by ours)."""
    formatter = {"()": f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            LOGGER_NAME: {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def lean_records() -> None:
    """Skip what no formatter here prints: the caller's file and line (a stack walk), thread, process and
    multiprocessing names; the logging documentation's "Optimization" section names these switches. A quarter of
    the cost of a request's log line."""
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
