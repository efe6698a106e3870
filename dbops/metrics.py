"""Prometheus textfile metrics (node_exporter's textfile collector), written atomically."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Mapping

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def read_values(path: str | os.PathLike) -> dict[str, float]:
    """Metric name -> value from an existing file (to carry e.g. the last success time over a failure)."""
    out: dict[str, float] = {}
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return out
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(3))
            except ValueError:
                pass
    return out


def write(path: str | os.PathLike, metrics: Mapping[str, tuple[float | int | None, str]],
          labels: Mapping[str, str]) -> None:
    """metrics: name -> (value, help). None values are left out. Written via a temp file + rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    lab = _labels(labels)
    for name, (value, help_) in metrics.items():
        if value is None:
            continue
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        v = float(value)
        lines.append(f"{name}{lab} {int(v) if v.is_integer() else v}")
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, p)
