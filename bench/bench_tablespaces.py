"""Benchmark: full and incremental backup times with a third of the data in a tablespace, against
the same data without tablespaces.

Builds its own lab without replicas (a replica on the same host would share the tablespace
folder): `pgbench -i -s SCALE --partitions=3`, then

1. without tablespaces: a full backup, `pgbench -T N`, an incremental (validated) backup;
2. `pgbench_accounts_1` (a third of the accounts, about a third of the data) and its primary
   key moved into a tablespace, then the same: a full backup, `pgbench -T N`, an incremental.

    python bench/bench_tablespaces.py --dir DIR [--scale 30] [--pgbench-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod
from dbops.ops.backup import run as bk
from dbops.pg import conn as pgconn

try:
    from bench.bench_backup import pgbench
except ImportError:  # run as a script from bench/
    from bench_backup import pgbench  # type: ignore[no-redef]


def _pair(lab: labmod.LabInfo, label: str, seconds: int) -> list[dict]:
    out = []
    t0 = time.monotonic()
    full = bk.run_backup(lab.config, full=True)
    out.append({"bench": "backup_full", "layout": label, "wall_seconds": round(time.monotonic() - t0, 2),
                "logical_bytes": full.manifest.logical_size, "stored_bytes": full.manifest.stored_bytes,
                "tablespace_bytes": sum(t.size for t in full.manifest.tablespaces),
                "phases": full.timings})
    pgbench(lab, "-c", "4", "-j", "2", "-T", str(seconds), "-n")
    t0 = time.monotonic()
    inc = bk.run_backup(lab.config)
    out.append({"bench": "backup_incremental_validated", "layout": label,
                "wall_seconds": round(time.monotonic() - t0, 2), "logical_bytes": inc.manifest.logical_size,
                "stored_bytes": inc.manifest.stored_bytes,
                "tablespace_bytes": sum(t.size for t in inc.manifest.tablespaces),
                "phases": inc.timings})
    return out


def run(d: Path, scale: int = 30, pgbench_seconds: int = 20) -> list[dict]:
    lab = labmod.up(d, replicas=0)
    try:
        pgbench(lab, "-i", "-s", str(scale), "-q", "--partitions=3")
        out = _pair(lab, "no tablespace", pgbench_seconds)
        loc = d / "tblspc-third"
        loc.mkdir(mode=0o700, exist_ok=True)
        proc.run(["chown", "postgres:postgres", str(loc)])
        with pgconn.session(lab.primary) as c:
            c.execute(f"CREATE TABLESPACE third LOCATION '{loc}'")
            c.execute("ALTER TABLE pgbench_accounts_1 SET TABLESPACE third")
            c.execute("ALTER INDEX pgbench_accounts_1_pkey SET TABLESPACE third")
            c.execute("CHECKPOINT")
        out += _pair(lab, "a third in a tablespace", pgbench_seconds)
        return out
    finally:
        labmod.down(d, purge=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--pgbench-seconds", type=int, default=20)
    a = ap.parse_args()
    d = Path(a.dir)
    d.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(d.parent, 0o755)
    for rec in run(d, a.scale, a.pgbench_seconds):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
