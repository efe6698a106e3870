"""Logging: to stderr, text or JSON lines, with secrets redacted from every record."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from dbops import secrets

LOGGER_NAME = "dbops"


class _RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        msg = secrets.redact(record.getMessage())
        exc = ""
        if record.exc_info:
            exc = secrets.redact(self.formatException(record.exc_info))
        if self.fmt == "json":
            d = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "pid": os.getpid(),
                "msg": msg,
            }
            extra = getattr(record, "fields", None)
            if isinstance(extra, dict):
                d.update({k: _safe(v) for k, v in extra.items()})
            if exc:
                d["exception"] = exc
            return json.dumps(d, default=str)
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname:<7} {msg}"
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            line += " " + " ".join(f"{k}={_safe(v)}" for k, v in extra.items())
        if exc:
            line += "\n" + exc
        return line


def _safe(v: object) -> object:
    if isinstance(v, str):
        return secrets.redact(v)
    return v


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(fmt: str = "text", verbosity: int = 0, stream=None) -> None:
    """verbosity: -1 quiet (errors only), 0 warnings, 1 info, 2 debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger(LOGGER_NAME)
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    h.setFormatter(_RedactingFormatter(fmt))
    root.addHandler(h)
    root.setLevel(level)
    root.propagate = False
    # Never let botocore / urllib3 debug output (which can include headers) through.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if not name.startswith(LOGGER_NAME) else name)


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    logger.log(level, msg, extra={"fields": fields})
