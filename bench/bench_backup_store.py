"""Benchmark: store then restore one stopped data folder; prints one JSON line.

    python bench/bench_backup_store.py --data-dir DIR (--config dbops.yaml | --local-store DIR)
        [--chunk-size 8KiB] [--pack-size 64MiB] [--parallel 4] [--parent BACKUP_ID] [--keep]

Every run writes under its own layout prefix (``bench/<id>``) and, unless ``--keep``,
deletes what it wrote afterwards. ``--parent`` (with ``--prefix`` of an earlier kept run)
measures an incremental store against that backup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any

from dbops import config as cfgmod
from dbops.repo import catalog
from dbops.repo import restore
from dbops.repo import store
from dbops.repo import manifest as mf
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout


def _cpu() -> float:
    """CPU seconds this process used so far (all threads): stable where wall time is noisy."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Counting:
    """Wraps a store to count PUTs and ranged GETs."""

    def __init__(self, inner: ObjectStore):
        self.inner = inner
        self.puts = 0
        self.gets = 0

    def put(self, key, data, **kw):
        self.puts += 1
        return self.inner.put(key, data, **kw)

    def get_range(self, key, start, length):
        self.gets += 1
        return self.inner.get_range(key, start, length)

    def open_range(self, key, start, length):
        self.gets += 1
        return self.inner.open_range(key, start, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def bench_backup_store(
    data_dir: str,
    object_store: ObjectStore,
    layout: Layout,
    *,
    chunk_size: int = cfgmod.BackupSettings.chunk_size,
    pack_size: int = cfgmod.BackupSettings.pack_size,
    parallel: int = cfgmod.BackupSettings.parallel,
    compression: cfgmod.CompressionSettings | None = None,
    parent_id: str | None = None,
    scratch_dir: str | None = None,
    restore_too: bool = True,
) -> dict[str, Any]:
    """Store ``data_dir`` (and restore it into a scratch folder); print and return one JSON result."""
    counting = _Counting(object_store)
    parents = [mf.load(object_store, layout, parent_id)] if parent_id else []
    backup_id = catalog.new_backup_id()
    t0, c0 = time.monotonic(), _cpu()
    m = store.store_snapshot(counting, layout, data_dir, backup_id=backup_id, parent_manifests=parents,
                             compression=compression, chunk_size=chunk_size, pack_size=pack_size,
                             parallel=parallel, meta={"bench": True})
    store_s, store_cpu = time.monotonic() - t0, _cpu() - c0
    mib = m.logical_size / 2**20
    result: dict[str, Any] = {
        "bench": "backup_store",
        "backup_id": backup_id,
        "logical_bytes": m.logical_size,
        "chunk_size": chunk_size,
        "parallel": parallel,
        "incremental": bool(parents),
        "store_s": round(store_s, 3),
        "store_mib_s": round(mib / store_s, 1),
        "store_cpu_s": round(store_cpu, 2),
        "stored_bytes": m.stored_bytes,
        "new_chunks": m.counts["new_chunks"],
        "chunks": m.counts["chunks"],
        "packs": m.counts["packs"],
        "puts": counting.puts,
        "manifest_bytes": len(m.to_bytes()),
    }
    if restore_too:
        target = tempfile.mkdtemp(prefix="dbops-bench-restore-", dir=scratch_dir)
        try:
            os.rmdir(target)
            c0 = _cpu()
            stats = restore.restore_snapshot(counting, layout, m, target, parallel=parallel)
            restore_cpu = _cpu() - c0
        finally:
            shutil.rmtree(target, ignore_errors=True)
        result.update(restore_s=stats.seconds, restore_mib_s=round(mib / stats.seconds, 1),
                      restore_cpu_s=round(restore_cpu, 2),
                      restore_gets=stats.requests, fetched_bytes=stats.fetched_bytes)
    print(json.dumps(result), flush=True)
    return result


def _cleanup(object_store: ObjectStore, layout: Layout) -> None:
    object_store.delete_many([o.key for o in object_store.list(layout.root)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="a stopped PostgreSQL data folder")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="dbops.yaml whose storage section names the S3 bucket")
    where.add_argument("--local-store", help="a folder to use as object store instead of S3")
    ap.add_argument("--prefix", help="layout prefix (default: bench/<random>)")
    ap.add_argument("--chunk-size", type=cfgmod.parse_size, default=cfgmod.BackupSettings.chunk_size)
    ap.add_argument("--pack-size", type=cfgmod.parse_size, default=cfgmod.BackupSettings.pack_size)
    ap.add_argument("--parallel", type=int, default=cfgmod.BackupSettings.parallel)
    ap.add_argument("--level", type=int, default=3, help="zstd level")
    ap.add_argument("--parent", help="backup id under the same prefix to store incrementally against")
    ap.add_argument("--no-restore", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep what was written (for a later --parent run)")
    args = ap.parse_args(argv)

    if args.config:
        from dbops.storage.s3 import S3Store

        object_store: ObjectStore = S3Store(cfgmod.load(args.config).storage)
    else:
        from dbops.storage.local import LocalStore

        object_store = LocalStore(args.local_store)
    layout = Layout(args.prefix or f"bench/{os.urandom(4).hex()}")
    try:
        bench_backup_store(args.data_dir, object_store, layout, chunk_size=args.chunk_size,
                           pack_size=args.pack_size, parallel=args.parallel,
                           compression=cfgmod.CompressionSettings("zstd", args.level), parent_id=args.parent,
                           restore_too=not args.no_restore)
    finally:
        if not args.keep:
            _cleanup(object_store, layout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
