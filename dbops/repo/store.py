"""Store side: a stopped data folder into content-addressed chunks, packed and uploaded.

Pipeline (all threads; sha256, zstd and file reads release the GIL):

* the walk yields files; every file is cut into work units of up to ``UNIT_BYTES``;
* ``parallel`` workers take a unit each, read it chunk by chunk (fixed, page-aligned
  offsets), hash every chunk and look it up: all-zero chunks are not stored, chunks
  the parent manifests (or this run) already hold are referenced where they are;
  new chunks are gathered into frames (up to ``FRAME_BYTES`` of one unit's new
  chunks, in file order) and each frame is compressed as one zstd frame - the ratio
  of large blocks with the dedupe of small chunks - and appended to one of
  ``parallel`` open packs;
* a pack reaching ``pack_size`` is sealed and uploaded (pack, then its index) by an
  upload pool, at most ``parallel`` in flight (memory stays bounded);
* the manifest is written last, only once every pack is stored.

A unit's new frames stay contiguous in one pack, so a restore reads a file's run of
frames with one ranged GET.
"""

from __future__ import annotations

import json
import os
import queue
import secrets as pysecrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import zstandard

from dbops import log
from dbops.repo import codec
from dbops.repo import walk
from dbops.repo import manifest as mf
from dbops.repo.manifest import FILE, ChunkRef, FileEntry, Manifest, PgState
from dbops.config import CompressionSettings
from dbops.errors import ConflictError, PreconditionError
from dbops.pg.lsn import HISTORY_RE, SEGMENT_RE, parse_segment_name, segment_of_lsn
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.store")

UNIT_BYTES = 32 * 1024 * 1024
READ_BLOCK = 4 * 1024 * 1024
FRAME_BYTES = 128 * 1024  # raw bytes of new chunks compressed together

Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


@dataclass
class _Pack:
    pack_id: str = field(default_factory=lambda: pysecrets.token_hex(16))
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    index: list[list[Any]] = field(default_factory=list)  # [offset, length, raw length, [chunk hashes]]

    def append(self, payload: bytes, raw: int, hashes: list[str]) -> int:
        """Add one frame; returns its offset in the pack."""
        offset = self.size
        self.parts.append(payload)
        self.index.append([offset, len(payload), raw, hashes])
        self.size += len(payload)
        return offset


class _Claim:
    """Placeholder while the worker that first met a hash stores it."""


@dataclass(frozen=True)
class _Unit:
    file_no: int
    path: str
    start: int
    end: int


def parent_index(parents: Iterable[Manifest]) -> dict[str, ChunkRef]:
    """hash -> a parent's ref to where it is stored (zero chunks excluded)."""
    out: dict[str, ChunkRef] = {}
    for m in parents:
        for f in m.files:
            for c in f.chunks:
                if c.pack is not None and c.hash not in out:
                    out[c.hash] = c
    return out


