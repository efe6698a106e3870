"""Memory and time of store, verify and restore with many relation files (no server, no S3).

    python bench/bench_manyfiles.py make DIR 1e6       (a data folder of that many empty files)
    python bench/bench_manyfiles.py run DIR WORK       (under benchlock when the times matter)
    python bench/bench_manyfiles.py plan DIR           (the direct copy's plan of DIR)

``make``: DIR/base/16384 holds the files, three a relation (main fork, fsm, vm), as a cluster with
many small tables has them (tmpfs makes them fast to create: /dev/shm; remove DIR after).
``run``: in a child process each (peak RSS from ``ru_maxrss``), the folder stored to a local store
in WORK (``store_snapshot``: the walk, the manifest), then ``verify`` and a restore of it into
WORK/restored (removed after: ``restore_peak_mib`` is the peak before the removal, which lists
the whole folder at once). ``plan``: ``livecopy.plan_copy`` of DIR, as a full backup's direct
copy plans it. One JSON line each.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make(root: str, n: int) -> None:
    db = os.path.join(root, "base", "16384")
    os.makedirs(db, exist_ok=True)
    for d in ("global", "pg_wal", "pg_xact", "pg_tblspc"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    rel, made = 16385, 0
    while made < n:
        for suffix in ("", "_fsm", "_vm"):
            os.close(os.open(os.path.join(db, f"{rel}{suffix}"), os.O_CREAT | os.O_WRONLY, 0o600))
            made += 1
        rel += 1


def child(what: str, data: str, work: str) -> dict:
    from dbops.config import CompressionSettings
    from dbops.repo import manifest as mf
    from dbops.repo.manifest import PgState
    from dbops.storage.layout import Layout
    from dbops.storage.local import LocalStore

    store, layout = LocalStore(os.path.join(work, "store")), Layout("clusters/main")
    t, c = time.perf_counter(), time.process_time()
    out: dict = {"what": what}
    if what == "store":
        from dbops.repo.store import store_snapshot

        m = store_snapshot(store, layout, data, backup_id="b1", chunk_size=1 << 20, pack_size=64 << 20, parallel=2,
                           pg=PgState("15", "1", 1, 0x3000028, 0x3000100, 0.0), include_wal=False,
                           compression=CompressionSettings("zstd", 3), tmp_dir=work)
        out["files"] = m.counts["files"]
    elif what == "verify":
        from dbops.repo.verify import verify_backup

        verify_backup(store, layout, mf.load(store, layout, "b1", tmp_dir=work), 2)
    elif what == "restore":
        from dbops.repo.restore import restore_snapshot

        target = os.path.join(work, "restored")
        restore_snapshot(store, layout, mf.load(store, layout, "b1", tmp_dir=work, keep_listing=True), target,
                         parallel=2)
        out["restore_peak_mib"] = _peak_mib()  # the removal below lists the whole folder (shutil.rmtree)
        shutil.rmtree(target)
    elif what == "plan":
        from dbops.ops.backup import livecopy

        class Backup:  # what plan_copy reads of an OnlineBackup
            data_dir = Path(data)
            tablespace_dir = "PG_15_0"

        p = livecopy.plan_copy(Backup(), Path(work) / "data", None, "postgres")  # type: ignore[arg-type]
        out["files"] = sum(1 for _ in p.files())
    out.update(wall_s=round(time.perf_counter() - t, 2), cpu_s=round(time.process_time() - c, 2), peak_mib=_peak_mib())
    return out


def _peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str]) -> None:
    if argv[0] == "make":
        make(argv[1], int(float(argv[2])))
    elif argv[0] == "--child":
        print(json.dumps(child(*argv[1:4])))
    else:
        steps = ["plan"] if argv[0] == "plan" else ["store", "verify", "restore"]
        work = argv[2] if len(argv) > 2 else argv[1] + ".work"
        os.makedirs(work, exist_ok=True)
        for what in steps:
            r = subprocess.run([sys.executable, __file__, "--child", what, argv[1], work], check=True,
                               capture_output=True, text=True)
            print(r.stdout.strip(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
