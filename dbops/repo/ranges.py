"""Reading stored frames: which ranged GETs a set of files needs, fetching them, checking each block.

Every stored frame the files need is read once: frames are grouped by pack, sorted by offset
and coalesced into ranged GETs (adjacent, or separated by less than ``MAX_GAP``, up to
``MAX_RANGE`` stored bytes and ``MAX_RANGE_RAW`` decompressed bytes each: very well compressed
data still splits into several pieces of work), decompressed once each; every block needed from a frame is checked
against its sha256. A backup is planned ``BATCH_BLOCKS`` blocks at a time, so memory stays flat
in the size of the backup.

A range is read as a stream (:meth:`ObjectStore.open_range`), one frame at a time: memory holds
the frames being checked, not the ranges in flight. Those frames' stored and decompressed bytes
are held against a :class:`ByteBudget` (``IN_FLIGHT_BYTES`` for a restore or a verify), so the
memory a download needs is fixed, whatever the size of the database, of its ranges or of its frames.
"""

from __future__ import annotations

import functools
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from dbops.errors import NotFoundError, StorageError
from dbops.repo import codec
from dbops.repo.frames import chunk_fault, open_delta, open_frame
from dbops.repo.manifest import FILE, ChunkRef, FileEntry, Manifest
from dbops.repo.model import PAGE
from dbops.storage.base import BytesRange, ObjectStore, RangeReader

MAX_GAP = 256 * 1024
MAX_RANGE = 16 * 1024 * 1024
MAX_RANGE_RAW = 256 * 1024 * 1024  # smaller pieces measured slower (more ranges racing for the GIL)
IN_FLIGHT_BYTES = 32 * 1024 * 1024  # stored + decompressed bytes of the frames being checked, at most
READ_AHEAD = 1024 * 1024  # a range's stream is read this much at a time (one buffer per range in flight)
BATCH_BLOCKS = 8192  # blocks planned at a time: one batch planned is about 5 MB of Python objects


@dataclass(slots=True)
class Run:
    """Consecutive chunks of one frame that are also consecutive in one file: one pwrite."""

    file_no: int
    offset: int  # in the file
    refs: list[ChunkRef]
    mask: int = 0  # a page delta's pages: its content goes to those pages of the block at offset

    @property
    def at(self) -> int:
        return self.refs[0].at

    @property
    def size(self) -> int:
        return self.refs[-1].at + self.refs[-1].raw - self.refs[0].at


@dataclass(slots=True)
class Frame:
    """One stored frame (located by its first needed chunk's ref) and where its chunks go."""

    ref: ChunkRef
    runs: list[Run] = field(default_factory=list)

    def chunks(self) -> int:
        """Distinct chunks needed from the frame."""
        if len(self.runs) == 1:
            return len(self.runs[0].refs)
        return len({c.at for run in self.runs for c in run.refs})


@dataclass(slots=True)
class Range:
    pack: str
    start: int
    end: int
    frames: list[Frame]
    raw: int = 0  # decompressed bytes of its frames

    @property
    def first_file(self) -> int:
        return self.frames[0].runs[0].file_no

    @property
    def deltas(self) -> bool:
        """A range of page deltas (planned from :func:`delta_view`: every run of it is one)."""
        return bool(self.frames[0].runs[0].mask)

    def files(self) -> set[int]:
        """The batch's file numbers the range writes into."""
        return {run.file_no for fr in self.frames for run in fr.runs}


