"""Restore side: a manifest + its packs back into a data folder.

The manifest's entries are read in passes (folders and files, content, links and finishing),
never all held at once. Content comes through :mod:`dbops.repo.ranges`: coalesced ranged GETs,
fetched in parallel (a bounded number in flight), each read as a stream one frame at a time, the
frames being checked held against a fixed byte budget (``IN_FLIGHT_BYTES``: memory does not grow
with the database or its ranges), every block checked against its sha256 and written with ``pwrite``. All-zero blocks are never fetched: files are created at full size
(sparse) and those blocks stay holes. A file is finished (fsynced, mode, owner, time) as soon as its
last range is written, by its own pool, while later ranges still download: the flush to disk
overlaps the download instead of following it. Page deltas (manifest format 4) are applied batch
by batch in the same pass (:mod:`dbops.repo.schedule`): a batch's whole blocks (a delta's base
block included), then its deltas, whose pages are checked against their sha256 and written over
their base blocks (:func:`dbops.repo.blocks.delta_writes`), while the next batch's whole blocks
download; a file with deltas is finished as soon as its batch is written. A batch whose deltas are
small has them fetched first and held, each applied in memory over its base block as that is
written (:mod:`dbops.repo.held`): one pass, every block written once.
Verification: :mod:`dbops.repo.verify`.
"""

from __future__ import annotations

import errno
import itertools
import os
import pwd
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from dbops import heap, log
from dbops.fsafe import NOFOLLOW
from dbops.repo import codec
from dbops.repo.manifest import DIR, FILE, SYMLINK, FileEntry, Manifest
from dbops.repo.blocks import delta_writes
from dbops.repo.finish import as_restored, finish_file, finish_files, finish_tree, mark_wal_archived, reset_unlogged
from dbops.repo.held import Held
from dbops.repo.ranges import (IN_FLIGHT_BYTES, ByteBudget, Frame, Range, Run, frame_chunks, frames_read, open_range,
                               run_bounded)
from dbops.repo.schedule import Batch, Completion
from dbops.repo.tblspc import finish_tablespace_roots, link_tablespaces, restored_links, tablespace_folders
from dbops.repo.verify import Problem, VerifyReport, verify_backup  # noqa: F401  (re-exported)
from dbops.errors import DamagedObjectError, NotFoundError, PreconditionError, ValidationError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.restore")

FLUSH_BYTES = 8 * 1024 * 1024  # a durable restore starts the disk writes of each file every this many bytes
_FADVISE = getattr(os, "POSIX_FADV_DONTNEED", None)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16)

Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


@dataclass
class RestoreStats:
    backup_id: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    logical_bytes: int = 0  # size of all restored files
    fetched_bytes: int = 0  # bytes read from storage
    chunks: int = 0  # distinct stored chunks fetched and verified
    requests: int = 0  # ranged GETs
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # create, fetch, finish (fsync)


# ---------------------------------------------------------------------- restore


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    if owner is None:
        return None
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise PreconditionError(f"no OS user named {owner!r} to own the restored files") from None
    return pw.pw_uid, pw.pw_gid


def make_links(target: Path, links: Iterable[FileEntry], ids: tuple[int, int] | None) -> int:
    """Create the recorded symbolic links other than tablespaces' (those point at the folders the
    restore chose, made first), after every file is written: nothing is written through them."""
    n = 0
    for e in links:
        if e.type == SYMLINK and e.path != "pg_wal":
            os.symlink(e.target or "", target / e.path)
            if ids:
                os.lchown(target / e.path, *ids)
            n += 1
    return n


def _prepare_target(target: Path, what: str | None = None) -> None:
    if target.exists():
        if not target.is_dir() or any(target.iterdir()):
            raise PreconditionError(
                f"restore target {what or target} exists and is not an empty folder",
                hint="restore into a new or empty folder",
            )
    else:
        target.mkdir(parents=True, mode=0o700)


