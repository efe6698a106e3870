"""Rendering: data to stdout (tables or JSON), messages to stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Sequence

from dbops import secrets
from dbops.units import human_bytes  # noqa: F401  (rendered here; defined once in units)


def emit_json(obj: Any) -> None:
    sys.stdout.write(secrets.redact(json.dumps(obj, indent=2, default=str, sort_keys=False)) + "\n")
    sys.stdout.flush()


def out(text: str = "") -> None:
    sys.stdout.write(secrets.redact(text) + "\n")
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(secrets.redact(text) + "\n")
    sys.stderr.flush()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [["" if v is None else str(v) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return "\n".join(lines)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int((s % 3600) // 60):02d}m"
