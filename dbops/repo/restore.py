"""Restore side: a manifest + its packs back into a data folder.

The manifest's entries are read in passes (folders and files, content, links and finishing):
the content pass reads the stored entries with their block tables, one at a time, never all held at
once; the others read the listing kept compact for the restore (:mod:`dbops.repo.mlisting`), read
and checked once before anything is written. Content comes through :mod:`dbops.repo.ranges`: coalesced ranged GETs,
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
A range is read and written by :mod:`dbops.repo.rangewrite`. Verification: :mod:`dbops.repo.verify`.
"""

from __future__ import annotations

import itertools
import os
import pwd
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dbops import heap, log
from dbops.fsafe import NOFOLLOW
from dbops.repo import codec
from dbops.repo.manifest import DIR, FILE, SYMLINK, FileEntry, Manifest
from dbops.repo.mlisting import Listed
from dbops.repo.finish import as_restored, finish_file, finish_files, finish_tree, mark_wal_archived, reset_unlogged
from dbops.repo.rangewrite import Kept, held_frames, write_range
from dbops.repo.ranges import IN_FLIGHT_BYTES, ByteBudget, Frame, Range, run_bounded
from dbops.repo.schedule import Batch, Completion
from dbops.repo.tblspc import finish_tablespace_roots, link_tablespaces, restored_links, tablespace_folders
from dbops.repo.verify import Problem, VerifyReport, verify_backup  # noqa: F401  (re-exported)
from dbops.errors import PreconditionError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.restore")

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


def _mkdir(path: str) -> None:
    """``Path(path).mkdir(mode=0o700, exist_ok=True)`` without the Path."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _prepare_target(target: Path, what: str | None = None) -> None:
    if target.exists():
        if not target.is_dir() or any(target.iterdir()):
            raise PreconditionError(
                f"restore target {what or target} exists and is not an empty folder",
                hint="restore into a new or empty folder",
            )
    else:
        target.mkdir(parents=True, mode=0o700)


class Creator:
    """Every file of a restore created, in walk order, in a thread beside the download rather than
    before it: creating a file costs 0.02-1.1 ms on ext4 here (the inode's allocation, serialised in
    its folder), a thousand files up to a second, as long as the download of a small database. A range
    that reaches a file first creates it itself (:meth:`open`); the walk then finds it made (``O_EXCL``)
    and leaves it. Files are created empty: the writes give them their content, holes where no block
    is written (all zeros), and :meth:`sized` their full length once complete, before their time is set
    (a file's time is only right when nothing changes its length after it). Never through a link."""

    def __init__(self, base: str) -> None:
        self.base = base  # the target folder's path and a "/"
        self.stop = threading.Event()  # the restore failed: create no more

    def run(self, entries: Iterable[FileEntry]) -> None:
        """Create every file of ``entries`` (the listing) that a range has not created yet."""
        for e in entries:
            if e.type != FILE:
                continue
            if self.stop.is_set():
                return
            try:
                os.close(os.open(self.base + e.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600))
            except FileExistsError:
                pass

    def open(self, f: FileEntry) -> int:
        """A descriptor for writing into f, which is created when the walk has not reached it yet.
        Opened without ``O_CREAT`` first: an open that may create takes its folder's lock, which the
        walk holds while it allocates an inode (up to a millisecond here)."""
        try:
            return os.open(self.base + f.path, os.O_RDWR | NOFOLLOW)
        except FileNotFoundError:
            return os.open(self.base + f.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)

    def sized(self, f: FileEntry) -> None:
        """f, complete, at its full length (created now when it has no block to write: all zeros)."""
        fd = self.open(f)
        try:
            if f.size and os.fstat(fd).st_size < f.size:
                os.ftruncate(fd, f.size)
        finally:
            os.close(fd)


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
    drop_cache: bool | None = None,
    on_file: Callable[[str], None] | None = None,
) -> RestoreStats:
    """Restore one backup into target_dir (new or empty), verified block by block, then fsynced.

    ``owner``: OS user to own every restored entry (e.g. "postgres" when running as root).
    ``tablespace_dirs``: {OID: folder (new or empty)} for every tablespace the backup lists; its
    link in pg_tblspc points there and its contents go there.
    ``durable=False``: no fsync, for a scratch copy that a crash would throw away anyway (the
    validation's copy, which its server replays into with ``fsync = off`` too).
    ``drop_cache``: whether the pages written past the first ``KEEP_CACHED`` bytes are written back
    and dropped from the page cache as the restore goes (:class:`dbops.repo.rangewrite.Flusher`);
    None: when durable (a durable restore's fsyncs write them anyway). A scratch copy too large to
    stay cached is given True (:func:`dbops.ops.backup.validate.scratch_cached`, ``backup.scratch_cache``).
    ``on_file(path)``: called with each file's path (relative) once its content is written for good
    (from a worker thread, before this returns; it must not raise): the validation saves pages then.
    Raises ValidationError naming the backup, file and object key on a bad or missing object.
    The manifest's block tables are read in one pass, never all held at once; its listing (path,
    type, mode, time, size of each entry) is kept compact for the other passes, for this call only.
    """
    t0 = time.monotonic()
    # the passes other than the content's read the listing kept compact (dbops.repo.mlisting), read
    # and checked once here, before anything is written, instead of the stored entries once a pass
    with manifest.kept_listing() as listed:
        return _restore(store, layout, manifest, Path(target_dir), t0, listed, parallel=parallel, progress=progress,
                        owner=owner, tablespace_dirs=tablespace_dirs, durable=durable,
                        drop_cache=durable if drop_cache is None else drop_cache, on_file=on_file)


