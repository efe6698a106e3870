"""`dbops restore --delta`: bring an existing data folder to a backup's content, fetching only
the chunks whose hash differs.

Every chunk of every file the backup lists is read locally and hashed (in parallel); a chunk
that matches stays, one that differs or is missing is fetched (coalesced ranged GETs, verified
like a full restore), an all-zero chunk is zeroed when it is not. Files, folders and links the
backup does not have are removed. Restoring a big primary in place then costs reading it once
plus downloading what changed. A page delta (manifest format 4 and 5) has no hash of its whole
block: it is always fetched (its base block, then its pages over it; a format 5 delta is decoded
with that base block, read back from the file: see :func:`dbops.repo.rangewrite.write_range`).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from dbops import heap, log
from dbops.fsafe import NOFOLLOW
from dbops.repo import codec
from dbops.repo.manifest import DIR, FILE, SYMLINK, ChunkRef, FileEntry, Manifest
from dbops.repo.ranges import Range, base_view, batches, delta_view, plan_ranges
from dbops.repo.mlisting import Listed
from dbops.repo.finish import as_restored, finish_files, finish_tree, mark_wal_archived, reset_unlogged
from dbops.repo.rangewrite import write_range
from dbops.repo.restore import make_links
from dbops.repo.tblspc import finish_tablespace_roots, link_tablespaces, restored_links, tablespace_folders
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("restore.delta")


def _remove_extra(target: Path, wanted: dict[str, str], prefix: str = "") -> int:
    """Remove every entry the backup does not list (or lists as another type); deepest first.
    ``prefix``: what the backup's paths of this folder start with (a tablespace's pg_tblspc/<OID>/)."""
    removed = 0
    for root, dirs, files in os.walk(target, topdown=False):
        for name in files + dirs:
            p = Path(root) / name
            rel = prefix + p.relative_to(target).as_posix()
            want = wanted.get(rel)
            st = p.lstat()
            kind = SYMLINK if stat.S_ISLNK(st.st_mode) else DIR if stat.S_ISDIR(st.st_mode) else FILE
            if want == kind:
                continue
            if kind == DIR:
                shutil.rmtree(p)
            else:
                p.unlink()
            removed += 1
    return removed


def _compare(target: Path, f: FileEntry) -> tuple[FileEntry, int, int]:
    """(the entry with matching chunks marked as not to fetch, bytes kept, bytes zeroed)."""
    p = target / f.path
    fd = os.open(p, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o600)
    kept = zeroed = 0
    chunks: list[ChunkRef] = []
    try:
        if os.fstat(fd).st_size != f.size:
            os.ftruncate(fd, f.size)
        for n, c in enumerate(f.chunks):
            if c.mask:  # a page delta: no hash of the whole block to compare with; always fetched
                chunks.append(c)
                continue
            block = os.pread(fd, c.raw, n * f.block)
            if c.is_zero:
                if block.count(0) != len(block):
                    os.pwrite(fd, bytes(c.raw), n * f.block)
                    zeroed += c.raw
                chunks.append(c)
            elif len(block) == c.raw and codec.sha256(block) == c.hash:
                chunks.append(ChunkRef(c.hash, None, 0, 0, c.raw))
                kept += c.raw
            else:
                chunks.append(c)
    finally:
        os.close(fd)
    return replace(f, chunks=tuple(chunks)), kept, zeroed


def restore_delta(store: ObjectStore, layout: Layout, manifest: Manifest, target: Path, *, parallel: int,
                  owner: str | None = None, tablespace_dirs: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Make `target` (and each tablespace's folder) hold exactly the backup's content; returns what
    it kept and fetched. ``tablespace_dirs``: {OID: folder} for every tablespace the backup lists.
    The passes other than the content's read the manifest's listing kept compact, read and checked once
    before anything is changed (:meth:`Manifest.kept_listing`)."""
    with manifest.kept_listing() as listed:
        return _restore_delta(store, layout, manifest, target, listed, parallel=parallel, owner=owner,
                              tablespace_dirs=tablespace_dirs)


