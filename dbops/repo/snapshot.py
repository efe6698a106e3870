"""One unit of a store, block by block (see :mod:`dbops.repo.store` for the whole pipeline): the
:class:`Snapshot` that :func:`dbops.repo.storeorder.write_entries` hands each unit to reads it,
takes the parent's refs of blocks whose pages are no newer than ``unchanged_lsn``, makes page deltas
of main-fork blocks with newer pages (:mod:`dbops.repo.storedeltas`), hashes every other block and
gathers new blocks into frames in the open packs."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from dbops.errors import PreconditionError
from dbops.repo import blocks, codec
from dbops.repo.bases import BATCH_BYTES, BATCH_PAGES_BYTES, BaseReader, Delta
from dbops.repo.manifest import ChunkRef
from dbops.repo.packs import Pack, Uploader
from dbops.repo.ranges import IN_FLIGHT_BYTES, ByteBudget
from dbops.repo.savedpages import SavedPages, Span
from dbops.repo.storedeltas import Ahead, DeltaPuts
from dbops.repo.storeorder import Changed, Unit
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

READ_BLOCK = 4 * 1024 * 1024
FRAME_BYTES = 128 * 1024  # raw bytes of new blocks compressed together

# The last packs: once less than TAIL_BYTES of the store's bytes are left to read, an open pack is
# sealed (and its upload starts) at TAIL_PACK stored bytes rather than pack_size. The open packs
# left when the last block is read upload after it, on the caller's serial path (the full
# backup's final store waited 0.6-1.0 s for two half-full packs at scale 100): a few small packs
# more instead. 256 MiB is about half a second of the store's reading on two workers.
TAIL_BYTES = 256 * 2**20
TAIL_PACK = 4 * 2**20

Progress = Callable[[int, int], None]  # (bytes done, bytes total); called from worker threads, serialised


# A new frame member: (its place in the unit's refs, sha256, bytes).
_New = tuple[int, str, "bytes | memoryview"]


class Cancelled(Exception):
    """``cancel`` was set: the store stopped (its packs become orphans that retention removes)."""


class Snapshot(DeltaPuts):
    def __init__(self, store: ObjectStore, layout: Layout, backup_id: str, *, encoder: codec.Encoder,
                 pack_size: int, workers: int, uploads: int, progress: Progress | None, total: int,
                 unchanged_lsn: int | None, tmp_dir: str, live: bool = False,
                 cancel: threading.Event | None = None, deltas: bool = False,
                 ready: Callable[[str, int, int], None] | None = None, nice: int = 0,
                 saved: SavedPages | None = None):
        self.store, self.layout, self.backup_id = store, layout, backup_id
        self.ready, self.nice = ready, nice
        self.deltas = deltas and unchanged_lsn is not None
        self.encoder, self.pack_size, self.tmp_dir = encoder, pack_size, tmp_dir
        self.unchanged_lsn, self.live, self.cancel = unchanged_lsn, live, cancel
        self.lock = threading.Lock()
        self.local = threading.local()
        self.up = Uploader(store, layout, backup_id, tmp_dir=tmp_dir, workers=workers, uploads=uploads)
        self.bases = BaseReader(store, layout, ByteBudget(IN_FLIGHT_BYTES), ahead=workers) if self.deltas else None
        self.saved = saved if self.deltas else None
        self.c = {"zero": 0, "reused": 0, "lsn_reused": 0, "new": 0, "delta": 0, "hashed_bytes": 0}
        self.progress, self.total, self.done = progress, total, 0

    # ------------------------------------------------------------------ blocks

    def process(self, unit: Unit) -> list[ChunkRef]:
        """The refs of every block of one unit, in order (new blocks stored on the way)."""
        refs: list[ChunkRef | None] = []
        c = dict.fromkeys(self.c, 0)
        bs = unit.block
        sha256 = codec.sha256
        parent, lsn = unit.parent, self.unchanged_lsn if unit.main_fork else None
        saved = self.saved
        key: str | None | bool = False  # the saved pages' key for this file, looked up at its first delta
        step = max(bs, READ_BLOCK - READ_BLOCK % bs)
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) != step:
            buf = self.local.buf = bytearray(step)  # reused: a fresh 4 MiB per read costs page faults
        if self.ready is not None:  # a copy still being made: wait for these bytes (before taking a pack)
            self.ready(unit.path, unit.start, unit.end)
        pack = self.up.open_packs.get()
        try:
            try:
                f = open(unit.path, "rb")
            except FileNotFoundError:
                if self.live:
                    raise Changed(unit.path) from None
                raise
            pending: list[Delta] = []  # page deltas (their pages copied), encoded once their bases are here
            pending_bytes = 0  # their pages' bytes
            ahead: Ahead | None = None  # the batch before, its bases being fetched meanwhile
            with f:
                for pos in range(unit.start, unit.end, step):
                    if self.cancel is not None and self.cancel.is_set():
                        raise Cancelled(f"storing {unit.path} was cancelled")
                    want = min(step, unit.end - pos)
                    mv = memoryview(buf)[:want]
                    got = os.preadv(f.fileno(), [mv], pos)
                    if got != want:
                        if self.live:
                            raise Changed(unit.path)
                        raise PreconditionError(
                            f"{unit.path} changed while it was read (expected {want} bytes at offset {pos})",
                            hint="a snapshot needs a stopped data folder",
                        )
                    run: list[_New] = []  # new blocks for the next frame
                    span: Span | None | bool = False  # the saved pages of this read, once a delta needs them
                    run_bytes = 0
                    for off in range(0, want, bs):
                        block = mv[off:off + bs]
                        i = (pos + off) // bs
                        pref = parent[i] if i < len(parent) else None
                        if pref is not None and pref.raw != len(block):
                            pref = None
                        if lsn is not None and pref is not None and pref.pack is not None:
                            mask = blocks.changed_mask(block, lsn)
                            if mask == 0:
                                refs.append(pref)
                                c["lsn_reused"] += 1
                                continue
                            if self.deltas and mask > 0 and not (mask + 1 == 1 << len(block) // blocks.PAGE
                                                                 and blocks.all_new(block)):
                                delta = blocks.delta_of(block, mask, pref)
                                if delta is not None:
                                    payload, dmask, base = delta
                                    c["hashed_bytes"] += len(payload)
                                    d = (len(refs), payload, dmask, base, pref)
                                    refs.append(None)
                                    old = None
                                    if saved is not None and not pref.mask:  # the base: the parent's own block
                                        if key is False:
                                            key = saved.key(unit.path)
                                        if span is False:  # this read's saved pages, at its first delta
                                            span = saved.span(key, pos // blocks.PAGE, want // blocks.PAGE)
                                        first = (pos + off) // blocks.PAGE
                                        old = saved.pages(key, first, dmask) if span is None else \
                                            span.pages(first, dmask)
                                    if old is None:
                                        pending.append(d)
                                        pending_bytes += len(payload)
                                    else:
                                        pack, _, same = self.put_encoded(pack, [d], [old], refs)
                                        c["delta"] += 1 - same
                                        c["reused"] += same
                                    continue
                        h = sha256(block)
                        c["hashed_bytes"] += len(block)
                        if h == codec.zero_hash(len(block)):
                            refs.append(ChunkRef(h, None, 0, 0, len(block)))
                            c["zero"] += 1
                        elif pref is not None and pref.hash == h:
                            refs.append(pref)
                            c["reused"] += 1
                        else:
                            run.append((len(refs), h, block))
                            refs.append(None)
                            run_bytes += len(block)
                            if run_bytes >= FRAME_BYTES:
                                pack = self.put_frame(pack, run, refs)
                                run, run_bytes = [], 0
                    if run:  # the buffer is refilled by the next read: the frame goes now
                        pack = self.put_frame(pack, run, refs)
                    if len(pending) * bs >= BATCH_BYTES or pending_bytes >= BATCH_PAGES_BYTES:
                        # their bases fetched together, a batch at a time
                        pack, ahead = self.put_deltas(pack, ahead, pending, refs, unit.path)
                        pending, pending_bytes = [], 0
                if pending or ahead:
                    pack, _ = self.put_deltas(pack, ahead, pending, refs, unit.path, last=True)
        finally:
            self.up.open_packs.put(pack)
        with self.lock:
            for k, v in c.items():
                self.c[k] += v
            self.done += unit.end - unit.start
            if self.progress:
                self.progress(self.done, self.total)
        return refs  # type: ignore[return-value]  # every None was filled by put_frame

    def skipped(self, nbytes: int) -> None:
        """A file taken whole unread (known unchanged): its bytes count as done."""
        with self.lock:
            self.done += nbytes
            if self.progress:
                self.progress(self.done, self.total)

    def put_frame(self, pack: Pack, run: list[_New], refs: list[ChunkRef | None]) -> Pack:
        """Compress a run of new blocks as one frame into the pack; returns the pack to go on with."""
        raw = b"".join(b for _, _, b in run)
        stored = self.encoder.encode(raw)
        offset = pack.append(stored, len(raw), [h for _, h, _ in run])
        at = 0
        for i, h, b in run:
            refs[i] = ChunkRef(h, pack.pack_id, offset, len(stored), len(b), at, len(raw))
            at += len(b)
        with self.lock:
            self.c["new"] += len(run)
        if pack.full(self.pack_size) or (pack.size >= TAIL_PACK and self.total - self.done < TAIL_BYTES):
            self.up.seal(pack)
            return Pack(self.tmp_dir)
        return pack
