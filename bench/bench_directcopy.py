"""Memory and time of the full backup's direct copy (plan and copy) with many relation files.

    python bench/bench_directcopy.py make DIR 1e6 [BIG]   (a data folder of that many files)
    python bench/bench_directcopy.py run DIR WORK [WORKERS] (under benchlock when the times matter)

``make``: DIR/base/16384 holds the files, three a relation (main fork, fsm, vm), as a cluster with
many small tables has them; every tenth relation's main fork has one 8 KiB page, the rest are
empty; plus BIG (default 1) sparse 1 GiB segments (``base/16385/<n>``), copied in 64 MiB ranges.
tmpfs makes them fast to create: /dev/shm (remove DIR after).
``run``: in a child process (peak RSS from ``ru_maxrss``), ``livecopy.plan_copy`` of DIR with a
stand-in for the OnlineBackup (it only reads ``data_dir`` and ``tablespace_dir``), then
``livecopy.execute`` into WORK/data with a :class:`Copied` and a thread that follows the copy as
the store does (``Copied.wait`` for each range of each file of ``plan.entries()``, in order, no
hashing); WORK/data is removed after. One JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def make(root: str, n: int, big: int = 1) -> None:
    db = os.path.join(root, "base", "16384")
    os.makedirs(db, exist_ok=True)
    for d in ("global", "pg_wal", "pg_xact", "pg_tblspc", "base/16385"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, "global", "pg_control"), "wb") as f:
        f.write(b"\0" * 8192)
    page = b"\1" * 8192
    rel, made = 16385, 0
    while made < n:
        for suffix in ("", "_fsm", "_vm"):
            fd = os.open(os.path.join(db, f"{rel}{suffix}"), os.O_CREAT | os.O_WRONLY, 0o600)
            if not suffix and rel % 10 == 0:
                os.write(fd, page)
            os.close(fd)
            made += 1
        rel += 1
    for i in range(big):
        with open(os.path.join(root, "base", "16385", "20000" + (f".{i}" if i else "")), "wb") as f:
            f.truncate(1 << 30)


def child(data: str, work: str, workers: int) -> dict:
    from dbops.ops.backup import livecopy
    from dbops.repo.manifest import FILE

    class Backup:  # what plan_copy reads of an OnlineBackup
        data_dir = Path(data)
        tablespace_dir = "PG_15_0"

    out: dict = {}
    t, c = time.perf_counter(), time.process_time()
    p = livecopy.plan_copy(Backup(), Path(work) / "data", None, "postgres")  # type: ignore[arg-type]
    out.update(plan_wall_s=round(time.perf_counter() - t, 2), plan_cpu_s=round(time.process_time() - c, 2),
               plan_peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    copied = livecopy.Copied()
    files = p.entries()
    waited = [0, 0]

    def follow() -> None:  # as the store that follows the copy: each range of each file, in order
        for e in files:
            if e.type != FILE:
                continue
            for start in range(0, e.size, 1 << 20):
                if not copied.wait(e.src, start, min(e.size, start + (1 << 20))):
                    return
                waited[1] += 1
            waited[0] += 1

    reader = threading.Thread(target=follow)
    t2, c2 = time.perf_counter(), time.process_time()
    reader.start()
    stats = livecopy.execute(p, os_user="postgres", workers=workers, copied=copied)
    reader.join()
    out.update(copy_wall_s=round(time.perf_counter() - t2, 2), copy_cpu_s=round(time.process_time() - c2, 2),
               files=stats.files, bytes=stats.bytes, followed_files=waited[0], followed_waits=waited[1])
    out.update(wall_s=round(time.perf_counter() - t, 2), cpu_s=round(time.process_time() - c, 2),
               peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return out


def main(argv: list[str]) -> None:
    if argv[0] == "make":
        make(argv[1], int(float(argv[2])), int(argv[3]) if len(argv) > 3 else 1)
    elif argv[0] == "--child":
        print(json.dumps(child(argv[1], argv[2], int(argv[3]))))
    else:
        data, work = argv[1], argv[2]
        workers = int(argv[3]) if len(argv) > 3 else 2
        os.makedirs(work, exist_ok=True)
        os.sync()  # untimed: a run does not pay for the last one's writes
        try:
            r = subprocess.run([sys.executable, __file__, "--child", data, work, str(workers)], check=True,
                               capture_output=True, text=True)
        finally:
            shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
        import dbops

        rec = {"bench": "directcopy", "code": os.path.dirname(os.path.dirname(dbops.__file__)), "workers": workers,
               "load": os.getloadavg()[0], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **json.loads(r.stdout)}
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
