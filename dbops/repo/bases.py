"""Base blocks read back from storage: what a page delta compressed against its base needs.

A format 5 page delta is compressed with its base block as zstd dictionary
(:meth:`dbops.repo.codec.Encoder.encode_on`). Whoever encodes or checks one without the base
block at hand (the backup, which reads the new block from its folder; ``dbops verify``) fetches
the bases here, a batch at a time: the batch's frames coalesced into ranged GETs
(:func:`dbops.repo.ranges.plan_ranges`), every base checked against the 128 bits of sha256 its
ref keeps, the frames being checked held against a :class:`ByteBudget` (memory: the batch's
bases plus the budget).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing

from dbops.errors import DamagedObjectError, NotFoundError, ValidationError
from dbops.repo import blocks, codec
from dbops.repo.model import FILE, ChunkRef, FileEntry
from dbops.repo.ranges import ByteBudget, frame_chunks, frames_read, open_range, plan_ranges
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

BATCH_BYTES = 16 * 1024 * 1024  # raw bytes of base blocks fetched together (at scale 400, 4 MiB took 1,514 GETs)
# Pages of a batch's deltas held at most, and as many of their bases' pages fetched: a store worker
# holds up to two batches (one fetched ahead) and the next one's pages, so about 4x this. By block
# count alone (BATCH_BYTES), a batch of blocks whose pages all changed again (a chain of
# incrementals, each delta covering the pages of the one before) held 16 MiB of pages and 16 MiB of
# bases: at scale 100, four batches of them were 131 MB of the store's 221 MB peak.
BATCH_PAGES_BYTES = 4 * 1024 * 1024

# A page delta waiting for its base block: (its place in a unit's refs, its pages, mask, base,
# the parent's ref of the block).
Delta = tuple[int, bytes, int, ChunkRef, ChunkRef]


class BaseReader:
    """Fetches base blocks by their refs; counts the GETs, bytes and seconds it took (thread-safe).
    ``ahead``: threads that fetch a batch while its caller goes on (:meth:`fetch_ahead`)."""

    def __init__(self, store: ObjectStore, layout: Layout, budget: ByteBudget, ahead: int = 0):
        self.store, self.layout, self.budget = store, layout, budget
        self.decoder = codec.Decoder()
        self.lock = threading.Lock()
        self.requests = self.fetched_bytes = self.blocks = 0
        self.seconds = 0.0
        self.pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="dbops-bases") if ahead else None

    def fetch_ahead(self, refs: Sequence[ChunkRef], what: str,
                    masks: Sequence[int] | None = None) -> Future[list[bytes | memoryview]]:
        """:meth:`fetch_checked` on one of the ``ahead`` threads (in the caller's thread without them)."""
        if self.pool is None:
            done: Future[list[bytes | memoryview]] = Future()
            try:
                done.set_result(self.fetch_checked(refs, what, masks))
            except Exception as e:
                done.set_exception(e)
            return done
        return self.pool.submit(self.fetch_checked, refs, what, masks)

    def close(self) -> None:
        """Stop the ``ahead`` threads: a fetch not started is dropped, a running one finishes."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def fetch(self, refs: Sequence[ChunkRef]) -> list[bytes | memoryview | None]:
        """The raw bytes of every ref's block, in order; None for one whose object is missing or
        damaged (:meth:`fetch_checked` raises, naming the object and why, instead)."""
        return self._fetch(refs)[0]

    def fetch_checked(self, refs: Sequence[ChunkRef], what: str,
                      masks: Sequence[int] | None = None) -> list[bytes | memoryview]:
        """Like :meth:`fetch`, raising ValidationError (naming the object and ``what``) for a base
        block that is missing or damaged. ``masks``: of each block (checked whole), only its pages
        in the mask are kept (:func:`blocks.same_pages`: what a delta needs of its base)."""
        out, problems = self._fetch(refs, masks)
        if problems:
            key, why = problems[0]
            raise ValidationError(f"{what}: a base block of its page deltas is missing or damaged in storage",
                                  detail=f"object {key}: {why}",
                                  hint="the parent backup cannot be restored; run `dbops verify` on it and take "
                                       "a new full backup")
        return out  # type: ignore[return-value]  # no None without a problem

    def _fetch(self, refs: Sequence[ChunkRef], masks: Sequence[int] | None = None,
               ) -> tuple[list[bytes | memoryview | None], list[tuple[str, str]]]:
        t0 = time.monotonic()
        files = [FileEntry(str(i), FILE, 0o600, 0, r.raw, None, (r,), r.raw) for i, r in enumerate(refs)]
        out: list[bytes | memoryview | None] = [None] * len(refs)
        problems: list[tuple[str, str]] = []
        requests = fetched = 0
        for rng in plan_ranges(None, files):
            key = self.layout.pack(rng.pack)
            requests += 1
            try:
                with open_range(self.store, key, rng) as src, \
                        closing(frames_read(src, rng, self.budget)) as frames:
                    for fr, stored in frames:
                        fetched += len(stored)
                        for run, raw, why in frame_chunks(self.decoder, fr, stored):
                            if raw is None:
                                problems.append((key, why))
                            elif masks is not None:  # a copy of the pages wanted only (the frame is dropped)
                                out[run.file_no] = blocks.same_pages(raw, masks[run.file_no])
                            else:
                                out[run.file_no] = memoryview(bytes(raw))  # the frame's buffer is reused
            except NotFoundError:
                problems.append((key, "object is missing"))
            except DamagedObjectError as e:  # an encrypted segment failed its authentication tag
                problems.append((key, e.message))
        with self.lock:
            self.requests += requests
            self.fetched_bytes += fetched
            self.blocks += len(refs)
            self.seconds += time.monotonic() - t0
        return out, problems


def encode_deltas(encoder: codec.Encoder, deltas: Sequence[Delta],
                  bases: Sequence[bytes | memoryview]) -> list[tuple[bytes, int, bytes] | None]:
    """(pages, mask, bytes to store) of each delta, compressed against its base's same pages
    (``bases``: of each delta's base block, its pages in the delta's mask, in order, fetched and
    checked by :meth:`BaseReader.fetch_checked` with the masks). Only the pages that differ from
    the base are kept (a page can get a new LSN and its old content back); None: none differs and
    the parent's ref is that whole block, to be reused as it is."""
    out: list[tuple[bytes, int, bytes] | None] = []
    for (_, payload, mask, _, pref), old in zip(deltas, bases, strict=True):
        fewer, less, was = blocks.differing(payload, mask, old)
        if not less and not pref.mask:
            out.append(None)
            continue
        if less:
            payload, mask, old = fewer, less, was
        out.append((payload, mask, encoder.encode_on(payload, old)))
    return out
