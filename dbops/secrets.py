"""A process-wide registry of secret values, and redaction of them from text.

Configuration loading registers every secret it reads (S3 keys, passwords).
Logging, error rendering and `config show` pass text through :func:`redact`,
so a secret never reaches stderr, a log file, or a traceback printed by dbops.
"""

from __future__ import annotations

import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"

# Patterns that look like credentials even when not registered.
_PATTERNS = [
    re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE),
    re.compile(r"(aws_secret_access_key\s*[=:]\s*)(\S+)", re.IGNORECASE),
    re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)"),
]


def register(value: str | None) -> None:
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    if not text:
        return text
    with _lock:
        values = sorted(_secrets, key=len, reverse=True)
    for v in values:
        if v in text:
            text = text.replace(v, MASK)
    for p in _PATTERNS:
        if p.groups == 3:
            text = p.sub(lambda m: m.group(1) + MASK + m.group(3), text)
        else:
            text = p.sub(lambda m: m.group(1) + MASK, text)
    return text


def clear() -> None:
    """For tests."""
    with _lock:
        _secrets.clear()
