"""The first backup's base copy, read straight from the source's data folder (as pgBackRest does),
when that folder is on this host: ``backup.copy_method`` ``auto`` (the default) or ``direct``.

Between ``pg_backup_start(label, fast)`` and ``pg_backup_stop()`` on one held connection
(:mod:`dbops.pg.onlinebackup`), the data folder is copied into the run's scratch folder by
several threads with the kernel's copy (:func:`dbops.filecopy.copy_range`: ``copy_file_range``,
``pread``/``pwrite`` of at most 1 MiB where that is refused;
large files in ranges, so the threads share the big relations). The server runs on meanwhile:
a page may be copied half old, half new, and files grow, shrink, appear or vanish. That is what
a base backup is: full_page_writes is forced while the backup runs, so replaying the WAL from
backup_label's REDO point (which the validation does before anything is stored) rewrites every
page changed after it. A file gone before it is read is left out (its removal is in that WAL).

Left out as pg_basebackup does (src/backend/backup/basebackup.c): the contents of pg_wal (its WAL
comes from the archive), pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots,
pg_stat_tmp and pg_subtrans; postmaster.pid/.opts, backup_label, tablespace_map, backup_manifest,
the signal files and other top-level leftovers of :mod:`dbops.repo.walk`; pgsql_tmp* and
pg_internal.init* anywhere; temporary relations (``t<N>_<relfilenode>``); every fork but
``_init`` of an unlogged relation. global/pg_control is copied last.

Each tablespace's version folder (``PG_15_<catversion>``) is copied into the run's scratch folder
for it and ``pg_tblspc/<OID>`` points there, never at the live location (as with pg_basebackup's
``--tablespace-mapping``; no tablespace_map is written, so recovery keeps those links).

The ranges are copied in the order a store walks the copy (by the path it has in a backup, see
:attr:`CopyPlan.paths`), and :class:`Copied` tells a reader following the copy (the store of the
copy, started with it) which ranges are complete: the store hashes and compresses what the copy
has written while the copy goes on, instead of after it.
"""

from __future__ import annotations

import heapq
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dbops import log
from dbops.ops.backup import tablespaces as tbs
from dbops.config import Node
from dbops.filecopy import copy_range
from dbops.pg.onlinebackup import OnlineBackup
from dbops.repo import walk
from dbops.repo.known import Known
from dbops.repo.manifest import DIR, FILE, SYMLINK, path_key
from dbops.repo.tblspc import TBLSPC_DIR, Tablespace

_log = log.get("backup.copy")

EXCLUDE_TOP = walk.EXCLUDE_TOP_FILES | {"backup_label", "tablespace_map", "backup_manifest"}
_TEMP_REL = re.compile(r"^t\d+_\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?$")
RANGE = 64 * 2**20  # bytes one thread copies at a time: a 1 GiB segment is shared out in 16 parts
PG_CONTROL = "global/pg_control"


@dataclass
class CopyPlan:
    dirs: list[tuple[Path, int]] = field(default_factory=list)  # (destination, mode), parents first
    links: list[tuple[Path, str]] = field(default_factory=list)  # (link in the copy, target)
    files: list[tuple[str, Path, int, int]] = field(default_factory=list)  # (source, destination, size, mode)
    control: tuple[str, Path, int, int] | None = None
    paths: dict[Path, str] = field(default_factory=dict)  # destination -> its path in a backup of the copy

    def entries(self) -> walk.Listing:
        """What a store of the copy lists, from the plan (for a store that follows the copy): every
        folder, tablespace link and file (read from its destination) but pg_control, by its path in
        a backup. Sizes are the planned ones (a file that shrank reads short: the store records it empty).
        In path order (folders, links and files are each planned in it: merged), kept compact."""
        dirs = (walk.WalkEntry(self.paths[d], DIR, mode, 0) for d, mode in self.dirs)
        links = (walk.WalkEntry(self.paths[link], SYMLINK, 0o777, 0, target=target) for link, target in self.links)
        files = (walk.WalkEntry(self.paths[dst], FILE, mode, 0, size, src=str(dst)) for _, dst, size, mode in self.files)
        return walk.Listing(heapq.merge(dirs, links, files, key=lambda e: path_key(e.path)))


