"""Packs: stored frames appended to local files, then uploaded (pack, then its index) by a pool.

A pack is written to a file in the store's spool folder, not kept in memory; a pack reaching the
pack size is sealed and uploaded, at most ``uploads`` at a time. ``parallel`` packs are open at
once (one per worker), so a worker's frames for one unit stay contiguous in one pack and a
restore reads a file's run of frames with one ranged GET.
"""

from __future__ import annotations

import json
import os
import queue
import secrets as pysecrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from dbops.errors import ConflictError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.probe import put_file_once


@dataclass
class Pack:
    tmp_dir: str
    pack_id: str = field(default_factory=lambda: pysecrets.token_hex(16))
    size: int = 0
    index: list[list[Any]] = field(default_factory=list)  # [offset, length, raw length, [block hashes]]
    _f: Any = None

    def append(self, payload: bytes, raw: int, hashes: list[str]) -> int:
        """Add one frame; returns its offset in the pack."""
        if self._f is None:
            self._f = open(os.path.join(self.tmp_dir, f"pack-{self.pack_id}"), "wb")
        offset = self.size
        self._f.write(payload)
        self.index.append([offset, len(payload), raw, hashes])
        self.size += len(payload)
        return offset

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

    def seal(self, pack: Pack) -> None:
        if not pack.index:
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

    def _uploaded(self, fut: Future) -> None:
        if not fut.cancelled() and fut.exception() is not None and self.upload_error is None:
            self.upload_error = fut.exception()
        self.in_flight.release()

    def _upload(self, pack: Pack) -> None:
        path = pack.close()
        assert path is not None
        try:
            meta = {"backup-id": self.backup_id, "frames": str(len(pack.index))}
            if not put_file_once(self.store, self.layout.pack(pack.pack_id), path, metadata=meta):  # lost answer: ok
                raise ConflictError(f"pack {pack.pack_id} already exists ({self.layout.pack(pack.pack_id)})")
        finally:
            os.unlink(path)
        index = {"format": 2, "pack": pack.pack_id, "backup_id": self.backup_id, "size": pack.size,
                 "frames": pack.index}
        idx = zstandard.ZstdCompressor(level=3).compress(json.dumps(index, separators=(",", ":")).encode())
        self.store.put(self.layout.pack_index(pack.pack_id), idx, metadata=meta, if_absent=True)
        with self.lock:
            self.stored_bytes += pack.size
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
        while not self.open_packs.empty():
            self.open_packs.get_nowait().discard()