def plan_ranges(manifest: Manifest | None, files: list[FileEntry]) -> list[Range]:
    """Coalesced ranged reads covering every stored frame the files need, each frame once
    (``manifest``: for the block size of files that do not carry one)."""
    frames: dict[tuple[str, int], Frame] = {}
    for i, f in enumerate(files):
        cs = f.block or (manifest.chunk_size if manifest is not None else 0)
        run: Run | None = None
        run_pack, run_offset, run_end = "", -1, -1
        for n, c in enumerate(f.chunks):
            pack = c.pack
            if pack is None:
                run = None
            elif c.mask:  # a page delta: its pages, checked against their sha256, scattered by one run
                fr = frames.get((pack, c.offset))
                if fr is None:
                    fr = frames[(pack, c.offset)] = Frame(c)
                # its pages as a chunk of their own (built directly: NamedTuple._replace costs 3x)
                fr.runs.append(Run(i, n * cs, [ChunkRef(c.hash, pack, c.offset, c.length, c.mask.bit_count() * PAGE,
                                                        c.at, c.frame_raw)], c.mask))
                run = None
            elif run is not None and c.offset == run_offset and c.at == run_end and pack == run_pack:
                run.refs.append(c)
                run_end += c.raw
            else:
                fr = frames.get((pack, c.offset))
                if fr is None:
                    fr = frames[(pack, c.offset)] = Frame(c)
                run = Run(i, n * cs, [c])
                fr.runs.append(run)
                run_pack, run_offset, run_end = pack, c.offset, c.at + c.raw
    by_pack: dict[str, list[Frame]] = defaultdict(list)
    for (pack, _off), fr in frames.items():
        by_pack[pack].append(fr)
    ranges: list[Range] = []
    for pack, frs in by_pack.items():
        frs.sort(key=lambda x: x.ref.offset)
        cur: Range | None = None
        for fr in frs:
            r = fr.ref
            if (cur and r.offset <= cur.end + MAX_GAP and r.offset + r.length - cur.start <= MAX_RANGE
                    and cur.raw + r.frame_raw <= MAX_RANGE_RAW):
                cur.end = max(cur.end, r.offset + r.length)
                cur.frames.append(fr)
                cur.raw += r.frame_raw
            else:
                cur = Range(pack, r.offset, r.offset + r.length, [fr], r.frame_raw)
                ranges.append(cur)
    # Most work first so the pool finishes evenly.
    ranges.sort(key=lambda r: (r.raw, r.end - r.start), reverse=True)
    return ranges


def open_range(store: ObjectStore, key: str, rng: Range) -> RangeReader:
    """The range as a stream; short (or empty) when the object is truncated; NotFoundError when absent."""
    try:
        return store.open_range(key, rng.start, rng.end - rng.start)
    except NotFoundError:
        raise
    except StorageError:
        # S3 refuses a range that starts past the end (InvalidRange): a truncated object.
        info = store.head(key)
        if info is None:
            raise NotFoundError(f"object {key} not found") from None
        if info.size <= rng.start:
            return BytesRange(b"")
        raise


def fetch_range(store: ObjectStore, key: str, rng: Range) -> bytes:
    """The range's bytes; short (or empty) when the object is truncated; NotFoundError when absent."""
    with open_range(store, key, rng) as src:
        return src.read(rng.end - rng.start)


