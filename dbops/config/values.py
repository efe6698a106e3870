"""Reading raw YAML values: every problem collected (with its key's path) instead of stopping at the
first; durations, sizes and ${ENV} references."""

from __future__ import annotations

import re
from typing import Any

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")  # ${VAR} and ${VAR:-default}
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^(\d+)\s*(B|KB|KiB|Ki|MB|MiB|Mi|GB|GiB|Gi|TB|TiB|Ti)?$", re.IGNORECASE)
_SIZE_UNITS = {  # Ki, Mi, Gi, Ti: Kubernetes' spelling (an emptyDir's sizeLimit), copied as is
    "b": 1, "kb": 1000, "kib": 1024, "ki": 1024, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "gb": 1000**3, "gib": 1024**3, "gi": 1024**3, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


class Collector:
    """Reads a raw mapping, collecting every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def mapping(self, raw: Any, path: str) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.bad(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        return raw

    def unknown(self, raw: dict, path: str, allowed: set[str]) -> None:
        for k in raw:
            if k not in allowed:
                self.bad(f"{path}.{k}" if path else str(k), "unknown key (allowed: " + ", ".join(sorted(allowed)) + ")")

    def _absent(self, raw: dict, key: str, p: str, required: bool) -> bool:
        """Whether the key is missing (or null); a required one is reported."""
        if key in raw and raw[key] is not None:
            return False
        if required:
            self.bad(p, "required, missing")
        return True

    def str_(self, raw: dict, key: str, path: str, default: Any = None, required: bool = False,
             choices: tuple[str, ...] | None = None) -> Any:
        p = f"{path}.{key}" if path else key
        if self._absent(raw, key, p, required):
            return default
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.bad(p, f"expected a string, got {type(v).__name__}")
            return default
        v = str(v)
        if choices and v not in choices:
            self.bad(p, f"expected one of {', '.join(choices)}, got {v!r}")
            return default
        return v

    def int_(self, raw: dict, key: str, path: str, default: Any = None, minimum: int | None = None,
             maximum: int | None = None, required: bool = False) -> Any:
        p = f"{path}.{key}" if path else key
        if self._absent(raw, key, p, required):
            return default
        v = raw[key]
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(p, f"expected an integer, got {v!r}")
            return default
        if minimum is not None and v < minimum:
            self.bad(p, f"must be at least {minimum}, got {v}")
            return default
        if maximum is not None and v > maximum:
            self.bad(p, f"must be at most {maximum}, got {v}")
            return default
        return v

    def float_(self, raw: dict, key: str, path: str, default: float, minimum: float = 0.0) -> float:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = raw[key]
        if isinstance(v, str):
            d = parse_duration(v)
            if d is not None:
                return float(d)
            try:
                v = float(v)
            except ValueError:
                self.bad(p, f"expected a number of seconds or a duration like 30s, 5m, got {raw[key]!r}")
                return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(p, f"expected a number, got {v!r}")
            return default
        if v < minimum:
            self.bad(p, f"must be at least {minimum}, got {v}")
            return default
        return float(v)

    def bool_(self, raw: dict, key: str, path: str, default: bool) -> bool:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = raw[key]
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return v.lower() in ("true", "yes", "on", "1")
        self.bad(p, f"expected true or false, got {v!r}")
        return default

    def size(self, raw: dict, key: str, path: str, default: int, minimum: int = 1) -> int:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = parse_size(raw[key])
        if v is None:
            self.bad(p, f"expected a size like 16MiB or a number of bytes, got {raw[key]!r}")
            return default
        if v < minimum:
            self.bad(p, f"must be at least {minimum} bytes")
            return default
        return v

    def str_list(self, raw: dict, key: str, path: str) -> tuple[str, ...]:
        p = f"{path}.{key}" if path else key
        v = raw.get(key)
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            self.bad(p, "expected a list of strings")
            return ()
        return tuple(str(x) for x in v)


def _count_or_text(v: Any) -> int | str | None:
    """A non-negative integer as it is, a string stripped, anything else (a bool too) None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    return v.strip() if isinstance(v, str) else None


def parse_duration(v: Any) -> int | None:
    """'30s', '5m', '12h', '14d', '2w' or a plain integer of seconds."""
    s = _count_or_text(v)
    if s is None or isinstance(s, int):
        return s
    if s.isdigit():
        return int(s)
    m = _DURATION_RE.match(s)
    if not m:
        return None
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(v: Any) -> int | None:
    s = _count_or_text(v)
    if s is None or isinstance(s, int):
        return s
    m = _SIZE_RE.match(s)
    if not m:
        return None
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def interpolate(value: Any, env: dict[str, str], problems: list[str], path: str = "") -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, problems, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, problems, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return ENV_RE.sub(sub, value)
    return value
