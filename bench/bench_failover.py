"""Benchmark: write unavailability during `dbops failover`; prints one JSON object.

    python bench/bench_failover.py [--runs 5] [--dir DIR] [--keep]

Starts its own lab (a primary, two streaming replicas, SeaweedFS, WAL archiving through
`dbops wal-push`) and PgBouncer in front of it, then switches over `--runs` times (each run
moves the primary to the next node). During every switchover two writers commit
continuously: one through a libpq multi-host string with target_session_attrs=read-write
(no hook, no proxy), one through PgBouncer. Reported per writer: the longest gap between
two acknowledged commits (p50 and max over the runs), acknowledged commits missing from
the new primary afterwards (lost), and errors the client saw. Also dbops' own measure of
the window (fence to writable) and the command's duration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import failover_lab
from writer_probe import Writer, multi_host, prepare

from dbops import config as cfgmod
from dbops.lab import harness as labmod
from dbops.pg import conn

CRITICAL = ("pgbouncer pause", "stop old primary", "candidate caught up", "promote", "pgbouncer repoint",
            "pgbouncer resume")


def _summary(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 3), "max": round(max(values), 3),
            "runs": [round(v, 3) for v in values]}


def _failover(cfg_path: str) -> dict:
    """`dbops failover --yes --json` as its own process, as an operator would run it."""
    res = subprocess.run([str(Path(sys.executable).parent / "dbops"), "-c", cfg_path, "failover", "--yes", "--json",
                          "--timeout", "30"], capture_output=True, text=True, timeout=300, check=False)
    out = json.loads(res.stdout)
    if res.returncode != 0:
        raise RuntimeError(f"dbops failover exited {res.returncode}: {out.get('message')} {out.get('detail')}")
    return out["report"]


def run(d: Path, runs: int) -> dict:
    lab = labmod.up(d / "lab", replicas=2, archive=True)
    bouncer = failover_lab.start_pgbouncer(d / "pgbouncer", lab)
    try:
        cfg_path = failover_lab.failover_config(lab, bouncer)
        cfg = cfgmod.load(cfg_path)
        with conn.session(lab.primary) as c:
            prepare(c)
        passfile = str(Path(lab.dir) / "pgpass")
        direct_gaps, bouncer_gaps, tool_windows, durations, critical = [], [], [], [], []
        lost = direct_errors = bouncer_errors = 0
        next_direct, next_pooled = 1, 10**12
        for _ in range(runs):
            direct = Writer(multi_host(list(cfg.nodes), passfile=passfile), start_id=next_direct)
            pooled = Writer(bouncer.conninfo(), start_id=next_pooled)
            for w in (direct, pooled):
                w.start()
                w.wait_for_commits(50)
            t0 = time.monotonic()
            report = _failover(cfg_path)
            for w in (direct, pooled):
                w.wait_for_commits(50)
                w.stop()
            direct_gaps.append(direct.max_gap(since=t0))
            bouncer_gaps.append(pooled.max_gap(since=t0))
            tool_windows.append(report["write_unavailable_seconds"] or 0.0)
            critical.append({ph["name"]: ph["seconds"] for ph in report["phases"] if ph["name"] in CRITICAL})
            durations.append(report["total_seconds"] or 0.0)
            direct_errors += len(direct.errors_since(t0))
            bouncer_errors += len(pooled.errors)
            with conn.session(cfg.node(report["new_primary"])) as c:
                lost += len(direct.lost(c)) + len(pooled.lost(c))
            next_direct, next_pooled = direct.next_id, pooled.next_id
        return {
            "bench": "failover",
            "switchovers": runs,
            "write_gap_seconds_multihost": _summary(direct_gaps),
            "write_gap_seconds_pgbouncer": _summary(bouncer_gaps),
            "dbops_window_seconds": _summary(tool_windows),
            "command_seconds": _summary(durations),
            "critical_phases_seconds": critical,
            "lost_commits": lost,
            "client_errors_multihost": direct_errors,
            "client_errors_pgbouncer": bouncer_errors,
            "goal": {"p50_max_seconds": 0.5, "max_max_seconds": 1.0, "lost": 0, "pgbouncer_errors": 0},
        }
    finally:
        bouncer.stop()
        labmod.down(d / "lab")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="dbops-bench-failover-", dir="/tmp"))
    os.chmod(d, 0o755)
    # A private lock folder: the host-wide one is shared with every lab on this machine.
    os.environ.setdefault("DBOPS_LOCK_DIR", str(d))
    try:
        print(json.dumps(run(d, a.runs)))
    finally:
        if not a.keep and not a.dir:
            import shutil

            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
