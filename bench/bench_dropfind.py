"""Benchmark: how fast `dbops wal find --dropped` finds a DROP TABLE, as a function of the WAL searched.

A table is created and a backup taken (its relation map knows the table); then WAL is written
(bulk inserts into a filler table) until BENCH_DROPFIND_GB (default "1 4") gigabytes lie after the
backup, the table is dropped, the WAL archived, and the search timed. Reports seconds per GB of WAL
searched (goal: under 10 s per GB on a 2-core machine).

    python bench/run.py --only bench_dropfind
"""

from __future__ import annotations

import os
import time

from dbops.lab import harness as labmod
from dbops.ops.backup import run as bk
from dbops.ops.wal import dropfind
from dbops.pg import conn as pgconn

try:
    from bench.bench_restore import _archived_through_now
except ImportError:  # run as a script from bench/
    from bench_restore import _archived_through_now  # type: ignore[no-redef]

GB = 1024 ** 3


def _sql(lab: labmod.LabInfo, statement: str):
    with pgconn.session(lab.primary, options="-c statement_timeout=0") as c:
        cur = c.execute(statement)
        return cur.fetchall() if cur.description else None


def _write_wal(lab: labmod.LabInfo, start_lsn: str, gigabytes: float) -> None:
    """Bulk inserts until `gigabytes` of WAL follow start_lsn."""
    while True:
        done = _sql(lab, f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn")[0][0]
        if done >= gigabytes * GB:
            return
        _sql(lab, "INSERT INTO bench_filler SELECT g, repeat(md5(g::text), 28) FROM generate_series(1, 200000) g")
        _sql(lab, "TRUNCATE bench_filler")  # keeps the database small; the WAL is what counts


def run(lab: labmod.LabInfo, scale: int = 100, **_kw) -> list[dict]:
    sizes = [float(x) for x in os.environ.get("BENCH_DROPFIND_GB", "1 4").split()]
    _sql(lab, "DROP TABLE IF EXISTS bench_victim")
    _sql(lab, "CREATE TABLE bench_victim (id int PRIMARY KEY, note text)")
    _sql(lab, "INSERT INTO bench_victim SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
    _sql(lab, "CREATE TABLE IF NOT EXISTS bench_filler (id int, note text)")
    _archived_through_now(lab)
    os.environ["DBOPS_LOCK_DIR"] = str(lab.dir / "run")
    try:
        backup_id = bk.run_backup(lab.config).backup_id
    finally:
        os.environ.pop("DBOPS_LOCK_DIR", None)
    start = _sql(lab, "SELECT pg_current_wal_lsn()")[0][0]
    out = []
    dropped = False
    for gb in sizes:
        _write_wal(lab, str(start), gb)
        if not dropped:
            _sql(lab, "DROP TABLE bench_victim")
            dropped = True
        _archived_through_now(lab, timeout=1800)
        t0 = time.monotonic()
        (search,) = dropfind.find(lab.config, ["bench_victim"])
        seconds = time.monotonic() - t0
        f = search.findings
        out.append({"bench": "before_drop_find", "backup": backup_id, "wal_gb": round(search.wal_bytes / GB, 3),
                    "stored_gb": round(search.stored_bytes / GB, 3), "segments": search.segments, "seconds": round(seconds, 2),
                    "s_per_gb": round(seconds / max(search.wal_bytes / GB, 1e-9), 2),
                    "found": len(f), "kind": f[0].kind if f else None, "goal_s_per_gb": 10,
                    "cpus": os.cpu_count()})
    return out