def _restore(store: ObjectStore, layout: Layout, manifest: Manifest, target: Path, t0: float, listed: Listed | None,
             *, parallel: int, progress: Progress | None, owner: str | None,
             tablespace_dirs: Mapping[int, str] | None, durable: bool, drop_cache: bool,
             on_file: Callable[[str], None] | None) -> RestoreStats:
    heap.map_large_buffers()  # the ranges' 1 MiB read buffers given back when freed (dbops.heap)
    manifest.check()
    ids = _owner_ids(owner)
    dests = tablespace_folders(manifest, tablespace_dirs)
    _prepare_target(target)
    for t in manifest.tablespaces:
        _prepare_target(dests[t.oid], what=f"folder {dests[t.oid]} for tablespace {t.name} (OID {t.oid})")
    link_tablespaces(target, manifest, dests)
    stats = RestoreStats(manifest.backup_id)

    # 1. folders (writable for now); every file is then created at its full size beside the download
    # (Creator); never through a link the bucket names (every entry was checked when the manifest was
    # read, dbops.repo.untrusted; the only links written through are the tablespaces', made above to
    # folders chosen here).
    base = os.path.join(target, "")  # the target's path and a "/": no Path made per entry
    for e in map(as_restored, manifest.listing()):
        if e.type == DIR and e.path != ".":
            _mkdir(base + e.path)
            stats.dirs += 1
        elif e.type == FILE:
            stats.files += 1
            stats.logical_bytes += e.size
    creator = Creator(base)

    # 2. content: parallel ranged GETs, verified, written where it belongs.
    decoder = codec.Decoder()
    lock = threading.Lock()
    budget = ByteBudget(IN_FLIGHT_BYTES)  # the frames being checked: memory flat in database size
    done = [0]

    finisher = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-finish")
    finishing: deque[Future] = deque()  # not yet finished, or failed (raised at the end)

    def finish(f: FileEntry) -> None:
        creator.sized(f)
        finish_file(target, f, ids, durable, on_file)

    def finish_later(f: FileEntry) -> None:  # called serialised (dbops.repo.schedule.Completion)
        finishing.append(finisher.submit(finish, f))
        while finishing and finishing[0].done() and finishing[0].exception() is None:  # no record per file kept
            finishing.popleft()

    def hold(files: list[FileEntry], rng: Range) -> tuple[str, list[tuple[Frame, bytes]]]:
        frames = held_frames(store, layout, manifest, files, rng)
        with lock:
            stats.fetched_bytes += sum(len(s) for _fr, s in frames)
            stats.requests += 1
        return layout.pack(rng.pack), frames

    completion = Completion(finish_later, hold)
    kept = Kept()  # the first pages written stay cached, the rest are dropped once written back

    def fetch(item: tuple[list[FileEntry], Range, Batch]) -> None:
        files, rng, left = item
        try:
            fetched, written = write_range(store, layout, manifest, target, files, rng, decoder, budget=budget,
                                           flush=drop_cache, held=left.held, kept=kept, opener=creator.open)
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
    creating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-create")
    try:
        created = creating.submit(creator.run, manifest.listing())
        with heap.fewer_collections(), ThreadPoolExecutor(max_workers=workers,
                                                          thread_name_prefix="dbops-restore") as pool:
            run_bounded(pool, fetch, completion.planned(manifest), 2 * workers)
        created.result()  # the files without stored content (empty, all zero) too
        for fut in finishing:
            fut.result()
    finally:
        creator.stop.set()
        creating.shutdown(wait=True)
        finisher.shutdown(cancel_futures=True)

    t_finish = time.monotonic()
    # 3. the WAL folder PostgreSQL expects, modes, times, owner, fsync; the other links last.
    stats.symlinks += len(dests)
    (target / "pg_wal" / "archive_status").mkdir(parents=True, mode=0o700, exist_ok=True)
    status = mark_wal_archived(target, manifest)
    unlogged = reset_unlogged(target, manifest, listed)

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