def restore_snapshot(
    store: ObjectStore,
    layout: Layout,
    manifest: Manifest,
    target_dir: str,
    *,
    parallel: int,
    progress: Progress | None = None,
    owner: str | None = None,
    tablespace_dirs: Mapping[int, str] | None = None,
    durable: bool = True,
    on_file: Callable[[str], None] | None = None,
) -> RestoreStats:
    """Restore one backup into target_dir (new or empty), verified block by block, then fsynced.

    ``owner``: OS user to own every restored entry (e.g. "postgres" when running as root).
    ``tablespace_dirs``: {OID: folder (new or empty)} for every tablespace the backup lists; its
    link in pg_tblspc points there and its contents go there.
    ``durable=False``: no fsync, for a scratch copy that a crash would throw away anyway (the
    validation's copy, which its server replays into with ``fsync = off`` too).
    ``on_file(path)``: called with each file's path (relative) once its content is written for good
    (from a worker thread, before this returns; it must not raise): the validation saves pages then.
    Raises ValidationError naming the backup, file and object key on a bad or missing object.
    The manifest's entries are read in passes, never all held at once.
    """
    t0 = time.monotonic()
    heap.map_large_buffers()  # the ranges' 1 MiB read buffers given back when freed (dbops.heap)
    manifest.check()
    ids = _owner_ids(owner)
    target = Path(target_dir)
    dests = tablespace_folders(manifest, tablespace_dirs)
    _prepare_target(target)
    for t in manifest.tablespaces:
        _prepare_target(dests[t.oid], what=f"folder {dests[t.oid]} for tablespace {t.name} (OID {t.oid})")
    link_tablespaces(target, manifest, dests)
    stats = RestoreStats(manifest.backup_id)

    # 1. folders (writable for now), then every file created at its full size; never through a link
    # the bucket names (every entry was checked when the manifest was read, dbops.repo.untrusted;
    # the only links written through are the tablespaces', made above to folders chosen here).
    for e in map(as_restored, manifest.listing()):
        if e.type == DIR and e.path != ".":
            (target / e.path).mkdir(mode=0o700, exist_ok=True)
            stats.dirs += 1
        elif e.type == FILE:
            fd = os.open(target / e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, e.size)
            finally:
                os.close(fd)
            stats.files += 1
            stats.logical_bytes += e.size

    # 2. content: parallel ranged GETs, verified, written where it belongs.
    decoder = codec.Decoder()
    lock = threading.Lock()
    budget = ByteBudget(IN_FLIGHT_BYTES)  # the frames being checked: memory flat in database size
    done = [0]

    finisher = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-finish")
    finishing: deque[Future] = deque()  # not yet finished, or failed (raised at the end)

    def finish_later(f: FileEntry) -> None:  # called serialised (dbops.repo.schedule.Completion)
        finishing.append(finisher.submit(finish_file, target, f, ids, durable, on_file))
        while finishing and finishing[0].done() and finishing[0].exception() is None:  # no record per file kept
            finishing.popleft()

    def hold(files: list[FileEntry], rng: Range) -> tuple[str, list[tuple[Frame, bytes]]]:
        frames = held_frames(store, layout, manifest, files, rng)
        with lock:
            stats.fetched_bytes += sum(len(s) for _fr, s in frames)
            stats.requests += 1
        return layout.pack(rng.pack), frames

    completion = Completion(finish_later, hold)

    def fetch(item: tuple[list[FileEntry], Range, Batch]) -> None:
        files, rng, left = item
        try:
            fetched, written = write_range(store, layout, manifest, target, files, rng, decoder, budget=budget,
                                           flush=durable, held=left.held)
        except BaseException:
            completion.failed(left)
            raise
        completion.written(files, rng, left)
        with lock:
            stats.fetched_bytes += fetched
            stats.chunks += sum(fr.chunks() for fr in rng.frames)
            stats.requests += 1
            done[0] += written
            if progress:  # page deltas write some blocks twice
                progress(min(done[0], stats.logical_bytes), stats.logical_bytes)

    t_fetch = time.monotonic()
    workers = max(1, parallel)
    try:
        with heap.fewer_collections(), ThreadPoolExecutor(max_workers=workers,
                                                          thread_name_prefix="dbops-restore") as pool:
            run_bounded(pool, fetch, completion.planned(manifest), 2 * workers)
        for fut in finishing:
            fut.result()
    finally:
        finisher.shutdown(cancel_futures=True)

    t_finish = time.monotonic()
    # 3. the WAL folder PostgreSQL expects, modes, times, owner, fsync; the other links last.
    stats.symlinks += len(dests)
    (target / "pg_wal" / "archive_status").mkdir(parents=True, mode=0o700, exist_ok=True)
    status = mark_wal_archived(target, manifest)
    unlogged = reset_unlogged(target, manifest)

    # The files with stored content were finished as they completed (above).
    finish_files(target, itertools.chain((e for e in manifest.listing() if e.type == FILE and not e.size),
                                         unlogged, status), ids, parallel, durable)
    stats.symlinks += make_links(target, restored_links(manifest), ids)
    finish_tree(target, manifest, ids, durable)
    finish_tablespace_roots(dests, ids)
    t_end = time.monotonic()
    stats.seconds = round(t_end - t0, 3)
    stats.timings = {"create": round(t_fetch - t0, 3), "fetch": round(t_finish - t_fetch, 3),
                     "finish": round(t_end - t_finish, 3)}
    _log.info("restored backup %s into %s: %d files, %d bytes, %d requests, %.1f s", manifest.backup_id,
              target, stats.files, stats.logical_bytes, stats.requests, stats.seconds)
    return stats


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
                flush: bool = False, held: Held | None = None) -> tuple[int, int]:
    """Read one coalesced range (see dbops.repo.ranges) as it arrives, frame by frame, check every
    chunk against its sha256 and write it into the files, which exist at their size. Returns
    (bytes fetched, bytes written). Raises ValidationError naming the backup, file and object on a
    missing or damaged object. ``budget``: held for each frame's bytes while it is checked and written.
    ``flush``: start the disk writes of every ``FLUSH_BYTES`` written to a file (see ``_Flusher``).
    A page delta's pages are written over its base block, which is on disk when its range is read
    (:mod:`dbops.repo.schedule` hands a batch's deltas out after its whole blocks are written): a
    format 5 delta, compressed against its base, reads it back from the file to be decoded.
    ``held``: the batch's deltas held in memory, applied over their bases before those are written."""
    key = layout.pack(rng.pack)
    fds: dict[int, int] = {}
    flusher = _Flusher() if flush else None
    fetched = written = 0

    def fd_of(file_no: int) -> int:
        fd = fds.get(file_no)
        if fd is None:
            fd = fds[file_no] = os.open(target / files[file_no].path, os.O_RDWR | NOFOLLOW)
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


class _Flusher:
    """Starts the disk writes of what a range wrote, every ``FLUSH_BYTES`` per file, without waiting
    for them (as PostgreSQL's own writeback flushing does): the disk is kept busy from the first
    range on, instead of idling until the page cache holds its dirty-page limit, and the fsync
    when a file is complete has little left to write. ``posix_fadvise(DONTNEED)`` on pages just
    written starts their writeback (Linux); pages still being written stay cached."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[int, int]] = {}  # fd -> (lowest, highest) offset written since

    def wrote(self, fd: int, offset: int, n: int) -> None:
        lo, hi = self.pending.get(fd, (offset, offset))
        lo, hi = min(lo, offset), max(hi, offset + n)
        if hi - lo >= FLUSH_BYTES:
            self.flush(fd, lo, hi)
            self.pending.pop(fd, None)
        else:
            self.pending[fd] = (lo, hi)

    def all(self) -> None:
        for fd, (lo, hi) in self.pending.items():
            self.flush(fd, lo, hi)
        self.pending.clear()

    @staticmethod
    def flush(fd: int, lo: int, hi: int) -> None:
        if _FADVISE is not None and hi > lo:
            os.posix_fadvise(fd, lo, hi - lo, _FADVISE)
