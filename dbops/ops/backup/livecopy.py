"""The first backup's base copy, read straight from the source's data folder (as pgBackRest does),
when that folder is on this host: ``backup.copy_method`` ``auto`` (the default) or ``direct``.

Between ``pg_backup_start(label, fast)`` and ``pg_backup_stop()`` on one held connection
(:mod:`dbops.pg.onlinebackup`), the data folder is copied into the run's scratch folder by
several threads with the kernel's copy (:func:`dbops.filecopy.copy_range`: ``copy_file_range``,
``pread``/``pwrite`` of at most 1 MiB where that is refused; large files in ranges, so the threads
share the big relations, handed out side by side: a range of one file, then one of the next, so
that the threads copy different files at once). The server runs on meanwhile: a page may be
copied half old, half new, and files grow, shrink, appear or vanish. That is what a base backup is:
full_page_writes is forced while the backup runs, so replaying the WAL from backup_label's REDO
point (which the validation does before anything is stored) rewrites every page changed after it.
A file gone before it is read is left out (its removal is in that WAL).

Left out as pg_basebackup does (src/backend/backup/basebackup.c): the contents of pg_wal (its WAL
comes from the archive), pg_replslot, pg_dynshmem, pg_notify, pg_serial, pg_snapshots,
pg_stat_tmp and pg_subtrans; postmaster.pid/.opts, backup_label, tablespace_map, backup_manifest,
the signal files and other top-level leftovers of :mod:`dbops.repo.walk`; pgsql_tmp* and
pg_internal.init* anywhere; temporary relations (``t<N>_<relfilenode>``); every fork but
``_init`` of an unlogged relation. global/pg_control is copied last.

Each tablespace's version folder (``PG_15_<catversion>``) is copied into the run's scratch folder
for it and ``pg_tblspc/<OID>`` points there, never at the live location (as with pg_basebackup's
``--tablespace-mapping``; no tablespace_map is written, so recovery keeps those links).

The ranges are copied in the order a store walks the copy (by the path it has in a backup: the
plan is made in that order, see :mod:`dbops.ops.backup.copyplan`), at most ``WINDOW`` ranges a thread
ahead of the threads, and :class:`Copied` tells a reader following the copy (the store of the
copy, started with it) which ranges are complete: the store hashes and compresses what the copy
has written while the copy goes on, instead of after it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dbops import log
from dbops.config import Node
from dbops.filecopy import copy_range
from dbops.ops.backup import tablespaces as tbs
from dbops.ops.backup.copyplan import EXCLUDE_TOP, PG_CONTROL, CopyPlan, plan_copy  # noqa: F401 (the copy's plan)
from dbops.pg.onlinebackup import OnlineBackup
from dbops.repo.known import Known
from dbops.repo.manifest import DIR, FILE, path_key

_log = log.get("backup.copy")

RANGE = 64 * 2**20  # bytes one thread copies at a time: a 1 GiB segment is shared out in 16 parts
WINDOW = 1024  # ranges handed out ahead per thread (a few hundred bytes each; the rest of the plan waits)


class Copied:
    """The ranges of each destination file that the copy has finished (or found vanished), for a
    reader that follows the copy; :meth:`wait` blocks until a part of a file is complete.
    ``known``: each file's identity once its last range is written (:mod:`dbops.repo.known`): the
    reader read exactly that content, so a file nothing wrote since need not be read again.

    Compact: the copy begins its files in path order (:meth:`begin`), so only the files begun and
    not yet complete, or complete after one that is not, are held (a bit a range each); every file
    before them is complete, known by its path's order (``order``: the path key of a destination;
    the plan's :meth:`~CopyPlan.order_of` once the copy starts, else the destination's own)."""

    def __init__(self, order: Callable[[str], tuple[str, ...] | None] | None = None) -> None:
        self._cond = threading.Condition()
        self._open: dict[str, list[int]] = {}  # destination -> [ranges, a bit each one done]
        self._begun: deque[str] = deque()  # the files in _open, in the order begun
        self._last: str | None = None  # the last file begun that is complete with every one before it
        self._last_key: tuple[str, tuple[str, ...] | None] | None = None  # (_last, its order)
        self._failed = False
        self.order = order
        self.known = Known()

    def begin(self, dst: str, ranges: int) -> None:
        """The copy hands out the ranges of dst (after every file before it in path order)."""
        if ranges:
            with self._cond:
                self._open[dst] = [ranges, 0]
                self._begun.append(dst)

    def mark(self, dst: str, offset: int, path: str | None = None) -> None:
        """The range of dst at offset is written; at its file's last, the file's identity is recorded
        in ``known`` as backup path ``path`` (before any reader is told)."""
        with self._cond:
            f = self._open[dst]
            f[1] |= 1 << (offset // RANGE)
            if f[1] == (1 << f[0]) - 1:
                if path is not None:  # the file's last write by the copy (nothing else writes it until the server starts)
                    self.known.record(path, dst)
                while self._begun and (g := self._open[self._begun[0]])[1] == (1 << g[0]) - 1:
                    self._last = self._begun.popleft()
                    del self._open[self._last]
            self._cond.notify_all()

    def fail(self) -> None:
        """The copy stopped: every waiter is released (and told so)."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def _complete(self, dst: str) -> bool:
        if self._last is None:
            return False
        order = self.order or path_key
        if self._last_key is None or self._last_key[0] != self._last:
            self._last_key = (self._last, order(self._last))
        key, last = order(dst), self._last_key[1]
        return key is not None and last is not None and key <= last

    def wait(self, dst: str, start: int, end: int, cancel: threading.Event | None = None) -> bool:
        """True once every range of dst overlapping [start, end) is copied; False when the copy
        failed or cancel was set first."""
        first = start // RANGE
        if first * RANGE >= end:
            return True
        want = (1 << -(-end // RANGE)) - (1 << first)
        with self._cond:
            while True:
                f = self._open.get(dst)
                if (f[1] & want == want) if f is not None else self._complete(dst):
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


def _copy_range(src: str, dst: str, offset: int, count: int) -> tuple[int, bool]:
    """Copy [offset, offset+count) of src to the same place in dst (already created); (bytes, vanished)."""
    try:
        fin = os.open(src, os.O_RDONLY)
    except FileNotFoundError:
        if offset == 0:
            try:
                os.unlink(dst)
            except FileNotFoundError:
                pass
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


class _Workers:
    """``n`` threads copying the ranges handed to them (:meth:`put`), at most ``WINDOW`` a thread
    ahead of them: :meth:`put` waits for room, so nothing is held per range of the plan. The first
    error is raised by the next :meth:`put` or by :meth:`close`; the ranges not begun then are skipped."""

    def __init__(self, n: int, copied: Copied | None) -> None:
        self.copied = copied
        self.jobs: queue.Queue[tuple[str, str, int, int, str] | None] = queue.Queue(WINDOW * n)
        self.errors: list[BaseException] = []
        self.bytes = self.vanished = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"dbops-copy_{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        copied, got, gone = self.copied, 0, 0
        while (j := self.jobs.get()) is not None:
            if self.errors:
                continue
            try:
                n, vanished = _copy_range(j[0], j[1], j[2], j[3])
                got, gone = got + n, gone + vanished
                if copied is not None:
                    copied.mark(j[1], j[2], j[4])
            except BaseException as e:  # noqa: BLE001 (raised in the thread handing out the ranges)
                self.errors.append(e)
        with self.lock:
            self.bytes += got
            self.vanished += gone

    def put(self, job: tuple[str, str, int, int, str]) -> None:
        if self.errors:
            raise self.errors[0]
        self.jobs.put(job)

    def close(self, stop: bool) -> None:
        """Wait for the threads (``stop``: skipping the ranges not begun); raise the first error."""
        if stop:
            self.errors.append(RuntimeError("the copy was stopped"))
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
        if self.errors and not stop:
            raise self.errors[0]


class _SideBySide:
    """The ranges of large files handed out a range of each file in turn, ``n`` files at a time (the
    threads' number), so that the threads copy different files at once. Linux lets one writer at a
    time into a file (the inode's lock, held while the written pages are taken and filled), and
    threads copying ranges of one file spin waiting for it: on a 2-core VM, four threads copying
    four 1 GiB files (warm in the page cache) in 64 MiB ranges took 4.5-6.7 s, kernel CPU 7.0-10.6 s,
    in file order, 1.7 s, kernel CPU 3.0-3.2 s, with consecutive ranges from different files. A
    file is begun (created) in the plan's order as before; its ranges follow a little later: each
    small file handed out (one range) is followed by a range of each large file waiting, so large
    files never wait long behind small ones (the store following the copy reads in the plan's order,
    and :class:`Copied` holds the files complete after one that is not)."""

    def __init__(self, pool: _Workers, n: int) -> None:
        self.pool, self.n = pool, max(1, n)
        self.files: deque[list] = deque()  # [src, dst, size, path, next offset]

    def add(self, src: str, dst: str, size: int, path: str) -> None:
        self.files.append([src, dst, size, path, 0])
        while len(self.files) >= self.n:
            self._round()

    def small(self, job: tuple[str, str, int, int, str]) -> None:
        self.pool.put(job)
        if self.files:
            self._round()

    def drain(self) -> None:
        while self.files:
            self._round()

    def _round(self) -> None:
        for _ in range(len(self.files)):
            f = self.files.popleft()
            src, dst, size, path, off = f
            self.pool.put((src, dst, off, min(RANGE, size - off), path))
            f[4] = off + RANGE
            if f[4] < size:
                self.files.append(f)


def _execute(p: CopyPlan, os_user: str, workers: int, copied: Copied | None) -> CopyStats:
    t0 = time.monotonic()
    owner = _owner(os_user)
    stats = CopyStats()

    def create(dst: str, mode: int) -> None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if owner:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)

    if copied is not None:  # the files are begun in the plan's order: a file before the last complete one is
        copied.order = p.order_of
    # One pass over the plan, in the order a store of the copy reads it: each folder made before what
    # it holds, each file created just before its ranges (of at most RANGE: the threads end together;
    # a large file's side by side with the next ones', _SideBySide) are handed to the threads, so that
    # the copy starts at once: creating a thousand files took up to 0.8 s (the journal busy) before
    # any byte moved.
    pool = _Workers(workers, copied)
    ranges = _SideBySide(pool, workers)
    try:
        for e in p.listing:
            dst = p.dst(e.path)
            if e.type == DIR:
                try:
                    os.mkdir(dst, e.mode)
                except FileExistsError:
                    pass
                os.chmod(dst, e.mode)
                if owner:
                    os.chown(dst, *owner)
            elif e.type == FILE:
                create(dst, e.mode)
                stats.files += 1
                if copied is not None:
                    copied.begin(dst, -(-e.size // RANGE))
                if e.size > RANGE:  # its ranges shared out side by side with the next large files'
                    ranges.add(p.src(e.path), dst, e.size, e.path)
                elif e.size:
                    ranges.small((p.src(e.path), dst, 0, e.size, e.path))
            else:
                os.symlink(e.target or "", dst)
                if owner:
                    os.lchown(dst, *owner)
        ranges.drain()
        if p.control:
            create(p.control[1], p.control[3])
    except BaseException:  # a range failed, or the run is stopped: the ranges not begun are not copied
        pool.close(stop=True)
        raise
    pool.close(stop=False)
    stats.bytes, stats.vanished = pool.bytes, pool.vanished
    if p.control:
        n, _ = _copy_range(p.control[0], p.control[1], 0, p.control[2])
        stats.bytes += n
        stats.files += 1
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
