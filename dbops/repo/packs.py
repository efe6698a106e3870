"""Packs: stored frames appended to local files, then uploaded (pack, then its index) by a pool.

A pack is written to a file in the store's spool folder, not kept in memory; a pack reaching the
pack size is sealed and uploaded, at most ``uploads`` at a time. ``parallel`` packs are open at
once (one per worker), so a worker's frames for one unit stay contiguous in one pack and a
restore reads a file's run of frames with one ranged GET.

A pack's index (each frame's offset, length, raw length and block hashes, uploaded beside it as
JSON) is kept in columns while the pack is open: three integers a frame and 32 bytes a block.
A pack of well-compressible data holds many blocks (pgbench: 64 MiB stored is 1.3 GB of blocks,
20,000 of them), and as lists of hex strings its index took about 4.7 MiB; with two packs open
and two uploading, that much again at every scale past the first full packs (scale 400 against
100: most of the full backup's RSS growth).
"""

from __future__ import annotations

import json
import os
import queue
import secrets as pysecrets
import shutil
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from dbops.errors import ConflictError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.probe import put_file_once


# Blocks a pack indexes at most, whatever it stores: blocks that compress to almost nothing (empty
# pages) would otherwise fill a pack_size pack with millions of them, and its index (32 bytes a
# block open, about 70 as uploaded JSON) with it. 65,536 blocks: 2 MiB of digests, 4 GiB of 64 KiB
# blocks (a pgbench pack of 64 MiB holds 20,000-37,000).
MAX_BLOCKS = 65_536


@dataclass
class Pack:
    tmp_dir: str
    pack_id: str = field(default_factory=lambda: pysecrets.token_hex(16))
    size: int = 0
    # The index, in columns: per frame (offset, length, raw length) and its number of blocks; the
    # blocks' sha256 digests, 32 bytes each, in frame order (see index_rows).
    _frames: array = field(default_factory=lambda: array("Q"))
    _counts: array = field(default_factory=lambda: array("I"))
    _digests: bytearray = field(default_factory=bytearray)
    _f: Any = None

    def append(self, payload: bytes, raw: int, hashes: list[str]) -> int:
        """Add one frame (``hashes``: its blocks' sha256, hex); returns its offset in the pack."""
        if self._f is None:
            self._f = open(os.path.join(self.tmp_dir, f"pack-{self.pack_id}"), "wb")
        offset = self.size
        self._f.write(payload)
        self._frames.extend((offset, len(payload), raw))
        self._counts.append(len(hashes))
        for h in hashes:
            self._digests += bytes.fromhex(h)
        self.size += len(payload)
        return offset

    @property
    def frames(self) -> int:
        return len(self._counts)

    def full(self, pack_size: int) -> bool:
        """Whether the pack is to be sealed: ``pack_size`` stored bytes or :data:`MAX_BLOCKS` blocks."""
        return self.size >= pack_size or len(self._digests) >= 32 * MAX_BLOCKS

    def index_rows(self) -> Iterator[list[Any]]:
        """The index, a frame at a time: [offset, length, raw length, [block hashes (hex)]]."""
        d = memoryview(self._digests)
        at = 0
        for n, count in enumerate(self._counts):
            yield [*self._frames[3 * n:3 * n + 3], [d[at + 32 * k:at + 32 * (k + 1)].hex() for k in range(count)]]
            at += 32 * count

    def index_json(self, backup_id: str) -> bytes:
        """The uploaded index document (format 2), as ``json.dumps`` of it with compact separators."""
        head = json.dumps({"format": 2, "pack": self.pack_id, "backup_id": backup_id, "size": self.size},
                          separators=(",", ":"))
        rows = ",".join(json.dumps(r, separators=(",", ":")) for r in self.index_rows())
        return f'{head[:-1]},"frames":[{rows}]}}'.encode()

    def close(self) -> str | None:
        if self._f is None:
            return None
        self._f.close()
        return self._f.name

    def discard(self) -> None:
        path = self.close()
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


class Uploader:
    def __init__(self, store: ObjectStore, layout: Layout, backup_id: str, *, tmp_dir: str, workers: int,
                 uploads: int):
        self.store, self.layout, self.backup_id, self.tmp_dir = store, layout, backup_id, tmp_dir
        self.lock = threading.Lock()
        self.open_packs: queue.Queue[Pack] = queue.Queue()
        for _ in range(workers):
            self.open_packs.put(Pack(tmp_dir))
        self.uploads = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="dbops-upload")
        self.in_flight = threading.BoundedSemaphore(uploads)
        self.upload_futures: list[Future] = []
        self.upload_error: BaseException | None = None
        self.stored_bytes = 0
        self.packs = self.frames = 0
        self.sealed = [0, 0, 0]  # bytes, packs, frames of the packs sealed so far (uploaded or not)

    def seal(self, pack: Pack) -> None:
        if not pack.frames:
            pack.discard()
            return
        if self.upload_error is not None:  # fail fast: stop reading once an upload failed
            pack.discard()
            raise self.upload_error
        self.in_flight.acquire()
        try:
            fut = self.uploads.submit(self._upload, pack)
        except BaseException:
            self.in_flight.release()
            pack.discard()
            raise
        fut.add_done_callback(self._uploaded)
        with self.lock:
            self.upload_futures.append(fut)
            self.sealed = [self.sealed[0] + pack.size, self.sealed[1] + 1, self.sealed[2] + pack.frames]

    def _uploaded(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is not None and self.upload_error is None:
            self.upload_error = fut.exception()
        self.in_flight.release()

    def _upload(self, pack: Pack) -> None:
        path = pack.close()
        assert path is not None
        try:
            meta = {"backup-id": self.backup_id, "frames": str(pack.frames)}
            if not put_file_once(self.store, self.layout.pack(pack.pack_id), path, metadata=meta):  # lost answer: ok
                raise ConflictError(f"pack {pack.pack_id} already exists ({self.layout.pack(pack.pack_id)})")
        finally:
            os.unlink(path)
        idx = zstandard.ZstdCompressor(level=3).compress(pack.index_json(self.backup_id))
        self.store.put(self.layout.pack_index(pack.pack_id), idx, metadata=meta, if_absent=True)
        with self.lock:
            self.stored_bytes += pack.size
            self.packs += 1
            self.frames += pack.frames

    def expected(self) -> tuple[int, int, int]:
        """(stored bytes, packs, frames) once every pack sealed or still open is uploaded."""
        opened = [p for p in list(self.open_packs.queue) if p.frames]
        with self.lock:
            b, n, f = self.sealed
        return b + sum(p.size for p in opened), n + len(opened), f + sum(p.frames for p in opened)

    def finish(self) -> None:
        """Seal the packs still open and wait for every upload (raising the first failure)."""
        while not self.open_packs.empty():
            self.seal(self.open_packs.get_nowait())
        self.uploads.shutdown(wait=True)
        for fut in self.upload_futures:
            fut.result()

    def abort(self) -> None:
        self.uploads.shutdown(wait=True, cancel_futures=True)
        while not self.open_packs.empty():
            self.open_packs.get_nowait().discard()


class PendingUploads:
    """The packs a store returned before they were all uploaded (``store_snapshot(defer=...)``):
    :meth:`finish` waits for them (raising the first failure), :meth:`abort` stops them; either
    removes the store's spool, once."""

    def __init__(self, up: Uploader, spool: str):
        self.up, self.spool, self.done = up, spool, False

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.up.finish()
        except BaseException:
            self.up.abort()
            raise
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.up.abort()
            shutil.rmtree(self.spool, ignore_errors=True)
