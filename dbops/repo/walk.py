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

Memory: the entries are kept in a :class:`Listing` (a path's bytes and a few numbers in arrays,
about 75 bytes a file), a folder is listed by name (:class:`Names`: its names sorted in runs,
kept as bytes; never a DirEntry and its stat each), so a cluster of a million relation files takes
tens of MiB, not a Python object per file.
"""

from __future__ import annotations

import fnmatch
import heapq
import operator
import os
import re
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import compress, islice
from typing import NamedTuple

from dbops import log
from dbops.errors import PreconditionError
from dbops.pg.lsn import HISTORY_RE, SEGMENT_RE, parse_segment_name
from dbops.repo.manifest import DIR, FILE, SYMLINK, PgState, path_key
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


class WalkEntry(NamedTuple):  # a tuple: made again for each entry a Listing is asked for, at half the cost
    path: str  # relative, "/"-separated; "." for the folder itself
    type: str
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | None = None
    src: str | None = None  # where the content is read from when not data_dir/path (tablespaces)


_TYPES = (FILE, DIR, SYMLINK)
_CODE = {t: i for i, t in enumerate(_TYPES)}


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class Listing(Sequence[WalkEntry]):
    """Walk entries, compact: each path's bytes in one buffer, a link's target and an entry's
    ``src`` in another, type, mode, time and size in arrays (about 60 bytes a file with its
    path, against some 500 as a WalkEntry in a list); an entry is made again when asked for."""

    def __init__(self, entries: Iterable[WalkEntry] = ()) -> None:
        self._paths, self._ends = bytearray(), array("Q", [0])
        self._extra, self._xends = bytearray(), array("Q", [0])  # target NUL src, or nothing
        self._type, self._mode = array("B"), array("I")
        self._mtime, self._size = array("q"), array("Q")
        self.ordered = True  # every entry appended after the one before in path order
        self._last: tuple[str, ...] | None = None
        for e in entries:
            self.append(e)

    def append(self, e: WalkEntry) -> None:
        key = path_key(e.path)
        if self._last is not None and key <= self._last:
            self.ordered = False
        self._last = key
        self._paths += _enc(e.path)
        self._ends.append(len(self._paths))
        if e.target is not None or e.src is not None:
            self._extra += _enc(e.target or "") + b"\0" + _enc(e.src or "")
        self._xends.append(len(self._extra))
        self._type.append(_CODE[e.type])
        self._mode.append(e.mode)
        self._mtime.append(e.mtime_ns)
        self._size.append(e.size)

    def __len__(self) -> int:
        return len(self._type)

    def __getitem__(self, i: int) -> WalkEntry:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("a Listing takes one index at a time")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        path = self._paths[self._ends[i]:self._ends[i + 1]].decode("utf-8", "surrogateescape")
        target = src = None
        if self._xends[i + 1] > self._xends[i]:
            t, _, s = self._extra[self._xends[i]:self._xends[i + 1]].partition(b"\0")
            target = t.decode("utf-8", "surrogateescape") or None
            src = s.decode("utf-8", "surrogateescape") or None
        return WalkEntry(path, _TYPES[self._type[i]], self._mode[i], self._mtime[i], self._size[i], target, src)

    def __iter__(self) -> Iterator[WalkEntry]:
        paths, extra, ends, xends = self._paths, self._extra, self._ends, self._xends
        for a, b, xa, xb, t, mode, mtime, size in zip(ends, islice(ends, 1, None), xends, islice(xends, 1, None),
                                                      self._type, self._mode, self._mtime, self._size):
            target = src = None
            if xb > xa:
                tb, _, sb = extra[xa:xb].partition(b"\0")
                target = tb.decode("utf-8", "surrogateescape") or None
                src = sb.decode("utf-8", "surrogateescape") or None
            yield WalkEntry(paths[a:b].decode("utf-8", "surrogateescape"), _TYPES[t], mode, mtime, size, target, src)

    def files(self) -> tuple[int, int]:
        """(files, their bytes), from the arrays."""
        code = _CODE[FILE]
        return self._type.count(code), sum(compress(self._size, map(code.__eq__, self._type)))


def file_totals(entries: Sequence[WalkEntry]) -> tuple[int, int]:
    """How many of ``entries`` are files, and their bytes."""
    if isinstance(entries, Listing):
        return entries.files()
    sizes = [e.size for e in entries if e.type == FILE]
    return len(sizes), sum(sizes)


def walk(data_dir: str, exclude: Iterable[str] = (), keep_wal: Callable[[str], bool] | None = None,
         tablespaces: Mapping[int, tuple[str, str]] | None = None) -> Listing:
    """Every entry to back up, parents before children, sorted by path (:func:`path_key`'s order).

    ``tablespaces``: {OID: (folder holding its contents, original location)}."""
    patterns = tuple(exclude)
    root = os.path.abspath(data_dir)
    st = os.stat(root)
    out = Listing([WalkEntry(".", DIR, stat.S_IMODE(st.st_mode), st.st_mtime_ns)])
    _walk_dir(root, "", patterns, out, tablespaces, keep_wal)
    return out


NAMES_RUN = 1 << 16  # names of a folder sorted at once as Python strings


class Names:
    """The names in a folder, sorted, as often as iterated. Read in runs of ``NAMES_RUN`` sorted
    alone; a folder with more (a database's folder with many relations) keeps each run as its
    names' bytes, NUL-separated, and merges the runs as it is iterated, one name at a time."""

    def __init__(self, folder: str) -> None:
        self.small: list[str] = []
        self.runs: list[bytes] = []
        batch: list[str] = []
        with os.scandir(folder) as it:
            for e in it:
                batch.append(e.name)
                if len(batch) == NAMES_RUN:
                    self.runs.append("\0".join(sorted(batch)).encode("utf-8", "surrogateescape"))
                    batch = []
        if not self.runs:
            self.small = sorted(batch)
        elif batch:
            self.runs.append("\0".join(sorted(batch)).encode("utf-8", "surrogateescape"))

    @staticmethod
    def _each(run: bytes) -> Iterator[str]:
        start = 0
        while start < len(run):
            end = run.find(b"\0", start)
            if end < 0:
                end = len(run)
            yield run[start:end].decode("utf-8", "surrogateescape")
            start = end + 1

    def __iter__(self) -> Iterator[str]:
        if not self.runs:
            return iter(self.small)
        return heapq.merge(*map(self._each, self.runs))  # compared as strings, as sorted() does


def in_path_order(entries: Sequence[WalkEntry]) -> Sequence[WalkEntry]:
    """``entries`` sorted by :func:`path_key`: themselves when they already are (a walk's are; checked
    two at a time, so nothing is made per entry at once), else a sorted list."""
    if isinstance(entries, Listing) and entries.ordered:
        return entries
    keys = map(path_key, (e.path for e in entries))
    nxt = map(path_key, (e.path for e in entries))
    next(nxt, None)
    if all(map(operator.le, keys, nxt)):
        return entries
    return sorted(entries, key=lambda e: path_key(e.path))


def _add_wal(wal_dir: str, keep_wal: Callable[[str], bool], out: Listing) -> None:
    """The accepted WAL files, right after the pg_wal entry (a symlinked pg_wal is followed)."""
    try:
        with os.scandir(wal_dir) as it:
            names = sorted(e.name for e in it if e.is_file() and keep_wal(e.name))
    except FileNotFoundError:
        return
    for name in names:
        st = os.stat(os.path.join(wal_dir, name))
        out.append(WalkEntry(f"pg_wal/{name}", FILE, stat.S_IMODE(st.st_mode), st.st_mtime_ns, size=st.st_size))


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    if "/" not in rel and name in EXCLUDE_TOP_FILES:
        return True
    if name.startswith(EXCLUDE_PREFIXES):
        return True
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def unlogged_forks(names: Iterable[str]) -> set[str]:
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


def _tablespace(path: str, rel: str, st: os.stat_result, patterns: tuple[str, ...], out: Listing,
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
        what = f"-> {os.readlink(path)}" if stat.S_ISLNK(st.st_mode) else "(a folder)"
        raise PreconditionError(f"the snapshot has a tablespace entry {rel} {what} that dbops does not know",
                                hint="its contents would be missing from the backup; report this as a bug")
    folder, location = tablespaces[oid]
    out.append(WalkEntry(rel, SYMLINK, 0o777, st.st_mtime_ns, target=location))
    _walk_dir(folder, "", patterns, out, None, None, (rel + "/", folder))
    return True


def _walk_dir(abs_dir: str, rel_dir: str, patterns: tuple[str, ...], out: Listing,
              tablespaces: Mapping[int, tuple[str, str]] | None = None,
              keep_wal: Callable[[str], bool] | None = None, under: tuple[str, str] | None = None) -> None:
    """``under``: (prefix, folder) when walking a tablespace's folder: each entry's path in the
    backup is prefix + its path there, read from that folder (``src``)."""
    names = Names(abs_dir)  # sorted, a few bytes a name: never a DirEntry (its paths and stat) each
    # base/<db>/, or <PG_version>/<db>/ when walking a tablespace's folder
    in_database_dir = rel_dir.startswith(("base/", "PG_")) and rel_dir.count("/") == 2
    skip = unlogged_forks(names) if in_database_dir else set()
    prefix, folder = under or ("", None)
    for name in names:
        rel = f"{rel_dir}{name}"
        if name in skip or _excluded(rel, name, patterns):
            continue
        path = os.path.join(abs_dir, name)
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        src = None if folder is None else os.path.join(folder, rel)
        if rel == "pg_wal" and stat.S_ISLNK(st.st_mode):
            out.append(WalkEntry(prefix + rel, DIR, 0o700, st.st_mtime_ns, src=src))
            if keep_wal is not None:
                _add_wal(path, keep_wal, out)
            continue
        if rel_dir == TBLSPC_DIR + "/" and _tablespace(path, rel, st, patterns, out, tablespaces):
            continue
        if stat.S_ISLNK(st.st_mode):
            if rel_dir != "pg_tblspc/" or not name.isdigit():
                # a restore accepts links only where PostgreSQL makes them (the bucket is untrusted input)
                _log.warning("skipping %s: a symbolic link where PostgreSQL makes none", rel)
                continue
            out.append(WalkEntry(prefix + rel, SYMLINK, mode, st.st_mtime_ns, target=os.readlink(path), src=src))
        elif stat.S_ISDIR(st.st_mode):
            out.append(WalkEntry(prefix + rel, DIR, mode, st.st_mtime_ns, src=src))
            if rel == "pg_wal" and keep_wal is not None:
                _add_wal(path, keep_wal, out)
            if rel not in EXCLUDE_DIR_CONTENTS:
                _walk_dir(path, rel + "/", patterns, out, tablespaces, keep_wal, under)
        elif stat.S_ISREG(st.st_mode):
            out.append(WalkEntry(prefix + rel, FILE, mode, st.st_mtime_ns, size=st.st_size, src=src))
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
