"""The restore's target folder: refused before anything starts when it is in use, not empty (without
--force / --delta) or out of the PostgreSQL OS user's reach; emptied again after a failure (a
--delta folder is marked unusable instead, to be reused by the next run)."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from dbops import log, proc
from dbops.errors import PreconditionError
from dbops.pg import running

if TYPE_CHECKING:
    from dbops.ops.restore.plan import Options

_log = log.get("restore")

INCOMPLETE_MARK = "DBOPS_RESTORE_INCOMPLETE"


def pg_ids(os_user: str) -> tuple[int, int]:
    """uid and gid of the OS user that owns restored folders."""
    pw = pwd.getpwnam(os_user)
    return pw.pw_uid, pw.pw_gid


def preflight(opts: "Options", os_user: str) -> None:
    """Refuse a folder that is in use, not empty (without --force / --delta), or out of postgres's reach."""
    d = opts.target_dir
    if d.exists() and not d.is_dir():
        raise PreconditionError(f"target {d} exists and is not a folder")
    in_the_way = running.cluster_in_the_way(d)
    if in_the_way:
        data, pid, how = in_the_way
        where = "on it" if how == "is" else f"on {data}, which it {how}"
        raise PreconditionError(f"{d}: PostgreSQL (pid {pid}) is running {where}",
                                hint="restore somewhere else, or stop that server first")
    if d.is_dir() and any(d.iterdir()) and not (opts.force or opts.delta):
        raise PreconditionError(f"target folder {d} is not empty",
                                hint="restore into a new or empty folder; --force replaces its contents, "
                                     "--delta reuses them and fetches only what differs")
    if opts.delta and d.is_dir() and any(d.iterdir()) and not (d / "PG_VERSION").exists():
        raise PreconditionError(f"--delta: {d} is not a PostgreSQL data folder (no PG_VERSION)")
    if os.geteuid() == 0:
        uid, gid = pg_ids(os_user)
        for parent in d.resolve().parents:
            st = parent.stat() if parent.exists() else None
            reachable = st is None or st.st_mode & stat.S_IXOTH or st.st_uid == uid or (
                st.st_gid == gid and st.st_mode & stat.S_IXGRP)
            if not reachable:
                raise PreconditionError(f"the {os_user} OS user cannot reach {d}: {parent} is mode "
                                        f"{stat.S_IMODE(st.st_mode):04o}",
                                        hint=f"restore under a folder {os_user} can traverse")
    if opts.start and opts.port is not None and not proc.port_free(opts.port):
        raise PreconditionError(f"port {opts.port} is in use on this host",
                                hint="choose a free port for the restored server")


def empty(d: Path) -> None:
    """Remove everything in folder d (not d itself)."""
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def discard(d: Path, *, created: bool, delta: bool, reason: str) -> None:
    """After a failed restore: nothing may look like a restored database."""
    try:
        if delta:
            control = d / "global" / "pg_control"
            if control.exists():
                control.rename(control.with_name("pg_control.dbops-incomplete"))
            (d / INCOMPLETE_MARK).write_text(f"dbops restore failed here: {reason}\n"
                                             "This folder cannot be started; run `dbops restore --delta` again.\n")
        elif created:
            shutil.rmtree(d, ignore_errors=True)
        elif d.is_dir():
            empty(d)
    except OSError as e:
        log.event(_log, logging.ERROR, "could not clean up the failed restore", folder=str(d), error=str(e))
