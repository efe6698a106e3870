"""The page-delta side of a store's snapshot (:class:`dbops.repo.snapshot.Snapshot` mixes it in): a
unit's page deltas, their bases fetched a batch ahead (:class:`dbops.repo.bases.BaseReader`) or
taken from the saved pages, each compressed against its base's pages as a frame of its own."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

from dbops.repo import codec
from dbops.repo.bases import BaseReader, Delta, encode_deltas
from dbops.repo.manifest import ChunkRef
from dbops.repo.packs import Pack, Uploader

# A batch of page deltas and its bases being fetched.
Ahead = tuple[list[Delta], "Future[list[bytes | memoryview]]"]


class DeltaPuts:
    """Needs the snapshot's ``backup_id``, ``bases``, ``encoder``, ``up``, ``pack_size``, ``tmp_dir``,
    ``lock`` and ``c``."""

    backup_id: str
    bases: BaseReader | None
    encoder: codec.Encoder
    up: Uploader
    pack_size: int
    tmp_dir: str
    lock: threading.Lock
    c: dict[str, int]

    def put_deltas(self, pack: Pack, ahead: Ahead | None, pending: list[Delta], refs: list[ChunkRef | None],
                   path: str, last: bool = False) -> tuple[Pack, Ahead | None]:
        """Start fetching the bases of ``pending`` (a batch), then store the batch ``ahead`` (fetched
        meanwhile) and, when ``last``, this one too, each delta compressed against its base
        (:func:`bases.encode_deltas`) as a frame of its own; returns the pack to go on with and the
        batch still being fetched (memory: at most two batches per worker)."""
        assert self.bases is not None
        fetching = (pending, self.bases.fetch_ahead([d[3] for d in pending], f"backup {self.backup_id}: {path}",
                                                    [d[2] for d in pending])) if pending else None
        done = same = 0
        for batch, bases in filter(None, (ahead, fetching) if last else (ahead,)):
            pack, n, s = self.put_encoded(pack, batch, bases.result(), refs)
            done, same = done + n, same + s
        with self.lock:
            self.c["delta"] += done - same
            self.c["reused"] += same
        return pack, None if last else fetching

    def put_encoded(self, pack: Pack, batch: list[Delta], bases: Sequence[bytes | memoryview],
                    refs: list[ChunkRef | None]) -> tuple[Pack, int, int]:
        """Each delta of the batch compressed against its base's pages (:func:`bases.encode_deltas`)
        as a frame of its own into the pack; returns the pack to go on with, the deltas done and how
        many of them took the parent's whole block instead (none of their pages differed)."""
        same = 0
        for (i, _, _, base, pref), enc in zip(batch, encode_deltas(self.encoder, batch, bases)):
            if enc is None:  # the parent's whole block, unchanged
                refs[i], same = pref, same + 1
                continue
            payload, mask, stored = enc
            h = codec.sha256(payload)
            offset = pack.append(stored, len(payload), [h])
            refs[i] = ChunkRef(h, pack.pack_id, offset, len(stored), base.raw, 0, len(payload), mask, base, True)
            if pack.full(self.pack_size):
                self.up.seal(pack)
                pack = Pack(self.tmp_dir)
        return pack, len(batch), same
