"""Store side: a stopped data folder into blocks, packed and uploaded, with a streamed manifest.

Pipeline (threads; sha256, zstd and file reads release the GIL), memory flat in database size:

* the walk yields entries in path order; each file gets a block size by its size
  (:func:`blocks.block_size`) and is cut into work units of up to ``storeorder.UNIT_BYTES``;
* the parent manifest is read alongside, entry by entry (positional reuse: block i of a file
  is compared with block i of the same file in the parent, never looked up in a dictionary);
* ``parallel`` workers take a unit each and read it block by block. A block of a relation's
  main fork whose pages are all no newer than ``unchanged_lsn`` keeps the parent's reference
  unread beyond its page headers (see :mod:`dbops.repo.blocks`); one with newer pages (in an
  incremental) is stored as a page delta on the parent's block, compressed with that base block
  as dictionary: its base pages taken from the pages saved before replay where they all are
  (:mod:`dbops.repo.savedpages`), else the bases of a unit's deltas are fetched from storage together, up to
  ``bases.BATCH_BYTES`` of blocks and ``bases.BATCH_PAGES_BYTES`` of their pages at a time
  (:mod:`dbops.repo.bases`, ranged GETs, checked), each delta is one frame; every other block is hashed:
  all-zero blocks are not stored, a block equal to the parent's is referenced where it is,
  new blocks are gathered into frames (up to ``FRAME_BYTES`` of one unit's new blocks, in
  file order) and each frame is compressed as one zstd frame into one of ``parallel`` open
  packs, written to local files (``tmp_dir``), not held in memory;
* a pack reaching ``pack_size`` (or ``packs.MAX_BLOCKS`` blocks) is sealed and uploaded (pack,
  then its index) by an upload pool, at most ``parallel`` in flight;
* at most ``storeorder.WINDOW`` units per worker are in flight; a file's entry goes to the manifest file
  as soon as its units are done, in walk order; the manifest is uploaded last, once every pack
  is stored.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dbops import log
from dbops.config import CompressionSettings
from dbops.errors import PreconditionError
from dbops.pg.lsn import segment_of_lsn
from dbops.repo import codec, mformat, walk
from dbops.repo.known import Known
from dbops.repo.packs import PendingUploads
from dbops.repo.savedpages import SavedPages
from dbops.repo.snapshot import Cancelled, Progress, Snapshot  # Cancelled: raised through store_snapshot
from dbops.repo.walk import wal_needed
from dbops.repo.storeorder import write_entries
from dbops.repo import manifest as mf
from dbops.repo.manifest import Manifest, PgState
from dbops.repo import tblspc
from dbops.repo.tblspc import Tablespace
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.store")

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
    unchanged_lsn: int | None = None,
    tmp_dir: str | None = None,
    reuse: Manifest | None = None,
    live: bool = False,
    save: bool = True,
    cancel: threading.Event | None = None,
    tablespaces: Mapping[Tablespace, str] | None = None,
    before_manifest: Callable[[], None] | None = None,
    files: Sequence[walk.WalkEntry] | None = None,
    ready: Callable[[str, int, int], None] | None = None,
    nice: int = 0,
    saved: SavedPages | None = None,
    defer: list[PendingUploads] | None = None,
    known: Known | None = None,
) -> Manifest:
    """Store a stopped data folder as backup ``backup_id`` and return its (written) manifest.

    ``parent_manifests``: the first one is the parent; its blocks are reused where they are equal.
    ``pg``: the snapshot's PostgreSQL state; read from the folder (pg_controldata) when None.
    ``parent_id``: recorded as the parent; defaults to the first of ``parent_manifests``.
    ``include_wal``: carry the WAL segments needed to reach consistency (see :func:`wal_needed`),
    so the restored folder starts without an archive; pg_wal is otherwise left empty.
    ``timings``: earlier phases of the run (merged into the manifest's timings).
    ``unchanged_lsn``: only when data_dir is the parent restored and then WAL replayed from the
    parent's REDO point by a server that wrote no hint bits: main-fork blocks whose pages are
    all no newer than this LSN take the parent's reference without being hashed.
    ``tmp_dir``: where open packs and the manifest are spooled (default: the system's).
    ``reuse``: instead of a parent, a local manifest of this same backup stored earlier from the
    folder (see ``live``), not recorded as parent; its stored bytes and packs count as this one's.
    ``live``: the folder may change while it is read (a server replays WAL into it): a file that
    changes size or vanishes is recorded empty, never failing the run; with ``save=False`` the
    manifest is only written locally (for ``reuse`` by the final store of the stopped folder).
    ``cancel``: set it to stop early (raises :class:`Cancelled`).
    ``tablespaces``: {tablespace: folder holding its contents}; every link in pg_tblspc must be
    one of them (see :func:`dbops.repo.walk.walk`). None: links are recorded without contents.
    ``before_manifest``: called once every pack is stored, before the manifest is made (a check
    still running on the folder waits there); what it raises ends the store with nothing listed.
    ``files``: the entries to store instead of walking data_dir (each read from its ``src``): the
    files a copy is making (see :class:`dbops.ops.backup.livecopy.Copied`), with ``ready(path,
    start, end)`` called before those bytes of a file are read, returning once they are there
    (raising to stop the store). ``nice``: the hashing and compressing threads run at this lower CPU
    priority (the copy they follow keeps the cores first). ``saved``: pages of data_dir copied aside
    before a server ran on it, when it was the first parent restored (see :mod:`dbops.repo.savedpages`):
    a delta on a parent's whole block takes its base pages from there when all of them are saved,
    instead of fetching the base from storage. ``defer`` (with ``save=False``): return once every
    block is in a pack, the last packs still uploading, their :class:`PendingUploads` appended to
    defer; the caller finishes them before any manifest naming these packs is stored (the returned
    manifest counts them as stored). ``known``: files whose identity shows them unwritten since
    their content was known to be the parent's (or ``reuse``'s) entry take its refs unread
    (:mod:`dbops.repo.known`; counts ``unchanged_files``, ``unchanged_bytes``).
    """
    compression = compression or CompressionSettings()
    if chunk_size <= 0 or chunk_size % 8192:
        raise PreconditionError(f"chunk size {chunk_size} is not a positive multiple of 8192")
    t0 = time.monotonic()
    if pg is None:
        from dbops.repo import pgstate  # runs pg_controldata; synthetic folders pass pg

        pg = pgstate.read(data_dir)
    ts_map = None if tablespaces is None else {t.oid: (d, t.location) for t, d in tablespaces.items()}
    ts_list = sorted(tablespaces or (), key=lambda t: t.oid)
    listed = files if files is not None else walk.walk(data_dir, exclude, wal_needed(pg) if include_wal else None,
                                                       ts_map)
    entries = walk.in_path_order(listed)
    redo_segment = segment_of_lsn(pg.timeline, pg.redo_lsn, pg.wal_segment_size)
    if include_wal and not any(e.path == f"pg_wal/{redo_segment}" for e in entries):
        _log.warning("%s has no pg_wal/%s: the restored copy will need the WAL archive to start",
                     data_dir, redo_segment)
    parent = parent_manifests[0] if parent_manifests else reuse
    nfiles, total = walk.file_totals(entries)
    # Hashing and compression are CPU work: more threads than cores only contend for the GIL.
    workers = max(1, min(parallel, os.cpu_count() or 1))
    spool = tempfile.mkdtemp(prefix=f"dbops-store-{backup_id}-", dir=tmp_dir)
    snap = Snapshot(store, layout, backup_id, encoder=codec.Encoder(compression.algorithm, compression.level),
                     pack_size=pack_size, workers=workers, uploads=max(1, parallel), progress=progress,
                     total=total, unchanged_lsn=unchanged_lsn if parent is not None else None, tmp_dir=spool,
                     live=live, cancel=cancel, deltas=bool(parent_manifests), ready=ready,
                     nice=nice, saved=saved)
    fd, mpath = tempfile.mkstemp(prefix=f"dbops-manifest-{backup_id}-", dir=tmp_dir)
    os.close(fd)
    writer = mformat.Writer(mpath)
    pending = PendingUploads(snap.up, spool) if defer is not None and not save else None
    try:
        try:
            skipped = write_entries(snap, entries, data_dir, chunk_size, parent, writer, workers, known)
            t_chunk = time.monotonic()
            if pending is None:
                snap.up.finish()
            if before_manifest is not None:
                before_manifest()
        except BaseException:
            snap.up.abort()
            writer.abort()
            raise
        t_upload = time.monotonic()
        c = snap.c
        stored, packs, frames = snap.up.expected() if pending else (snap.up.stored_bytes, snap.up.packs,
                                                                    snap.up.frames)
        m = Manifest(
            backup_id=backup_id,
            pg=pg,
            chunk_size=chunk_size,
            compression={"algorithm": compression.algorithm, "level": compression.level},
            parent_id=parent_id if parent_id is not None else (
                parent_manifests[0].backup_id if parent_manifests else None),
            logical_size=total,
            stored_bytes=stored + (reuse.stored_bytes if reuse else 0),
            counts={"files": nfiles,
                    "chunks": c["new"] + c["delta"] + c["reused"] + c["lsn_reused"] + c["zero"] + skipped[
                        "unchanged_chunks"], "new_chunks": c["new"], "delta_chunks": c["delta"],
                    "reused_chunks": c["reused"] + c["lsn_reused"] + skipped["unchanged_chunks"],
                    "lsn_reused_chunks": c["lsn_reused"], **skipped,
                    "zero_chunks": c["zero"], "hashed_bytes": c["hashed_bytes"],
                    **({"base_blocks": snap.bases.blocks, "base_requests": snap.bases.requests,
                        "base_fetched_bytes": snap.bases.fetched_bytes} if snap.bases is not None else {}),
                    **({"local_bases": snap.saved.hits, "local_base_misses": snap.saved.misses,
                        "local_base_pages": snap.saved.hit_pages, "saved_pages": snap.saved.saved}
                       if snap.saved is not None else {}),
                    "packs": packs + (reuse.counts.get("packs", 0) if reuse else 0),
                    "frames": frames + (reuse.counts.get("frames", 0) if reuse else 0)},
            meta=dict(meta or {}),
            tablespaces=[dataclasses.replace(t, size=s) for t, s in
                         zip(ts_list, tblspc.sizes(ts_list, entries).values())],
        )
        m.timings = {**(timings or {}), **({"base_fetch": round(snap.bases.seconds, 3)} if snap.bases else {}),
                     "walk_chunk": round(t_chunk - t0, 3),
                     "upload_wait": round(t_upload - t_chunk, 3), "store": round(time.monotonic() - t0, 3)}
        # The returned manifest reads its entries from the written file (removed with it).
        m = Manifest.from_file(writer.finish(m.header(writer)), what=f"manifest of backup {backup_id}")
        if save:
            _log.debug("packs of backup %s stored (%d); writing its manifest", backup_id, snap.up.packs)
            mf.save(store, layout, m, path=mpath)
        if pending is not None:
            defer.append(pending)  # type: ignore[union-attr]
            pending = None
    finally:
        if snap.bases is not None:
            snap.bases.close()
        if pending is not None:  # failed before it was handed over
            pending.abort()
        elif defer is None or save:
            shutil.rmtree(spool, ignore_errors=True)
    _log.info("stored backup %s: %d files, %d bytes, %d new bytes in %d packs, %.1f s", backup_id,
              m.counts["files"], total, stored, packs, m.timings["store"])
    return m