def _restore_delta(store: ObjectStore, layout: Layout, manifest: Manifest, target: Path, listed: Listed | None, *,
                   parallel: int, owner: str | None, tablespace_dirs: Mapping[int, str] | None) -> dict[str, Any]:
    manifest.check()
    ids = (pwd.getpwnam(owner).pw_uid, pwd.getpwnam(owner).pw_gid) if owner else None
    dests = tablespace_folders(manifest, tablespace_dirs)
    wanted = {e.path: e.type for e in map(as_restored, manifest.listing())}
    removed = _remove_extra(target, wanted)
    for t in manifest.tablespaces:
        dests[t.oid].mkdir(parents=True, mode=0o700, exist_ok=True)
        removed += _remove_extra(dests[t.oid], wanted, prefix=t.link + "/")
    link_tablespaces(target, manifest, dests)
    links = {e.path for e in restored_links(manifest)}
    late = []  # links made last, after every file is written: nothing is ever written through them
    for e in map(as_restored, manifest.listing()):
        if e.type == DIR and e.path != ".":
            (target / e.path).mkdir(mode=0o700, exist_ok=True)
        elif e.type != SYMLINK or e.path not in links:
            continue
        elif not (target / e.path).is_symlink():
            late.append(e)
        elif os.readlink(target / e.path) != e.target:
            (target / e.path).unlink()
            late.append(e)
    totals = {"files": 0, "logical_bytes": 0, "kept_bytes": 0, "zeroed_bytes": 0, "fetched_bytes": 0,
              "requests": 0, "compare_seconds": 0.0}
    for f in manifest.listing():  # files without content: created or emptied here
        if f.type == FILE and not f.size:
            _compare(target, f)
    # Batch by batch: compare (in parallel), then fetch what differs; memory stays bounded.
    with heap.fewer_collections(), ThreadPoolExecutor(max_workers=max(1, parallel),
                                                      thread_name_prefix="dbops-delta") as pool:
        for files in batches(manifest):
            t = time.monotonic()
            compared = list(pool.map(lambda f: _compare(target, f), files))
            totals["compare_seconds"] += time.monotonic() - t
            fetched, requests = _fetch_into(store, layout, manifest, target, [c[0] for c in compared], parallel)
            totals["fetched_bytes"] += fetched
            totals["requests"] += requests
            totals["kept_bytes"] += sum(c[1] for c in compared)
            totals["zeroed_bytes"] += sum(c[2] for c in compared)
    for f in manifest.listing():
        if f.type == FILE:
            totals["files"] += 1
            totals["logical_bytes"] += f.size
    (target / "pg_wal" / "archive_status").mkdir(parents=True, mode=0o700, exist_ok=True)
    extra = mark_wal_archived(target, manifest) + reset_unlogged(target, manifest, listed)

    finish_files(target, itertools.chain((f for f in manifest.listing() if f.type == FILE), extra), ids, parallel)
    make_links(target, late, ids)
    finish_tree(target, manifest, ids)
    finish_tablespace_roots(dests, ids)
    d = {"mode": "delta", **totals, "removed": removed, "compare_seconds": round(totals["compare_seconds"], 3)}
    _log.info("delta restore of %s into %s: kept %d bytes, fetched %d bytes", manifest.backup_id, target,
              d["kept_bytes"], fetched)
    return d


def _fetch_into(store: ObjectStore, layout: Layout, manifest: Manifest, target: Path, files: list[FileEntry],
                parallel: int) -> tuple[int, int]:
    """Fetch, verify and write every chunk the (patched) files still need; (bytes fetched, requests)."""
    decoder = codec.Decoder()
    lock = threading.Lock()
    totals = [0, 0]

    def fetch(rng: Range) -> None:
        fetched, _written = write_range(store, layout, manifest, target, files, rng, decoder)
        with lock:
            totals[0] += fetched
            totals[1] += 1

    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="dbops-delta-fetch") as pool:
        # whole blocks (page deltas' bases included) first, then the deltas' pages over them
        for phase in ([base_view(f) for f in files], [delta_view(f) or f.with_chunks(()) for f in files]):
            for _ in pool.map(fetch, plan_ranges(manifest, phase)):
                pass
    return totals[0], totals[1]