class Copied:
    """The ranges of each destination file that the copy has finished (or found vanished), for a
    reader that follows the copy; :meth:`wait` blocks until a part of a file is complete.
    ``known``: each file's identity once its last range is written (:mod:`dbops.repo.known`): the
    reader read exactly that content, so a file nothing wrote since need not be read again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done: dict[str, set[int]] = {}
        self._failed = False
        self.known = Known()

    def mark(self, dst: str, offset: int) -> None:
        with self._cond:
            self._done.setdefault(dst, set()).add(offset)
            self._cond.notify_all()

    def fail(self) -> None:
        """The copy stopped: every waiter is released (and told so)."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def wait(self, dst: str, start: int, end: int, cancel: threading.Event | None = None) -> bool:
        """True once every range of dst overlapping [start, end) is copied; False when the copy
        failed or cancel was set first."""
        want = range(start - start % RANGE, end, RANGE)
        with self._cond:
            while True:
                done = self._done.get(dst, ())
                if all(o in done for o in want):
                    return True
                if self._failed or (cancel is not None and cancel.is_set()):
                    return False
                self._cond.wait(0.2)


@dataclass
class CopyStats:
    files: int = 0
    bytes: int = 0
    vanished: int = 0
    seconds: float = 0.0


def _owner(user: str) -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd

    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def plan_copy(backup: OnlineBackup, data: Path, ts: tbs.ScratchTablespaces, os_user: str) -> CopyPlan:
    """What to copy from the live folder into data (and the tablespace folders of ts)."""
    assert backup.data_dir is not None
    p = CopyPlan()
    src = backup.data_dir
    p.dirs.append((data, 0o700))
    p.paths[data] = "."
    _scan(str(src), data, "", p, backup, ts, os_user)
    return p


