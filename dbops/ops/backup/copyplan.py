"""What the direct copy of a data folder copies (:mod:`dbops.ops.backup.livecopy`): its plan.

The plan lists every folder, tablespace link and file to copy by its path in a backup of the copy,
in that path's order (:func:`~dbops.repo.manifest.path_key`: the order a store reads them, and the
copy's), in a :class:`~dbops.repo.walk.Listing` (a path's bytes and a few numbers in arrays, about
60 bytes a file), never a Python object per file: a cluster of a million relation files plans in
tens of MiB. A folder is listed by name (:class:`~dbops.repo.walk.Names`: sorted in runs, kept as
bytes), each entry then ``lstat``-ed alone. Where an entry is read from and written to follows from
its path (:meth:`CopyPlan.src`, :meth:`CopyPlan.dst`): the live folder and the copy hold it at the
same path, but for the contents of a tablespace (``pg_tblspc/<OID>/PG_15_<catversion>/...``),
written into the run's scratch folder for it.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from dbops import log
from dbops.ops.backup import tablespaces as tbs
from dbops.pg.onlinebackup import OnlineBackup
from dbops.repo import walk
from dbops.repo.manifest import DIR, FILE, SYMLINK, path_key
from dbops.repo.tblspc import TBLSPC_DIR, Tablespace

_log = log.get("backup.copy")

EXCLUDE_TOP = walk.EXCLUDE_TOP_FILES | {"backup_label", "tablespace_map", "backup_manifest"}
_TEMP_REL = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
PG_CONTROL = "global/pg_control"
_TS = TBLSPC_DIR + "/"


class _Entries(walk.Listing):
    """The plan's listing, each file's ``src`` its destination (where a store of the copy reads it):
    the same arrays, an entry made when asked for."""

    def __init__(self, base: walk.Listing, dst: Callable[[str], str]) -> None:  # noqa: super() not called: shared
        self.__dict__.update(base.__dict__)
        self._dst = dst

    def __getitem__(self, i: int) -> walk.WalkEntry:  # type: ignore[override]
        e = super().__getitem__(i)
        return e._replace(src=self._dst(e.path)) if e.type == FILE else e

    def __iter__(self) -> Iterator[walk.WalkEntry]:
        dst = self._dst
        for e in super().__iter__():
            yield e._replace(src=dst(e.path)) if e.type == FILE else e


class CopyPlan:
    """The folders, links and files to copy (``listing``: by their path in a backup, in path order,
    parents first; a link's ``target`` is the folder it points at in the copy), and pg_control
    (``control``: (source, destination, size, mode)), copied last and not listed."""

    def __init__(self, source: str, data: str) -> None:
        self.source, self.data = source, data  # the live data folder, the copy's
        self.listing = walk.Listing()
        self.control: tuple[str, str, int, int] | None = None
        self.tablespaces: dict[str, str] = {}  # OID -> the copy's folder for it (its link's target)

    def src(self, path: str) -> str:
        """Where the live folder holds backup path ``path`` (a tablespace's through its link)."""
        return self.source if path == "." else f"{self.source}/{path}"

    def dst(self, path: str) -> str:
        """Where the copy writes backup path ``path``."""
        if path == ".":
            return self.data
        if path.startswith(_TS):
            oid, sep, rest = path[len(_TS):].partition("/")
            if sep and oid in self.tablespaces:
                return f"{self.tablespaces[oid]}/{rest}"
        return f"{self.data}/{path}"

    def order_of(self, dst: str) -> tuple[str, ...] | None:
        """The path key of the entry the copy writes at ``dst`` (None: not in the copy)."""
        for oid, folder in self.tablespaces.items():
            if dst.startswith(folder + "/"):
                return path_key(f"{_TS}{oid}/{dst[len(folder) + 1:]}")
        if dst.startswith(self.data + "/"):
            return path_key(dst[len(self.data) + 1:])
        return None

    def files(self) -> Iterator[tuple[str, int, int]]:
        """(backup path, size, mode) of each file to copy but pg_control, in path order."""
        return ((e.path, e.size, e.mode) for e in self.listing if e.type == FILE)

    def entries(self) -> walk.Listing:
        """What a store of the copy lists, from the plan (for a store that follows the copy): every
        folder, tablespace link and file (read from its destination) but pg_control, by its path in
        a backup. Sizes are the planned ones (a file that shrank reads short: the store records it empty).
        In path order, the plan's own arrays (nothing made per file until asked for)."""
        return _Entries(self.listing, self.dst)


def plan_copy(backup: OnlineBackup, data: Path, ts: tbs.ScratchTablespaces | None, os_user: str) -> CopyPlan:
    """What to copy from the live folder into data (and the tablespace folders of ts)."""
    assert backup.data_dir is not None
    p = CopyPlan(str(backup.data_dir), str(data))
    p.listing.append(walk.WalkEntry(".", DIR, 0o700, 0))
    _scan(p.source, "", p, backup, ts, os_user)
    return p


def _scan(src_dir: str, rel_dir: str, p: CopyPlan, backup: OnlineBackup, ts: tbs.ScratchTablespaces | None,
          os_user: str, prefix: str = "") -> None:
    """Plan src_dir's entries (rel_dir: its path in the data folder or the tablespace's folder;
    prefix + rel_dir: its path in a backup), in path order."""
    try:
        names = walk.Names(src_dir)  # sorted, a few bytes a name: never a DirEntry (its paths and stat) each
    except FileNotFoundError:  # a database or relation folder dropped while the copy runs
        return
    in_db = rel_dir.startswith(("base/", "PG_")) and rel_dir.count("/") == 2
    skip = walk.unlogged_forks(names) if in_db else set()
    out = p.listing.append
    for name in names:
        rel = rel_dir + name
        if name in skip or (not rel_dir and name in EXCLUDE_TOP) or name.startswith(walk.EXCLUDE_PREFIXES) \
                or (in_db and _TEMP_REL.match(name)):
            continue
        path = f"{src_dir}/{name}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if rel == "pg_wal":  # a folder or a link elsewhere: an empty folder here, the WAL comes from the archive
            out(walk.WalkEntry(rel, DIR, 0o700, 0))
            out(walk.WalkEntry(rel + "/archive_status", DIR, 0o700, 0))
        elif rel_dir == _TS and stat.S_ISLNK(st.st_mode) and ts is not None:
            _tablespace(name, path, p, backup, ts, os_user)
        elif stat.S_ISLNK(st.st_mode):
            _log.warning("skipping %s: a symbolic link where PostgreSQL makes none", rel)
        elif stat.S_ISDIR(st.st_mode):
            out(walk.WalkEntry(prefix + rel, DIR, mode, 0))
            if rel not in walk.EXCLUDE_DIR_CONTENTS:
                _scan(path, rel + "/", p, backup, ts, os_user, prefix)
        elif stat.S_ISREG(st.st_mode):
            if rel == PG_CONTROL and not prefix:
                p.control = (path, p.dst(rel), st.st_size, mode)
            else:
                out(walk.WalkEntry(prefix + rel, FILE, mode, 0, st.st_size))


def _tablespace(name: str, path: str, p: CopyPlan, backup: OnlineBackup, ts: tbs.ScratchTablespaces,
                os_user: str) -> None:
    """pg_tblspc/<OID>: a link to the run's folder for it; its version folder copied there."""
    if not name.isdigit():
        _log.warning("skipping %s/%s: not a tablespace OID", TBLSPC_DIR, name)
        return
    oid = int(name)
    if oid not in ts.known:  # created after the run listed them: it gets its scratch folder too
        ts.known[oid] = Tablespace(oid, str(oid), os.readlink(path))
        ts.prepare(os_user)
    folder = str(ts.folder(oid))
    p.listing.append(walk.WalkEntry(f"{_TS}{oid}", SYMLINK, 0o777, 0, target=folder))
    p.tablespaces[str(oid)] = folder
    version = backup.tablespace_dir
    src = f"{path}/{version}"
    try:
        st = os.stat(src)
    except FileNotFoundError:  # dropped meanwhile (an empty location has nothing to copy)
        return
    p.listing.append(walk.WalkEntry(f"{_TS}{oid}/{version}", DIR, stat.S_IMODE(st.st_mode), 0))
    _scan(src, version + "/", p, backup, None, os_user, f"{_TS}{oid}/")
