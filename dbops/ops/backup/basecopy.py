"""The first backup's base copy from the source: its data folder copied on this host
(:mod:`dbops.ops.backup.livecopy`, phase ``copy``) or pg_basebackup over the replication protocol
(phase ``basebackup``), as ``backup.copy_method`` says (auto: the direct copy when the source's
folder proves to be this host's and readable, see :func:`dbops.pg.onlinebackup.local_data_dir`);
and what its backup_label says."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from dbops import log, proc
from dbops.config import Config, Node
from dbops.errors import CommandError, DbopsError, PostgresError, PreconditionError
from dbops.ops.backup import livecopy
from dbops.ops.backup import tablespaces as tbs
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.pg.onlinebackup import NotLocal
from dbops.phases import Phases
from dbops.runtime.scratch import out_of_space

_log = log.get("backup")


def take(cfg: Config, source: Node, data: Path, ts: tbs.ScratchTablespaces, phases: Phases, *, run_id: str,
         follow: Callable[[livecopy.CopyPlan, livecopy.Copied], None] | None = None) -> None:
    """The base backup: its data folder copied here (phase ``copy``) when it is this host's to read,
    else pg_basebackup (phase ``basebackup``); backup.copy_method chooses (docs/backups.md).
    ``follow``: see :func:`livecopy.direct_base_backup` (not called with pg_basebackup)."""
    method = cfg.backup.copy_method
    if method != "pg_basebackup":
        try:
            with phases("copy"):
                livecopy.direct_base_backup(source, data, os_user=cfg.os_user, tablespaces=ts,
                                            workers=max(2, min(cfg.backup.parallel, os.cpu_count() or 2)),
                                            label=f"dbops backup {run_id}", follow=follow)
            return
        except NotLocal as e:
            phases.t.pop("copy", None)
            if method == "direct":
                raise PreconditionError(f"backup.copy_method is direct, but the data folder of {source.name} "
                                        f"cannot be copied from this host: {e}",
                                        hint="run dbops on the source's host as root or its OS user, or set "
                                             "backup.copy_method to auto or pg_basebackup") from None
            log.event(_log, logging.INFO, "the source's data folder is not this host's to read; "
                      "taking the base backup with pg_basebackup", source=source.name, reason=str(e))
    with phases("basebackup"):
        base_backup(source, data, os_user=cfg.os_user, tablespaces=ts)


def base_backup(source: Node, data: Path, *, os_user: str, timeout: float = 24 * 3600,
                tablespaces: tbs.ScratchTablespaces | None = None) -> None:
    """pg_basebackup from the source into data (with the WAL it needs), as the postgres OS user;
    every tablespace mapped into the run's scratch folder (never written at its live location)."""
    data.parent.mkdir(parents=True, exist_ok=True)
    mapping = tablespaces.mapping_args() if tablespaces else []
    try:
        proc.run([binaries.binary("pg_basebackup", source.bin_dir), "-h", source.host, "-p", str(source.port),
                  "-U", source.user, "-D", str(data), "-X", "stream", "-c", "fast", "--no-sync", "--no-manifest",
                  *mapping, "-w"], user=os_user, env=pgconn.libpq_env(source), timeout=timeout,
                 what="pg_basebackup")
    except CommandError as e:
        if out_of_space(e):
            raise  # the scratch disk, not PostgreSQL: BackupRun says so
        raise PostgresError(
            f"pg_basebackup from {source.name} ({source.host}:{source.port}) failed: {e.message}", detail=e.detail,
            hint="its own message (detail) says why: the source down or unreachable, access refused, a tablespace "
                 "created while the backup started (run again), ...",
        ) from None


def label_start_lsn(data: Path) -> int | None:
    """The REDO point a fresh base backup starts from (backup_label's START WAL LOCATION); None when
    unreadable (then nothing is reused without hashing)."""
    from dbops.pg.lsn import parse_lsn

    try:
        text = (data / "backup_label").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("START WAL LOCATION:"):
            try:
                return parse_lsn(line.split(":", 1)[1].split("(")[0].strip())
            except ValueError:
                return None
    return None


def label_start_segment(data: Path) -> str:
    """The WAL segment a fresh base backup starts from (backup_label's START WAL LOCATION)."""
    try:
        text = (data / "backup_label").read_text()
    except FileNotFoundError:
        raise DbopsError(f"the base backup in {data} has no backup_label") from None
    for line in text.splitlines():
        if line.startswith("START WAL LOCATION:") and "(file " in line:
            return line.split("(file ", 1)[1].rstrip(")").strip()
    raise DbopsError("cannot read START WAL LOCATION from backup_label", detail=text[:500])