class ByteBudget:
    """At most ``limit`` bytes held at once, across threads, granted in the order asked (FIFO, so a
    large request is not starved by small ones). A request larger than the limit is granted the
    whole limit once nothing else is held: it still proceeds, alone."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.held = self.peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    def acquire(self, n: int) -> int:
        """Block until n bytes (at most the limit) are granted; returns what was granted."""
        n = min(max(0, n), self.limit)
        me = object()
        with self._cond:
            self._queue.append(me)
            self._cond.wait_for(lambda: self._queue[0] is me and self.held + n <= self.limit)
            self._queue.popleft()
            self.held += n
            self.peak = max(self.peak, self.held)
            self._cond.notify_all()
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self.held -= n
            self._cond.notify_all()


def frames_read(src: RangeReader, rng: Range,
                budget: ByteBudget | None = None) -> Iterator[tuple[Frame, bytes | memoryview]]:
    """(frame, its stored bytes) for every frame of the range, read from the stream in order (the
    gaps between them read and dropped); a frame's bytes are short when the object ends early.
    With a budget, each frame's stored and decompressed size is held from before it is read until
    the next one is asked for: close the generator (``contextlib.closing``) when stopping early."""
    ahead = ReadAhead(src)
    pos = rng.start
    for fr in rng.frames:
        r = fr.ref
        granted = budget.acquire(r.length + r.frame_raw) if budget else 0
        try:
            if pos < r.offset:
                pos += len(ahead.take(r.offset - pos))
            stored = ahead.take(r.length) if pos == r.offset else b""
            pos += len(stored)
            yield fr, stored
        finally:
            if budget:
                budget.release(granted)


class ReadAhead:
    """A stream read ``READ_AHEAD`` bytes at a time (one call per MiB, not one per small frame),
    handed out in pieces of the size asked for, without copying a piece that lies in one read."""

    def __init__(self, src: RangeReader):
        self.src = src
        self.buf, self.at = memoryview(b""), 0

    def take(self, n: int) -> bytes | memoryview:
        """The next n bytes (fewer at the end of the stream)."""
        if len(self.buf) - self.at >= n:
            self.at += n
            return self.buf[self.at - n:self.at]
        rest = bytes(self.buf[self.at:])
        more = self.src.read(max(READ_AHEAD, n - len(rest)))
        if len(rest) + len(more) <= n:  # at most what was asked for: hand it all out
            self.buf, self.at = memoryview(b""), 0
            return rest + more if rest else more
        self.buf, self.at = memoryview(rest + more if rest else more), n
        return self.buf[:n]


BaseOf = Callable[[Frame, Run], "bytes | memoryview | None"]


def frame_chunks(decoder: codec.Decoder, fr: Frame, stored: bytes | memoryview,
                 base_of: BaseOf | None = None) -> Iterator[tuple[Run, memoryview | None, str]]:
    """(run, its content, "") for every run of chunks the frame holds, each chunk checked against
    its sha256; (run, None, why) for a run with a damaged chunk (or frame). A page delta
    compressed against its base (format 5) is decoded with ``base_of(frame, run)``: the raw bytes
    of the frame's base block, for the run's block (None: not available, reported damaged)."""
    r = fr.ref
    if r.on_base:
        raw, why = None, ""
    else:
        raw, why = open_frame(decoder, r, stored)
    for run in fr.runs:
        if r.on_base:
            raw, why = open_delta(decoder, r, stored, base_of(fr, run) if base_of is not None else None)
        if raw is None:
            yield run, None, why
            continue
        why = ""
        for c in run.refs:
            why = chunk_fault(raw, c, r.offset)
            if why:
                break
        yield (run, None, why) if why else (run, raw[run.at:run.at + run.size], "")


def chunks_of(decoder: codec.Decoder, data: bytes, rng: Range) -> Iterator[tuple[Run, memoryview | None, str]]:
    """frame_chunks for every frame of a range already in memory."""
    for fr, stored in frames_read(BytesRange(data), rng):
        yield from frame_chunks(decoder, fr, stored)


View = Callable[[FileEntry], "FileEntry | None"]


def base_view(f: FileEntry) -> FileEntry:
    """The file as its whole blocks: each page delta replaced by its base block (written first)."""
    if not has_deltas(f):
        return f
    return f.with_chunks(tuple(c.base if c.mask and c.base is not None else c for c in f.chunks))


def delta_view(f: FileEntry) -> FileEntry | None:
    """The file's page deltas only, every other block left out (written after their bases, see
    :mod:`dbops.repo.schedule`); None for a file without deltas."""
    if not has_deltas(f):
        return None
    return f.with_chunks(tuple(c if c.mask else _left_out(c.raw) for c in f.chunks))


@functools.lru_cache(maxsize=64)
def _left_out(raw: int) -> ChunkRef:
    """A block a view leaves out (read as zeros: nothing fetched), one ref per block size."""
    return ChunkRef("", None, 0, 0, raw)


def has_deltas(f: FileEntry) -> bool:
    return any(c.mask for c in f.chunks)


def view_batches(manifest: Manifest, view: View | None = None) -> Iterator[list[tuple[FileEntry, FileEntry]]]:
    """(entry, entry as ``view`` shows it) for the backup's files with stored content, a bounded
    number of blocks at a time, in order; files the view maps to None are left out."""
    batch: list[tuple[FileEntry, FileEntry]] = []
    n = 0
    for f in manifest.entries():
        if f.type == FILE and f.chunks:
            v = view(f) if view is not None else f
            if v is None:
                continue
            batch.append((f, v))
            n += len(f.chunks)
            if n >= BATCH_BLOCKS:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


def batches(manifest: Manifest, view: View | None = None) -> Iterator[list[FileEntry]]:
    """The backup's files with stored content (as ``view`` shows them), a bounded number of blocks
    at a time, in order."""
    for batch in view_batches(manifest, view):
        yield [v for _, v in batch]


def planned(manifest: Manifest) -> Iterator[tuple[list[FileEntry], Range]]:
    """(the batch's files, one ranged read) for every range the backup needs, batch by batch:
    every whole block (page deltas' bases included), then every page delta."""
    for view in (base_view, delta_view):
        for files in batches(manifest, view):
            for rng in plan_ranges(manifest, files):
                yield files, rng


def run_bounded(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, limit: int) -> None:
    """fn(item) for every item on the pool, at most ``limit`` queued at a time; the first error raises."""
    slots = threading.Semaphore(limit)
    futs: deque[Future] = deque()
    try:
        for item in items:
            slots.acquire()
            fut = pool.submit(fn, item)
            fut.add_done_callback(lambda _f: slots.release())
            futs.append(fut)
            while futs and futs[0].done():
                futs.popleft().result()
        while futs:
            futs.popleft().result()
    finally:
        for fut in futs:
            fut.cancel()
