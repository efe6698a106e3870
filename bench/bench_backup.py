"""Benchmark: a first (full) backup, 30 s of pgbench, a second (validated, incremental) backup.

Prints one JSON object per measurement. With pgBackRest installed, the same database and S3
server are backed up with it too (zstd level 3, process-max 2), and the ratios are printed.

    python bench/bench_backup.py --lab DIR [--pgbench-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dbops.lab import harness as labmod
from dbops import proc
from dbops.ops.backup import run as bk
from dbops.pg import binaries

try:
    from bench import pgbackrest_peer
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]


def pgbench(lab: labmod.LabInfo, *args: str, timeout: float = 3600) -> str:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    return proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres",
                    timeout=timeout).stdout


def _has_pgbench_tables(lab: labmod.LabInfo) -> bool:
    from dbops.pg import conn as pgconn

    with pgconn.session(lab.primary) as c:
        return bool(pgconn.scalar(c, "SELECT to_regclass('pgbench_accounts') IS NOT NULL"))


def run(lab: labmod.LabInfo, scale: int = 100, pgbench_seconds: int = 30) -> list[dict]:
    out: list[dict] = []
    cfg = lab.config
    if not _has_pgbench_tables(lab):
        pgbench(lab, "-i", "-s", str(scale), "-q")
    t0 = time.monotonic()
    first = bk.run_backup(cfg, full=True)
    full_wall = time.monotonic() - t0
    out.append({"bench": "backup_full", "tool": "dbops", "wall_seconds": round(full_wall, 2),
                "logical_bytes": first.manifest.logical_size, "stored_bytes": first.manifest.stored_bytes,
                "phases": first.timings})
    pgbench(lab, "-c", "4", "-j", "2", "-T", str(pgbench_seconds), "-n")
    t0 = time.monotonic()
    second = bk.run_backup(cfg)
    incr_wall = time.monotonic() - t0
    out.append({"bench": "backup_incremental_validated", "tool": "dbops", "wall_seconds": round(incr_wall, 2),
                "logical_bytes": second.manifest.logical_size, "stored_bytes": second.manifest.stored_bytes,
                "phases": second.timings,
                "restore_seconds_measured": bk.restore_seconds(second.validated.timings) if second.validated else None})
    peer = pgbackrest_peer.available()
    if peer:
        r = pgbackrest_peer.bench_backup(lab, pgbench, pgbench_seconds)
        out.extend(r)
        full_p = next(x for x in r if x["bench"] == "backup_full")
        incr_p = next(x for x in r if x["bench"] == "backup_incremental")
        out.append({
            "bench": "backup_ratios_vs_pgbackrest",
            "full_wall_ratio": round(full_wall / full_p["wall_seconds"], 2),
            "incremental_wall_ratio": round(incr_wall / incr_p["wall_seconds"], 2),
            "incremental_stored_ratio": round(second.manifest.stored_bytes / max(1, incr_p["stored_bytes"]), 3),
            "goals": {"full_wall_ratio": "<= 1.0", "incremental_wall_ratio": "<= 1.5",
                      "incremental_stored_ratio": "<= 0.5"},
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lab", required=True)
    ap.add_argument("--pgbench-seconds", type=int, default=30)
    a = ap.parse_args()
    for rec in run(labmod.info(Path(a.lab)), pgbench_seconds=a.pgbench_seconds):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