def _scan(src_dir: str, dst_dir: Path, rel_dir: str, p: CopyPlan, backup: OnlineBackup,
          ts: tbs.ScratchTablespaces | None, os_user: str, prefix: str = "") -> None:
    """Plan src_dir's entries (rel_dir: its path in the data folder or the tablespace's folder;
    prefix + rel_dir: its path in a backup)."""
    try:
        with os.scandir(src_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except FileNotFoundError:  # a database or relation folder dropped while the copy runs
        return
    in_db = rel_dir.startswith(("base/", "PG_")) and rel_dir.count("/") == 2
    skip = walk.unlogged_forks([e.name for e in entries]) if in_db else set()
    for e in entries:
        rel, dst = rel_dir + e.name, dst_dir / e.name
        if e.name in skip or (not rel_dir and e.name in EXCLUDE_TOP) or e.name.startswith(walk.EXCLUDE_PREFIXES) \
                or (in_db and _TEMP_REL.match(e.name)):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if rel == "pg_wal":  # a folder or a link elsewhere: an empty folder here, the WAL comes from the archive
            p.dirs += [(dst, 0o700), (dst / "archive_status", 0o700)]
            p.paths.update({dst: rel, dst / "archive_status": rel + "/archive_status"})
        elif rel_dir == TBLSPC_DIR + "/" and stat.S_ISLNK(st.st_mode) and ts is not None:
            _tablespace(e, dst, p, backup, ts, os_user)
        elif stat.S_ISLNK(st.st_mode):
            _log.warning("skipping %s: a symbolic link where PostgreSQL makes none", rel)
        elif stat.S_ISDIR(st.st_mode):
            p.dirs.append((dst, mode))
            p.paths[dst] = prefix + rel
            if rel not in walk.EXCLUDE_DIR_CONTENTS:
                _scan(e.path, dst, rel + "/", p, backup, ts, os_user, prefix)
        elif stat.S_ISREG(st.st_mode):
            item = (e.path, dst, st.st_size, mode)
            p.paths[dst] = prefix + rel
            if rel == PG_CONTROL:
                p.control = item
            else:
                p.files.append(item)


def _tablespace(e: os.DirEntry, link: Path, p: CopyPlan, backup: OnlineBackup, ts: tbs.ScratchTablespaces,
                os_user: str) -> None:
    """pg_tblspc/<OID>: a link to the run's folder for it; its version folder copied there."""
    if not e.name.isdigit():
        _log.warning("skipping %s/%s: not a tablespace OID", TBLSPC_DIR, e.name)
        return
    oid = int(e.name)
    if oid not in ts.known:  # created after the run listed them: it gets its scratch folder too
        ts.known[oid] = Tablespace(oid, str(oid), os.readlink(e.path))
        ts.prepare(os_user)
    folder = ts.folder(oid)
    p.links.append((link, str(folder)))
    p.paths[link] = f"{TBLSPC_DIR}/{oid}"
    version = backup.tablespace_dir
    src = os.path.join(e.path, version)
    try:
        st = os.stat(src)
    except FileNotFoundError:  # dropped meanwhile (an empty location has nothing to copy)
        return
    p.dirs.append((folder / version, stat.S_IMODE(st.st_mode)))
    p.paths[folder / version] = f"{TBLSPC_DIR}/{oid}/{version}"
    _scan(src, folder / version, version + "/", p, backup, None, os_user, f"{TBLSPC_DIR}/{oid}/")


def _copy_range(src: str, dst: Path, offset: int, count: int) -> tuple[int, bool]:
    """Copy [offset, offset+count) of src to the same place in dst (already created); (bytes, vanished)."""
    try:
        fin = os.open(src, os.O_RDONLY)
    except FileNotFoundError:
        if offset == 0:
            dst.unlink(missing_ok=True)
        return 0, True
    try:
        fout = os.open(dst, os.O_WRONLY)
    except FileNotFoundError:  # the first range found the source gone and removed it
        os.close(fin)
        return 0, True
    try:
        done = copy_range(fin, fout, offset, offset, count)  # short: the file shrank; replay rewrites or truncates it
    finally:
        os.close(fin)
        os.close(fout)
    return done, False


def execute(p: CopyPlan, *, os_user: str, workers: int, copied: Copied | None = None) -> CopyStats:
    """Make the folders and links, copy the files with `workers` threads in the order of their paths in a
    backup, pg_control last; each range done is marked in ``copied`` (failed there if the copy fails)."""
    try:
        return _execute(p, os_user, workers, copied)
    except BaseException:
        if copied is not None:
            copied.fail()
        raise


def _execute(p: CopyPlan, os_user: str, workers: int, copied: Copied | None) -> CopyStats:
    t0 = time.monotonic()
    owner = _owner(os_user)
    for d, mode in p.dirs:
        d.mkdir(mode=mode, exist_ok=True)
        os.chmod(d, mode)
        if owner:
            os.chown(d, *owner)
    for link, target in p.links:
        os.symlink(target, link)
        if owner:
            os.lchown(link, *owner)
    stats = CopyStats()

    def create(dst: Path, mode: int) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if owner:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)

    # In the order a store of the copy reads it (ranges of at most RANGE: the threads end together).
    # Each file is created just before its ranges are handed to the threads, so that the copy starts
    # at once: creating a thousand files took up to 0.8 s (the journal busy) before any byte moved.
    order = sorted(p.files, key=lambda f: path_key(p.paths.get(f[1], str(f[1]))))
    ranges_left = {dst: -(-size // RANGE) for _, dst, size, _ in p.files}
    lock = threading.Lock()

    def job(j: tuple[str, Path, int, int]) -> tuple[int, bool]:
        done = _copy_range(*j)
        if copied is not None:
            with lock:
                ranges_left[j[1]] -= 1
                last = not ranges_left[j[1]]
            if last:  # the file's last write by the copy (nothing else writes it until the server starts)
                copied.known.record(p.paths[j[1]], str(j[1]))
            copied.mark(str(j[1]), j[2])
        return done

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-copy") as pool:
        futures = []
        try:
            for src, dst, size, mode in order:
                create(dst, mode)
                futures += [pool.submit(job, (src, dst, off, min(RANGE, size - off))) for off in range(0, size, RANGE)]
            if p.control:
                create(p.control[1], p.control[3])
            for f in futures:
                n, vanished = f.result()
                stats.bytes += n
                stats.vanished += vanished
        except BaseException:  # a range failed, or the run is stopped: the ranges not begun are not copied
            for f in futures:
                f.cancel()
            raise
    if p.control:
        n, _ = _copy_range(p.control[0], p.control[1], 0, p.control[2])
        stats.bytes += n
    stats.files = len(p.files) + (1 if p.control else 0)
    stats.seconds = round(time.monotonic() - t0, 3)
    return stats


def write_label(data: Path, label: str, os_user: str) -> None:
    """The backup_label pg_backup_stop returned (tablespace_map is not written: the links are made)."""
    path = data / "backup_label"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, label.encode())
        owner = _owner(os_user)
        if owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def direct_base_backup(source: Node, data: Path, *, os_user: str, tablespaces: tbs.ScratchTablespaces,
                       workers: int, label: str,
                       follow: Callable[[CopyPlan, Copied], None] | None = None) -> CopyStats:
    """A base backup of source into data by copying its folder here. Raises
    :class:`~dbops.pg.onlinebackup.NotLocal` before the backup starts when the folder is not this
    host's to read (then nothing was written). ``follow(plan, copied)`` is called once the plan is
    made, before the copy starts (to start a reader that follows it)."""
    with OnlineBackup(source, label) as b:
        plan, copied = plan_copy(b, data, tablespaces, os_user), Copied()
        if follow is not None:
            follow(plan, copied)
        stats = execute(plan, os_user=os_user, workers=workers, copied=copied)
        label_text, _ = b.stop()
    write_label(data, label_text, os_user)
    log.event(_log, 20, "base backup copied from the data folder", source=source.name, folder=str(b.data_dir),
              files=stats.files, bytes=stats.bytes, vanished=stats.vanished, seconds=stats.seconds, workers=workers)
    return stats
