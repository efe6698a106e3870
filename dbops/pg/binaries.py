"""Locate PostgreSQL's server binaries (not all of them are on PATH on Debian)."""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess

from dbops.errors import DbopsError

SEARCH_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/opt/postgresql@*/bin")


@functools.lru_cache(maxsize=8)
def bindir(configured: str | None = None, major: int | None = None) -> str:
    """The folder with initdb, pg_ctl, pg_basebackup, ... (configured, pg_config, or well-known places)."""
    if configured:
        if os.path.isfile(os.path.join(configured, "pg_ctl")):
            return configured
        raise DbopsError(f"bin_dir {configured} has no pg_ctl", hint="point bin_dir at PostgreSQL's bin folder")
    candidates: list[str] = []
    pgc = shutil.which("pg_config")
    if pgc:
        try:
            out = subprocess.run([pgc, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
            if out:
                candidates.append(out)
        except (OSError, subprocess.SubprocessError):
            pass
    for g in SEARCH_GLOBS:
        candidates.extend(sorted(glob.glob(g), key=_version_key, reverse=True))
    for c in candidates:
        if major is not None and f"/{major}/" not in c + "/" and f"-{major}/" not in c + "/":
            continue
        if os.path.isfile(os.path.join(c, "pg_ctl")):
            return c
    raise DbopsError(
        "PostgreSQL server binaries (pg_ctl, initdb, ...) not found" + (f" for major version {major}" if major else ""),
        detail="searched: " + (", ".join(candidates) or "pg_config and " + ", ".join(SEARCH_GLOBS)),
        hint="install the PostgreSQL server package (Debian: postgresql-15), or set bin_dir",
    )


def _version_key(path: str) -> int:
    for part in path.split("/"):
        digits = "".join(ch for ch in part if ch.isdigit())
        if digits and len(digits) <= 2:
            return int(digits)
    return 0


def binary(name: str, configured: str | None = None, major: int | None = None) -> str:
    return os.path.join(bindir(configured, major), name)
