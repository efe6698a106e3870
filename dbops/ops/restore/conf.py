"""The restored folder's own configuration: what the user's PostgreSQL reads when it starts.

dbops writes one marked block at the end of ``postgresql.auto.conf`` (read last, so it wins
over ``postgresql.conf``) and removes any earlier line for the keys it sets, so the file
says each thing once. ``restore_command`` goes through ``dbops wal-fetch`` with this
configuration file, so the server fetches (and prefetches) verified WAL from the archive.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Mapping

from dbops.config import Config
from dbops.errors import PreconditionError
from dbops.pg.autoconf import HEADER, quote

AUTO_CONF = "postgresql.auto.conf"
BLOCK_BEGIN = "# --- dbops restore: begin (written by `dbops restore`) ---"
BLOCK_END = "# --- dbops restore: end ---"

RECOVERY_KEYS = ("recovery_target", "recovery_target_time", "recovery_target_lsn", "recovery_target_xid",
                 "recovery_target_name", "recovery_target_inclusive", "recovery_target_timeline",
                 "recovery_target_action")
MANAGED_KEYS = frozenset(RECOVERY_KEYS + ("restore_command", "archive_mode", "primary_conninfo",
                                          "primary_slot_name", "port", "hot_standby"))
_KEY_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(=|\s)")


def dbops_executable() -> str:
    from dbops import proc

    return proc.dbops_executable()


def restore_command(cfg: Config) -> str:
    """restore_command for the restored server: `dbops -c CONFIG wal-fetch %f %p`."""
    if not cfg.path:
        raise PreconditionError("restore needs a configuration file (restore_command refers to it)")
    return (f"{shlex.quote(dbops_executable())} -c {shlex.quote(os.path.abspath(cfg.path))} "
            'wal-fetch %f "%p"')


REMOTE_DIR = ".remote"
PENDING_DIR = ".pending"
ASKED_DIR = ".asked"  # a name for each file replay asked for (dbops.ops.restore.wal.WalAhead's window)
STAGED_DIR = ".staged"  # segments fetched, not yet read for CREATE TABLESPACE (dbops.ops.restore.wal.WalAhead)


def run_command(cache: Path, cfg: Config, linked: bool = False) -> str:
    """restore_command for dbops' own recovery run. A segment being fetched ahead (marked in
    cache/.pending) is waited for, then copied from `cache`; one marked in cache/.remote comes through
    dbops wal-fetch; anything else is not there (exit 1), so probes for files the archive does not
    have cost nothing. Each request first leaves the name asked for in cache/.asked (a shell builtin,
    no process): how far replay has come, for the fetch ahead's window (a failure to leave it does
    not fail the request; the folder is the server's user's, :meth:`dbops.ops.restore.wal.WalAhead.prepare`).

    ``linked``: the cache's files are also hard-linked into pg_wal (:func:`dbops.runtime.walfolder.link_wal`).
    A file whose pg_wal name is that very link (``test -ef``: same inode) is declined, so PostgreSQL
    reads it in place instead of a 16 MiB copy. Any other file of that name in pg_wal (a segment
    a restart point recycled under a future name holds old WAL) is not declined: the cache's copy
    or the archive's wins, as it always does over pg_wal in archive recovery. The command runs in
    the data folder, so ``pg_wal/%f`` is the server's own file."""
    root = cache.resolve()
    d, p, r, a = (shlex.quote(str(x) + "/") for x in (root, root / PENDING_DIR, root / REMOTE_DIR, root / ASKED_DIR))
    in_place = f"test {d}%f -ef pg_wal/%f && exit 1; " if linked else ""
    return (f"true 2>/dev/null >{a}%f; while test -e {p}%f && ! test -e {d}%f; do sleep 0.02; done; {in_place}"
            f'test -f {d}%f && exec cp {d}%f "%p"; test -f {r}%f && exec {restore_command(cfg)}; exit 1')


def render_block(settings: Mapping[str, str], comments: list[str]) -> str:
    lines = [BLOCK_BEGIN, *(f"# {c}" for c in comments)]
    lines += [f"{k} = {quote(v)}" for k, v in settings.items()]
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


def strip_managed(text: str) -> str:
    """auto.conf without an earlier dbops block and without lines for the keys dbops sets."""
    out, inside = [], False
    for line in text.splitlines():
        if line.strip() == BLOCK_BEGIN:
            inside = True
            continue
        if inside:
            inside = line.strip() != BLOCK_END
            continue
        m = _KEY_RE.match(line)
        if m and m.group(1).lower() in MANAGED_KEYS:
            continue
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + ("\n" if out else "")


def write_settings(data: Path, settings: Mapping[str, str], comments: list[str]) -> Path:
    """Replace the dbops block of data/postgresql.auto.conf (atomically, owned like the folder)."""
    path = data / AUTO_CONF
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = HEADER
    body = strip_managed(text) + render_block(settings, comments)
    tmp = path.with_name(AUTO_CONF + ".dbops-tmp")
    tmp.write_text(body)
    _own_like(tmp, data, 0o600)
    os.replace(tmp, path)
    return path


def ensure_main_conf(data: Path) -> bool:
    """An empty postgresql.conf when the source kept its configuration elsewhere (Debian's /etc)."""
    p = data / "postgresql.conf"
    if p.exists():
        return False
    p.write_text("# Written by `dbops restore`: the source kept postgresql.conf outside its data folder.\n"
                 "# Built-in defaults apply, plus postgresql.auto.conf.\n")
    _own_like(p, data, 0o600)
    return True


def write_signal(data: Path, recovery: bool) -> None:
    """recovery.signal present (or not); never standby.signal."""
    (data / "standby.signal").unlink(missing_ok=True)
    p = data / "recovery.signal"
    if recovery:
        p.write_text("")
        _own_like(p, data, 0o600)
    else:
        p.unlink(missing_ok=True)


def _own_like(path: Path, folder: Path, mode: int) -> None:
    os.chmod(path, mode)
    if os.geteuid() == 0:
        st = folder.stat()
        os.chown(path, st.st_uid, st.st_gid)
