"""Benchmark: point-in-time restore of the scale-N backup plus 30 s of pgbench WAL, to a time near
the end, started and promoted; side by side with pgBackRest's restore to the same target.

1. two backups: the first validates what came before; the second validates the first, so the
   restore starts from a validated backup with only the pgbench WAL after it (as pgBackRest does
   from its newest backup);
2. pgbench for `pgbench_seconds`; the target is 2 s before it ends; the segment is archived;
3. `dbops restore --to TARGET --start --port N`: wall time split into plan, download (backup and
   WAL fetched ahead in parallel), replay (server start, replay to the target, promotion) and
   start (clean stop, start for the user);
4. with pgBackRest installed (and its backups made by bench_backup), its restore to the same
   target, replaying the same archive through `dbops wal-fetch`, and the ratio (goal <= 1.0).

    python bench/bench_restore.py --lab DIR [--scale 100] [--pgbench-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from dbops.lab import harness as labmod
from dbops import proc
from dbops.ops.backup import run as bk
from dbops.ops.restore import plan as rs
from dbops.ops.restore.target import from_options
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

try:
    from bench import pgbackrest_peer
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]


def _pgbench(lab: labmod.LabInfo, *args: str) -> None:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=3600)


def _archived_through_now(lab: labmod.LabInfo, timeout: float = 300) -> None:
    """Switch WAL and wait until that segment (and so everything before it) is archived."""
    with pgconn.session(lab.primary) as c:
        name = pgconn.scalar(c, "SELECT pg_walfile_name(pg_switch_wal())")
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    deadline = time.monotonic() + timeout
    while store.head(layout.wal_key(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not archived within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(data: Path) -> None:
    proc.run([binaries.binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user="postgres",
             timeout=60, check=False)


def run(lab: labmod.LabInfo, scale: int = 100, pgbench_seconds: int = 30) -> list[dict]:
    cfg = lab.config
    with pgconn.session(lab.primary) as c:
        if not pgconn.scalar(c, "SELECT to_regclass('pgbench_accounts') IS NOT NULL"):
            _pgbench(lab, "-i", "-s", str(scale), "-q")
    bk.run_backup(cfg)
    bk.run_backup(cfg)
    _pgbench(lab, "-c", "4", "-j", "2", "-T", str(pgbench_seconds), "-n")
    with pgconn.session(lab.primary) as c:
        target_time = float(pgconn.scalar(c, "SELECT extract(epoch FROM clock_timestamp())")) - 2.0
    _archived_through_now(lab)
    target = from_options(to=datetime.fromtimestamp(target_time, UTC).isoformat())

    data = lab.dir / "bench-restore"
    shutil.rmtree(data, ignore_errors=True)
    port = labmod.free_port(None, {lab.primary.port, *(r.port for r in lab.replicas)})
    opts = rs.Options(target=target, target_dir=data, start=True, port=port)
    t0 = time.monotonic()
    try:
        res = rs.restore(cfg, opts)
        wall = time.monotonic() - t0
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)
    t = res.timings
    plan = res.plan
    out = [{
        "bench": "restore", "tool": "dbops", "wall_seconds": round(wall, 2),
        "phases": {"plan": t.get("plan", 0.0), "download": t.get("download", 0.0),
                   "replay": round(t.get("start", 0.0) + t.get("replay", 0.0) + t.get("promote", 0.0), 3),
                   "start": round(t.get("stop", 0.0) + t.get("start_final", 0.0), 3)},
        "timings": t, "backup_id": plan.backup.backup_id, "backup_state": plan.backup.state,
        "logical_bytes": plan.backup.logical_size, "download": res.download, "wal": res.wal,
        "wal_segments": len(plan.replay_segments), "reached": res.reached, "target_time": target.value,
        "estimate_seconds": plan.estimate["seconds"],
    }]
    if pgbackrest_peer.available():
        try:
            peer = pgbackrest_peer.bench_restore(lab, target_time=target_time)
        except Exception as e:  # the peer's figures are optional; ours stand
            out.append({"bench": "restore", "tool": "pgbackrest", "error": f"{type(e).__name__}: {e}"})
        else:
            out.append(peer)
            out.append({"bench": "restore_ratio_vs_pgbackrest", "wall_ratio": round(wall / peer["wall_seconds"], 2),
                        "goal": "<= 1.0"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lab", required=True)
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--pgbench-seconds", type=int, default=30)
    a = ap.parse_args()
    for rec in run(labmod.info(Path(a.lab)), scale=a.scale, pgbench_seconds=a.pgbench_seconds):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
