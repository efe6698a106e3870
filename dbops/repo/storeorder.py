"""The order a store processes a data folder in: the walk's entries in path order, the parent
manifest read alongside (positional reuse, no dictionary), each file cut into units of up to
``UNIT_BYTES`` handed to ``workers`` threads, at most ``WINDOW`` units a worker in flight, and each
file's entry written to the manifest once its units are done, in walk order (see
:mod:`dbops.repo.store`, whose snapshot processes a unit)."""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from dbops.repo import blocks, mformat, walk
from dbops.repo.known import Known
from dbops.repo.manifest import FILE, ChunkRef, FileEntry, Manifest, path_key

UNIT_BYTES = 32 * 1024 * 1024
WINDOW = 4  # units in flight per worker


@dataclass(frozen=True)
class Unit:
    path: str
    start: int
    end: int
    block: int
    parent: tuple[ChunkRef, ...]  # the parent's blocks of this file (same block size), or ()
    main_fork: bool


class Changed(Exception):
    """A file changed or vanished while a live folder was read (see ``live``)."""


class Processor(Protocol):
    nice: int

    def process(self, unit: Unit) -> list[ChunkRef]: ...

    def skipped(self, nbytes: int) -> None: ...  # a file's bytes taken whole, unread (progress)


def set_nice(nice: int) -> None:
    """Lower this worker thread's CPU priority by nice more than it has (a dbops run under `nice -n
    10` gets store threads at 15, never back up at 5); best effort. Only on Linux, where a thread's
    id names that thread alone for setpriority (elsewhere it could name another process)."""
    if nice > 0 and sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except OSError:
            pass


class ParentCursor:
    """The parent's entries read alongside the walk (both in path order)."""

    def __init__(self, entries: Iterator[FileEntry]):
        self.it = entries
        self.cur = next(self.it, None)

    def find(self, path: str) -> FileEntry | None:
        k = path_key(path)
        while self.cur is not None and path_key(self.cur.path) < k:
            self.cur = next(self.it, None)
        return self.cur if self.cur is not None and self.cur.path == path else None


def known_refs(known: Known | None, e: walk.WalkEntry, pe: FileEntry | None, bs: int,
               path: str) -> list[ChunkRef] | None:
    """The parent's (or reused manifest's) refs of the whole file when its content is known to be
    that entry's and nothing wrote the file since (:mod:`dbops.repo.known`): same size, same block
    size, refs covering it. None: the file is read."""
    if known is None or pe is None or pe.type != FILE or pe.block != bs or pe.size != e.size or not e.size:
        return None
    if sum(c.raw for c in pe.chunks) != e.size or not known.unchanged(e.path, path, e.size):
        return None
    return list(pe.chunks)


def write_entries(snap: Processor, entries: Sequence[walk.WalkEntry], data_dir: str, chunk_size: int,
                  parent: Manifest | None, writer: mformat.Writer, workers: int,
                  known: Known | None = None) -> dict[str, int]:
    """Process every file in walk order with at most WINDOW units per worker running or queued; each
    entry goes to the manifest writer once all its units are done (at most 2 x that many entries
    wait for the oldest one). A file ``known`` unchanged takes the parent's entry's refs unread.
    Returns what was so taken: {"unchanged_files", "unchanged_bytes", "unchanged_chunks"}."""
    skipped = {"unchanged_files": 0, "unchanged_bytes": 0, "unchanged_chunks": 0}
    if known is not None and not known.usable():
        known = None
    cursor = ParentCursor(parent.entries() if parent is not None else iter(()))
    window: deque[tuple[walk.WalkEntry, int, list[Future]]] = deque()
    pending: set[Future] = set()
    limit = WINDOW * workers

    def emit_head() -> None:
        e, bs, futs = window.popleft()
        refs: list[ChunkRef] = []
        size = e.size
        try:
            for f in futs:
                refs.extend(f.result())
        except Changed:  # a live folder: recorded empty, so nothing is ever reused from it
            refs, size = [], 0
        writer.add(FileEntry(e.path, e.type, e.mode, e.mtime_ns, size, e.target, tuple(refs), bs))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-chunk", initializer=set_nice,
                            initargs=(snap.nice,)) as pool:
        try:
            for e in entries:
                pe = cursor.find(e.path)
                futs: list[Future] = []
                bs = 0
                if e.type == FILE:
                    bs = blocks.block_size(e.size, chunk_size)
                    prefs = pe.chunks if pe is not None and pe.type == FILE and pe.block == bs else ()
                    main = blocks.is_main_fork(e.path)
                    path = e.src or os.path.join(data_dir, e.path)
                    refs = known_refs(known, e, pe, bs, path)
                    if refs is not None:
                        f = Future()
                        f.set_result(refs)
                        futs.append(f)
                        skipped["unchanged_files"] += 1
                        skipped["unchanged_bytes"] += e.size
                        skipped["unchanged_chunks"] += len(refs)
                        snap.skipped(e.size)
                    step = max(bs, UNIT_BYTES - UNIT_BYTES % bs)
                    for s in range(0, e.size if refs is None else 0, step):
                        while len(pending) >= limit:  # errors surface when their entry is written
                            done, _ = wait(pending, return_when=FIRST_COMPLETED)
                            pending.difference_update(done)
                        f = pool.submit(snap.process, Unit(path, s, min(s + step, e.size), bs, prefs, main))
                        futs.append(f)
                        pending.add(f)
                window.append((e, bs, futs))  # only once every unit of the file is submitted
                while window and (len(window) > 2 * limit or all(f.done() for f in window[0][2])):
                    emit_head()
            while window:
                emit_head()
            return skipped
        except BaseException:
            for f in pending:
                f.cancel()
            raise
