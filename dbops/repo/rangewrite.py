"""One coalesced range of a pack read and written into the restored files: every chunk checked
against its sha256, page deltas written over their base blocks (or held deltas applied over them),
short writes carried on, the disk writes started as a range goes (``Flusher``). Used by
:mod:`dbops.repo.restore` and ``restore --delta`` (:mod:`dbops.ops.restore.delta`)."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from dbops.fsafe import NOFOLLOW
from dbops.repo import codec
from dbops.repo.manifest import FileEntry, Manifest
from dbops.repo.blocks import delta_writes
from dbops.repo.held import Held
from dbops.repo.ranges import ByteBudget, Frame, Range, Run, frame_chunks, frames_read, open_range
from dbops.errors import DamagedObjectError, NotFoundError, ValidationError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

FLUSH_BYTES = 8 * 1024 * 1024  # a durable restore starts the disk writes of each file every this many bytes
DROP_LAG = 32 * 1024 * 1024  # and waits for them, dropping their pages, once this many more are started (a range)
_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", None)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16)


def _damaged(manifest: Manifest, path: str, detail: str) -> ValidationError:
    return ValidationError(f"backup {manifest.backup_id}: {path} is damaged in storage", detail=detail,
                           hint="the backup cannot be restored; run `dbops verify` and take a new backup")


def _missing(manifest: Manifest, key: str, path: str) -> ValidationError:
    return ValidationError(f"backup {manifest.backup_id}: pack object {key} is missing", detail=f"needed for {path}",
                           hint="the backup cannot be restored; run `dbops verify` and take a new backup")


def held_frames(store: ObjectStore, layout: Layout, manifest: Manifest, files: list[FileEntry],
                rng: Range) -> list[tuple[Frame, bytes]]:
    """A range of page deltas read whole, (frame, stored bytes) each, to be held (:mod:`dbops.repo.held`);
    checked as they are applied. Raises ValidationError for a missing or damaged (encrypted) object."""
    key = layout.pack(rng.pack)
    try:
        with open_range(store, key, rng) as src:
            return [(fr, bytes(stored)) for fr, stored in frames_read(src, rng)]
    except NotFoundError:
        raise _missing(manifest, key, files[rng.first_file].path) from None
    except DamagedObjectError as e:
        raise _damaged(manifest, files[rng.first_file].path, e.message) from None


def write_range(store: ObjectStore, layout: Layout, manifest: Manifest, target: Path, files: list[FileEntry],
                rng: Range, decoder: codec.Decoder, *, budget: ByteBudget | None = None,
                flush: bool = False, held: Held | None = None, kept: Kept | None = None,
                opener: Callable[[FileEntry], int] | None = None) -> tuple[int, int]:
    """Read one coalesced range (see dbops.repo.ranges) as it arrives, frame by frame, check every
    chunk against its sha256 and write it into the files, which exist at their size. Returns
    (bytes fetched, bytes written). Raises ValidationError naming the backup, file and object on a
    missing or damaged object. ``budget``: held for each frame's bytes while it is checked and written.
    ``flush``: start the disk writes of every ``FLUSH_BYTES`` written to a file (see ``Flusher``);
    ``kept``: the restore's pages left cached so far (pages are dropped only past its limit).
    A page delta's pages are written over its base block, which is on disk when its range is read
    (:mod:`dbops.repo.schedule` hands a batch's deltas out after its whole blocks are written): a
    format 5 delta, compressed against its base, reads it back from the file to be decoded.
    ``held``: the batch's deltas held in memory, applied over their bases before those are written.
    ``opener(file)``: a descriptor open for writing on the file (:class:`dbops.repo.restore.Creator`,
    which may create it); without it the files exist and are opened here."""
    key = layout.pack(rng.pack)
    fds: dict[int, int] = {}
    flusher = Flusher(kept) if flush else None
    fetched = written = 0

    def fd_of(file_no: int) -> int:
        fd = fds.get(file_no)
        if fd is None:
            fd = fds[file_no] = (opener(files[file_no]) if opener is not None
                                 else os.open(target / files[file_no].path, os.O_RDWR | NOFOLLOW))
        return fd

    def base_of(fr: Frame, run: Run) -> bytes:
        """A format 5 delta's base block (its zstd dictionary), written and checked at its place before it."""
        return base_block(fd_of(run.file_no), run, files[run.file_no])
    try:
        with open_range(store, key, rng) as src, closing(frames_read(src, rng, budget)) as frames:
            for fr, stored in frames:
                fetched += len(stored)
                for run, raw, why in frame_chunks(decoder, fr, stored, base_of):
                    if raw is None:
                        raise _damaged(manifest, files[run.file_no].path, f"object {key}: {why}")
                    fd = fd_of(run.file_no)
                    if run.mask:  # a page delta: its pages over its base block, written (and checked) before
                        for at, pages in delta_writes(raw, run.mask, block_len(files[run.file_no], run)):
                            write_all(fd, pages, run.offset + at)
                    elif held is not None and held.by_block:  # the held deltas of its blocks applied
                        pieces, why = held.over(decoder, run, raw)
                        if why:
                            raise _damaged(manifest, files[run.file_no].path, why)
                        if pieces is None:
                            write_all(fd, raw, run.offset)
                        else:
                            write_pieces(fd, pieces, run.offset)
                    else:
                        write_all(fd, raw, run.offset)
                    written += len(raw)
                    if flusher:
                        flusher.wrote(fd, run.offset, len(raw))
            if flusher:
                flusher.all()
    except NotFoundError:
        raise _missing(manifest, key, files[rng.first_file].path) from None
    except DamagedObjectError as e:  # an encrypted segment failed its authentication tag
        raise _damaged(manifest, files[rng.first_file].path, e.message) from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return fetched, written


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` of data at offset; a short write goes on with the rest (:func:`write_pieces`)."""
    n = os.pwrite(fd, data, offset)
    if n != len(data):
        write_pieces(fd, [memoryview(data)[n:]], offset + n)


def write_pieces(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Write the pieces one after the other from offset: ``pwritev`` (``IOV_MAX`` pieces a call). A
    short write (a disk filling up, a signal) goes on with the rest, as POSIX asks: the next call
    writes it or fails with the real cause (ENOSPC, EIO), which callers report as such."""
    for k in range(0, len(pieces), _IOV_MAX):
        part = pieces[k:k + _IOV_MAX]
        while part:
            n = os.pwritev(fd, part, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"write returned {n} at offset {offset}")
            offset += n
            while part and n >= len(part[0]):
                n -= len(part[0])
                part = part[1:]
            if part and n:
                part = [part[0][n:], *part[1:]]


def block_len(f: FileEntry, run: Run) -> int:
    """The length of the block a page delta's run belongs to (its base's)."""
    return f.chunks[run.offset // f.block].raw


def base_block(fd: int, run: Run, f: FileEntry) -> bytes:
    """The base block of a page delta's run, as written (checked against its sha256) before it."""
    return os.pread(fd, block_len(f, run), run.offset)


class Flusher:
    """The disk writes of what a range wrote, started every ``FLUSH_BYTES`` per file without waiting
    for them (as PostgreSQL's own writeback flushing does), then, once ``DROP_LAG`` bytes more have
    been started, waited for and their pages dropped from the page cache; the rest when the range
    is written (:meth:`all`); a restore's first ``KEEP_CACHED`` bytes are not dropped (:class:`Kept`).
    The disk is kept busy from the first range on, the fsync when a file is complete has nothing
    left to write, and the page cache a restore dirties stays at that plus a few windows a worker
    instead of the size of the database: its pages are freed and taken again for
    the next writes, where fresh pages cost far more on a VM whose free memory goes back to its host
    (measured: 6 GiB written, an fsync a GiB, 12.7-14.8 s, 10.5-12.4 s of it kernel CPU; the same
    with the windows dropped 2.2-2.6 s; a scale-400 restore's download 9.7-12.5 s -> 6.4-7.6 s,
    docs/backups.md). Nothing here makes a file durable: that is still its fsync
    (:func:`dbops.repo.finish.finish_file`).

    Linux: ``sync_file_range`` (started, then waited for) and ``posix_fadvise(DONTNEED)``, which only
    drops pages that are clean. An error that writeback reports while waited for is raised (the
    restore fails with it): once reported it would not be reported again to the file's fsync.
    Elsewhere, or where the file system refuses ``sync_file_range``: ``posix_fadvise(DONTNEED)``
    alone, which starts the writeback of dirty pages and drops none of them."""

    def __init__(self, kept: Kept | None = None) -> None:
        self.kept = kept
        self.pending: dict[int, tuple[int, int]] = {}  # fd -> (lowest, highest) offset written since
        self.started: deque[tuple[int, int, int]] = deque()  # (fd, lo, hi) whose writeback was started
        self.started_bytes = 0

    def wrote(self, fd: int, offset: int, n: int) -> None:
        lo, hi = self.pending.get(fd, (offset, offset))
        lo, hi = min(lo, offset), max(hi, offset + n)
        if hi - lo >= FLUSH_BYTES:
            self.flush(fd, lo, hi)
            self.pending.pop(fd, None)
        else:
            self.pending[fd] = (lo, hi)

    def all(self) -> None:
        """Every window started, then waited for and dropped (before the range's files are closed)."""
        for fd, (lo, hi) in self.pending.items():
            self.flush(fd, lo, hi)
        self.pending.clear()
        while self.started:
            self._drop(*self.started.popleft())
        self.started_bytes = 0

    def flush(self, fd: int, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        if not _start_writeback(fd, lo, hi - lo):
            if _FADVISE is not None:
                os.posix_fadvise(fd, lo, hi - lo, _FADVISE)
            return
        if self.kept is not None and self.kept.keep(hi - lo):
            return  # left cached: the restore's first KEEP_CACHED bytes
        self.started.append((fd, lo, hi))
        self.started_bytes += hi - lo
        while self.started_bytes > DROP_LAG:
            fd0, lo0, hi0 = self.started.popleft()
            self.started_bytes -= hi0 - lo0
            self._drop(fd0, lo0, hi0)

    @staticmethod
    def _drop(fd: int, lo: int, hi: int) -> None:
        """Wait for the window's writeback (raises its error), then drop its pages, clean now."""
        _sync_range(fd, lo, hi - lo, _SRF_WAIT_BEFORE | _SRF_WRITE | _SRF_WAIT_AFTER)
        if _FADVISE is not None:
            os.posix_fadvise(fd, lo, hi - lo, _FADVISE)


KEEP_CACHED = 2 << 30  # a restore's first bytes written are left in the page cache (replay reads them)


class Kept:
    """The bytes a restore has left in the page cache (written back, not dropped), across its ranges:
    up to ``limit`` they stay (a restore of a small database keeps its pages cached, for the
    replay that follows, as before), past it each window is dropped (:class:`Flusher`)."""

    def __init__(self, limit: int = KEEP_CACHED) -> None:
        self.limit, self.bytes = limit, 0
        self._lock = threading.Lock()

    def keep(self, n: int) -> bool:
        """Whether n more bytes stay cached (counted) or are to be dropped."""
        with self._lock:
            if self.bytes + n > self.limit:
                return False
            self.bytes += n
            return True


# sync_file_range(2)'s flags (Linux)
_SRF_WAIT_BEFORE, _SRF_WRITE, _SRF_WAIT_AFTER = 1, 2, 4
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ESPIPE}


@functools.lru_cache(maxsize=1)
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (called without the GIL), or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux") or _FADVISE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_refused = [False]  # the file system refused sync_file_range once: not asked again


def _start_writeback(fd: int, offset: int, n: int) -> bool:
    """True when the writeback of the range was started (``sync_file_range``), False where it cannot be."""
    if _refused[0] or _sync_file_range() is None:
        return False
    try:
        _sync_range(fd, offset, n, _SRF_WRITE)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        _refused[0] = True
        return False
    return True


def _sync_range(fd: int, offset: int, n: int, flags: int) -> None:
    fn = _sync_file_range()
    if fn is not None and fn(fd, offset, n, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")