class _Snapshot:
    def __init__(self, store: ObjectStore, layout: Layout, backup_id: str, *, known: dict[str, ChunkRef],
                 encoder: codec.Encoder, chunk_size: int, pack_size: int, workers: int, uploads: int,
                 progress: Progress | None, total: int):
        self.store, self.layout, self.backup_id = store, layout, backup_id
        self.known = known
        self.new: dict[str, ChunkRef | _Claim] = {}  # _Claim: being stored by another worker right now
        self.encoder = encoder
        self.chunk_size, self.pack_size = chunk_size, pack_size
        self.lock = threading.Lock()
        self.local = threading.local()
        self.open_packs: queue.Queue[_Pack] = queue.Queue()
        for _ in range(workers):
            self.open_packs.put(_Pack())
        self.uploads = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="dbops-upload")
        self.in_flight = threading.BoundedSemaphore(uploads)
        self.upload_futures: list[Future] = []
        self.upload_error: BaseException | None = None
        self.stored_bytes = 0
        self.packs = self.frames = 0
        self.zero_chunks = self.reused_chunks = 0
        self.progress, self.total, self.done = progress, total, 0

    # ------------------------------------------------------------------ chunking

    def process(self, unit: _Unit) -> list[str]:
        """Hash (and store when new) every chunk of one unit; returns their hashes in order
        ("" for an all-zero chunk). Reads in blocks of whole chunks to keep per-chunk work small."""
        hashes: list[str] = []
        zero = reused = 0
        cs = self.chunk_size
        zero_cs = codec.zero_hash(cs)
        sha256 = codec.sha256
        known, new = self.known, self.new
        block = max(cs, READ_BLOCK - READ_BLOCK % cs)
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) != block:
            buf = self.local.buf = bytearray(block)  # reused: a fresh 4 MiB per read costs page faults
        pack = self.open_packs.get()
        try:
            with open(unit.path, "rb") as f:
                for pos in range(unit.start, unit.end, block):
                    want = min(block, unit.end - pos)
                    mv = memoryview(buf)[:want]
                    got = os.preadv(f.fileno(), [mv], pos)
                    if got != want:
                        raise PreconditionError(
                            f"{unit.path} changed while it was read (expected {want} bytes at offset {pos})",
                            hint="a snapshot needs a stopped data folder",
                        )
                    run: list[tuple[str, memoryview]] = []  # new chunks for the next frame
                    run_bytes = 0
                    for off in range(0, want, cs):
                        chunk = mv[off:off + cs]
                        h = sha256(chunk)
                        if h == zero_cs or (len(chunk) != cs and h == codec.zero_hash(len(chunk))):
                            hashes.append("")
                            zero += 1
                            continue
                        hashes.append(h)
                        # dict.setdefault is atomic: exactly one worker claims a new hash.
                        claim = _Claim()
                        if h in known or new.setdefault(h, claim) is not claim:
                            reused += 1
                            continue
                        run.append((h, chunk))
                        run_bytes += len(chunk)
                        if run_bytes >= FRAME_BYTES:
                            pack = self.put_frame(pack, run)
                            run, run_bytes = [], 0
                    if run:  # the buffer is refilled by the next read: the frame goes now
                        pack = self.put_frame(pack, run)
        finally:
            self.open_packs.put(pack)
        with self.lock:
            self.zero_chunks += zero
            self.reused_chunks += reused
            self.done += unit.end - unit.start
            if self.progress:
                self.progress(self.done, self.total)
        return hashes

    def put_frame(self, pack: _Pack, run: list[tuple[str, memoryview]]) -> _Pack:
        """Compress a run of new chunks as one frame into the pack; returns the pack to go on with."""
        raw = b"".join(c for _, c in run)
        stored = self.encoder.encode(raw)
        hashes = [h for h, _ in run]
        offset = pack.append(stored, len(raw), hashes)
        at = 0
        for h, c in run:
            self.new[h] = ChunkRef(h, pack.pack_id, offset, len(stored), len(c), at, len(raw))
            at += len(c)
        if pack.size >= self.pack_size:
            self.seal(pack)
            return _Pack()
        return pack

    # ------------------------------------------------------------------ packs

    def seal(self, pack: _Pack) -> None:
        if not pack.parts:
            return
        if self.upload_error is not None:  # fail fast: stop chunking once an upload failed
            raise self.upload_error
        self.in_flight.acquire()
        try:
            fut = self.uploads.submit(self._upload, pack)
        except BaseException:
            self.in_flight.release()
            raise
        fut.add_done_callback(self._uploaded)
        with self.lock:
            self.upload_futures.append(fut)

    def _uploaded(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is not None and self.upload_error is None:
            self.upload_error = fut.exception()
        self.in_flight.release()

    def _upload(self, pack: _Pack) -> None:
        data = b"".join(pack.parts)
        pack.parts.clear()
        meta = {"backup-id": self.backup_id, "frames": str(len(pack.index))}
        if not self.store.put(self.layout.pack(pack.pack_id), data, metadata=meta, if_absent=True):
            raise ConflictError(f"pack {pack.pack_id} already exists ({self.layout.pack(pack.pack_id)})")
        index = {"format": 2, "pack": pack.pack_id, "backup_id": self.backup_id, "size": len(data),
                 "frames": pack.index}
        idx = zstandard.ZstdCompressor(level=3).compress(json.dumps(index, separators=(",", ":")).encode())
        self.store.put(self.layout.pack_index(pack.pack_id), idx, metadata=meta, if_absent=True)
        with self.lock:
            self.stored_bytes += len(data)
            self.packs += 1
            self.frames += len(pack.index)

    def finish(self) -> None:
        """Seal the packs still open and wait for every upload (raising the first failure)."""
        while not self.open_packs.empty():
            self.seal(self.open_packs.get_nowait())
        self.uploads.shutdown(wait=True)
        for fut in self.upload_futures:
            fut.result()

    def abort(self) -> None:
        self.uploads.shutdown(wait=True, cancel_futures=True)

    def ref(self, h: str, raw: int) -> ChunkRef:
        if not h:
            return ChunkRef(codec.zero_hash(raw), None, 0, 0, raw)
        ref = self.known.get(h) or self.new[h]
        assert isinstance(ref, ChunkRef), "every new chunk is placed before finish()"
        return ref


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


def _unit_step(chunk_size: int) -> int:
    return max(chunk_size, UNIT_BYTES - UNIT_BYTES % chunk_size)


def _units(entries: Sequence[walk.WalkEntry], data_dir: str, chunk_size: int) -> list[_Unit]:
    step = _unit_step(chunk_size)
    units = []
    for i, e in enumerate(entries):
        if e.type == FILE and e.size:
            path = os.path.join(data_dir, e.path)
            units.extend(_Unit(i, path, s, min(s + step, e.size)) for s in range(0, e.size, step))
    # Big files first: the pool then ends on small units and finishes evenly.
    units.sort(key=lambda u: u.end - u.start, reverse=True)
    return units


def store_snapshot(
    store: ObjectStore,
    layout: Layout,
    data_dir: str,
    *,
    backup_id: str,
    parent_manifests: Sequence[Manifest] = (),
    compression: CompressionSettings | None = None,
    chunk_size: int,
    pack_size: int,
    parallel: int,
    meta: Mapping[str, Any] | None = None,
    pg: PgState | None = None,
    parent_id: str | None = None,
    exclude: Sequence[str] = (),
    include_wal: bool = True,
    timings: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Store a stopped data folder as backup ``backup_id`` and return its (written) manifest.

    ``pg``: the snapshot's PostgreSQL state; read from the folder (pg_controldata) when None.
    ``parent_id``: recorded as the parent; defaults to the first of ``parent_manifests``.
    ``include_wal``: carry the WAL segments needed to reach consistency (see :func:`wal_needed`),
    so the restored folder starts without an archive; pg_wal is otherwise left empty.
    ``timings``: earlier phases of the run (merged into the manifest's timings).
    """
    compression = compression or CompressionSettings()
    if chunk_size <= 0 or chunk_size % 8192:
        raise PreconditionError(f"chunk size {chunk_size} is not a positive multiple of 8192")
    t0 = time.monotonic()
    if pg is None:
        from dbops.repo import (
            pgstate,  # runs pg_controldata; synthetic folders pass pg
        )

        pg = pgstate.read(data_dir)
    entries = walk.walk(data_dir, exclude, wal_needed(pg) if include_wal else None)
    redo_segment = segment_of_lsn(pg.timeline, pg.redo_lsn, pg.wal_segment_size)
    if include_wal and not any(e.path == f"pg_wal/{redo_segment}" for e in entries):
        _log.warning("%s has no pg_wal/%s: the restored copy will need the WAL archive to start",
                     data_dir, redo_segment)
    t_walk = time.monotonic()
    units = _units(entries, data_dir, chunk_size)
    total = sum(u.end - u.start for u in units)
    # Hashing and compression are CPU work: more threads than cores only contend for the GIL.
    workers = max(1, min(parallel, os.cpu_count() or 1))
    snap = _Snapshot(store, layout, backup_id, known=parent_index(parent_manifests),
                     encoder=codec.Encoder(compression.algorithm, compression.level), chunk_size=chunk_size,
                     pack_size=pack_size, workers=workers, uploads=max(1, parallel), progress=progress,
                     total=total)
    hashes: dict[tuple[int, int], list[str]] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-chunk") as pool:
            futs = {pool.submit(snap.process, u): u for u in units}
            done, _ = wait(futs, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for other in futs:
                        other.cancel()
                    raise f.exception()  # type: ignore[misc]
            for f, u in futs.items():
                hashes[(u.file_no, u.start)] = f.result()
        t_chunk = time.monotonic()
        snap.finish()
    except BaseException:
        snap.abort()
        raise
    t_upload = time.monotonic()

    files: list[FileEntry] = []
    step = _unit_step(chunk_size)
    for i, e in enumerate(entries):
        chunks: tuple[ChunkRef, ...] = ()
        if e.type == FILE and e.size:
            hs = [h for s in range(0, e.size, step) for h in hashes[(i, s)]]
            chunks = tuple(snap.ref(h, min(chunk_size, e.size - n * chunk_size)) for n, h in enumerate(hs))
        files.append(FileEntry(e.path, e.type, e.mode, e.mtime_ns, e.size, e.target, chunks))
    n_chunks = sum(len(f.chunks) for f in files)
    m = Manifest(
        backup_id=backup_id,
        pg=pg,
        chunk_size=chunk_size,
        compression={"algorithm": compression.algorithm, "level": compression.level},
        files=files,
        parent_id=parent_id if parent_id is not None else (parent_manifests[0].backup_id if parent_manifests else None),
        logical_size=total,
        stored_bytes=snap.stored_bytes,
        counts={"files": sum(1 for f in files if f.type == FILE), "chunks": n_chunks,
                "new_chunks": len(snap.new), "reused_chunks": snap.reused_chunks,
                "zero_chunks": snap.zero_chunks, "packs": snap.packs, "frames": snap.frames},
        meta=dict(meta or {}),
    )
    m.timings = {**(timings or {}), "walk": round(t_walk - t0, 3), "chunk": round(t_chunk - t_walk, 3),
                 "upload_wait": round(t_upload - t_chunk, 3), "store": round(time.monotonic() - t0, 3)}
    mf.save(store, layout, m)
    _log.info("stored backup %s: %d files, %d bytes, %d new bytes in %d packs, %.1f s", backup_id,
              m.counts["files"], total, snap.stored_bytes, snap.packs, m.timings["store"])
    return m
