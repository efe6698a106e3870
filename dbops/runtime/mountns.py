"""A private mount namespace for a local throwaway server (engine ``none``).

A tablespace created by a ``CREATE TABLESPACE`` that recovery replays gets a link to the
location recorded in the WAL, an absolute path that may be the live tablespace of the
primary on this very host. The server must see a private scratch folder there instead: it
runs under ``unshare --mount --propagation private`` with that folder bind-mounted over the
location, visible to that server only (and gone with it). That needs root; a mount point
that does not exist on this host is created empty first and removed afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from dbops import proc
from dbops.errors import PreconditionError

# $1 = number of pairs, then (source, mount point) pairs, then the command.
_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$2" || exit 70; shift 2; n=$((n-1)); done; '
           'exec "$@"')


def moved(mounts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The mounts whose folder must appear at another path than its own."""
    return [(h, p) for h, p in mounts if os.path.realpath(h) != os.path.realpath(p)]


def prepare(mounts: Sequence[tuple[str, str]]) -> list[Path]:
    """Check we may build the namespace; create missing mount points. Returns the folders created."""
    if not mounts:
        return []
    if os.geteuid() != 0:
        raise PreconditionError(
            "the WAL to replay creates tablespace(s) at " + ", ".join(p for _, p in mounts)
            + ": a local throwaway server (runtime engine none) needs root to give them a private folder",
            hint="run dbops as root, or use a container runtime (runtime.engine: podman or docker), or take a "
                 "fresh full backup (dbops backup --full) that has the tablespace already")
    created: list[Path] = []
    for _, point in mounts:
        missing = []
        p = Path(point)
        while not p.exists():
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            m.mkdir(mode=0o700)
            created.append(m)
    return created


def wrap(argv: Sequence[str], mounts: Sequence[tuple[str, str]], user: str) -> list[str]:
    """argv run as user inside a private mount namespace with the mounts in place."""
    flat = [a for pair in mounts for a in pair]
    return [proc.which("unshare"), "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SCRIPT, "sh",
            str(len(mounts)), *flat, proc.which("runuser"), "-u", user, "--", *argv]


def cleanup(created: Sequence[Path]) -> None:
    """Remove the mount points created by prepare (deepest first; only when still empty)."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass
