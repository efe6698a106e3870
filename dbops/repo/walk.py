"""Walk a stopped PostgreSQL data folder: what to back up, as pg_basebackup would.

Excluded like pg_basebackup does (src/backend/backup/basebackup.c):
* contents of pg_wal, except the WAL files a caller's ``keep_wal(name)`` accepts (the
  segments needed to reach consistency and the timeline history files, as
  ``pg_basebackup -X`` includes them); contents of pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots,
  pg_stat_tmp, pg_subtrans (the folders themselves are kept, empty);
* postmaster.pid, postmaster.opts, recovery.signal, standby.signal, the temporary
  postgresql.auto.conf.tmp and current_logfiles.tmp, backup_label.old, tablespace_map.old;
* pgsql_tmp* files and folders and pg_internal.init* anywhere;
* every fork but ``_init`` of unlogged relations (recovery rebuilds them from ``_init``);
* plus caller-given glob patterns (matched against the relative path).

Symlinks are recorded as links; their targets are never followed. A tablespace's link
``pg_tblspc/<OID>`` named in ``tablespaces`` is recorded with its original location as the
target, and the folder given for it there (a scratch copy, never the live location) is
walked as ``pg_tblspc/<OID>/...``; its entries carry that folder's path in ``src``. Any other
link in pg_tblspc is an error when ``tablespaces`` is given (its contents would be missing),
a warning otherwise. A symlinked pg_wal becomes an ordinary empty folder: the restored copy
must not point at another machine's WAL folder.
Any link outside pg_tblspc is skipped with a warning: a restore accepts links only where
PostgreSQL makes them (the bucket is untrusted input, dbops.repo.untrusted).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from dbops import log
from dbops.errors import PreconditionError
from dbops.pg.lsn import HISTORY_RE, SEGMENT_RE, parse_segment_name
from dbops.repo.manifest import DIR, FILE, SYMLINK, PgState
from dbops.repo.tblspc import TBLSPC_DIR, oid_of_link

_log = log.get("backup.walk")

EXCLUDE_DIR_CONTENTS = frozenset({
    "pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_stat_tmp",
    "pg_subtrans",
})
EXCLUDE_TOP_FILES = frozenset({
    "postmaster.pid", "postmaster.opts", "recovery.signal", "standby.signal", "postgresql.auto.conf.tmp",
    "current_logfiles.tmp", "backup_label.old", "tablespace_map.old", "recovery.done",
})
EXCLUDE_PREFIXES = ("pgsql_tmp", "pg_internal.init")

_RELFILE_RE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.\d+)?$")
_INIT_FORK_RE = re.compile(r"^(\d+)_init$")


@dataclass(frozen=True)
class WalkEntry:
    path: str  # relative, "/"-separated; "." for the folder itself
    type: str
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | None = None
    src: str | None = None  # where the content is read from when not data_dir/path (tablespaces)


def walk(data_dir: str, exclude: Iterable[str] = (), keep_wal: Callable[[str], bool] | None = None,
         tablespaces: Mapping[int, tuple[str, str]] | None = None) -> list[WalkEntry]:
    """Every entry to back up, parents before children, sorted by path.

    ``tablespaces``: {OID: (folder holding its contents, original location)}."""
    patterns = tuple(exclude)
    root = os.path.abspath(data_dir)
    st = os.stat(root)
    out = [WalkEntry(".", DIR, stat.S_IMODE(st.st_mode), st.st_mtime_ns)]
    _walk_dir(root, "", patterns, out, tablespaces)
    if keep_wal is not None:
        _add_wal(os.path.join(root, "pg_wal"), keep_wal, out)
    return out


def _add_wal(wal_dir: str, keep_wal: Callable[[str], bool], out: list[WalkEntry]) -> None:
    """The accepted WAL files, inserted right after the pg_wal entry (a symlinked pg_wal is followed)."""
    try:
        with os.scandir(wal_dir) as it:
            names = sorted(e.name for e in it if e.is_file() and keep_wal(e.name))
    except FileNotFoundError:
        return
    at = next(i for i, e in enumerate(out) if e.path == "pg_wal") + 1
    for name in names:
        st = os.stat(os.path.join(wal_dir, name))
        out.insert(at, WalkEntry(f"pg_wal/{name}", FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size=st.st_size))
        at += 1


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    if "/" not in rel and name in EXCLUDE_TOP_FILES:
        return True
    if name.startswith(EXCLUDE_PREFIXES):
        return True
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def unlogged_forks(names: list[str]) -> set[str]:
    """Files of unlogged relations (those with an _init fork) other than the _init fork itself."""
    unlogged = {m.group(1) for n in names if (m := _INIT_FORK_RE.match(n))}
    if not unlogged:
        return set()
    skip = set()
    for n in names:
        m = _RELFILE_RE.match(n)
        if m and m.group(1) in unlogged and m.group(2) != "init":
            skip.add(n)
    return skip


def _tablespace(e: os.DirEntry, rel: str, st: os.stat_result, patterns: tuple[str, ...], out: list[WalkEntry],
                tablespaces: Mapping[int, tuple[str, str]] | None) -> bool:
    """Record a pg_tblspc link; True when handled here."""
    oid = oid_of_link(rel)
    if tablespaces is None:
        if stat.S_ISLNK(st.st_mode):
            _log.warning("tablespace %s links outside the data folder; its contents are not backed up", rel)
        return False
    if stat.S_ISDIR(st.st_mode) and (oid is None or oid not in tablespaces):
        return False  # an in-place tablespace (allow_in_place_tablespaces): a folder inside the data folder
    if oid is None or oid not in tablespaces:
        what = f"-> {os.readlink(e.path)}" if stat.S_ISLNK(st.st_mode) else "(a folder)"
        raise PreconditionError(f"the snapshot has a tablespace entry {rel} {what} that dbops does not know",
                                hint="its contents would be missing from the backup; report this as a bug")
    folder, location = tablespaces[oid]
    out.append(WalkEntry(rel, SYMLINK, 0o777, st.st_mtime_ns, target=location))
    sub: list[WalkEntry] = []
    _walk_dir(folder, "", patterns, sub, None)
    for w in sub:
        out.append(WalkEntry(f"{rel}/{w.path}", w.type, w.mode, w.mtime_ns, w.size, w.target,
                             os.path.join(folder, w.path)))
    return True


def _walk_dir(abs_dir: str, rel_dir: str, patterns: tuple[str, ...], out: list[WalkEntry],
              tablespaces: Mapping[int, tuple[str, str]] | None = None) -> None:
    with os.scandir(abs_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    # base/<db>/, or <PG_version>/<db>/ when walking a tablespace's folder
    in_database_dir = rel_dir.startswith(("base/", "PG_")) and rel_dir.count("/") == 2
    skip = unlogged_forks([e.name for e in entries]) if in_database_dir else set()
    for e in entries:
        rel = f"{rel_dir}{e.name}"
        if e.name in skip or _excluded(rel, e.name, patterns):
            continue
        st = e.stat(follow_symlinks=False)
        mode = stat.S_IMODE(st.st_mode)
        if rel == "pg_wal" and stat.S_ISLNK(st.st_mode):
            out.append(WalkEntry(rel, DIR, 0o700, st.st_mtime_ns))
            continue
        if rel_dir == TBLSPC_DIR + "/" and _tablespace(e, rel, st, patterns, out, tablespaces):
            continue
        if stat.S_ISLNK(st.st_mode):
            if rel_dir != "pg_tblspc/" or not e.name.isdigit():
                # a restore accepts links only where PostgreSQL makes them (the bucket is untrusted input)
                _log.warning("skipping %s: a symbolic link where PostgreSQL makes none", rel)
                continue
            out.append(WalkEntry(rel, SYMLINK, mode, st.st_mtime_ns, target=os.readlink(e.path)))
        elif stat.S_ISDIR(st.st_mode):
            out.append(WalkEntry(rel, DIR, mode, st.st_mtime_ns))
            if rel not in EXCLUDE_DIR_CONTENTS:
                _walk_dir(e.path, rel + "/", patterns, out, tablespaces)
        elif stat.S_ISREG(st.st_mode):
            out.append(WalkEntry(rel, FILE, mode, st.st_mtime_ns, size=st.st_size))
        else:
            _log.warning("skipping %s: not a regular file, folder or symlink", rel)


def wal_needed(pg: PgState) -> Callable[[str], bool]:
    """Which pg_wal files a snapshot must carry to start on its own: every timeline history
    file, and the segments (any timeline) from the checkpoint's REDO point through the
    consistent point; the next one too when that point is in a segment's last page (a
    record starting there may continue into it)."""
    seg = pg.wal_segment_size
    lo, hi = pg.redo_lsn // seg, pg.consistent_lsn // seg
    if pg.consistent_lsn % seg > seg - 8192:
        hi += 1

    def keep(name: str) -> bool:
        if HISTORY_RE.match(name):
            return True
        if SEGMENT_RE.match(name):
            return lo <= parse_segment_name(name, seg)[1] <= hi
        return False

    return keep
