"""Benchmark: from `kill -9` of the primary to the first write accepted by the new primary, with
`dbops failover --primary-lost` issued at once; prints one JSON object.

    python bench/bench_lost.py [--runs 5] [--dir DIR] [--keep]

Starts its own lab (a primary, two streaming replicas, SeaweedFS, WAL archived through
`dbops wal-push`). Each run: a writer commits continuously through a libpq multi-host string
(target_session_attrs=read-write); the primary's postmaster and every child get SIGKILL and its
data folder is made unreadable (so its node controller cannot reach it; a fence hook checks that
nothing answers on its port); `dbops failover --primary-lost --yes --json` runs at once. Measured:
seconds from the kill to the writer's first acknowledged commit on the new primary, the command's
own figures, and the commits acknowledged before the kill that are missing afterwards (the probe's
count) beside what the report said. Then the old primary's folder comes back and `dbops rejoin`
makes it a standby again (its diverged commits counted), ready for the next run.
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
from dbops.ops import topology
from dbops.pg import conn


def _summary(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 3), "max": round(max(values), 3),
            "runs": [round(v, 3) for v in values]}


def _dbops(cfg_path: str, *args: str) -> tuple[int, dict]:
    res = subprocess.run([str(Path(sys.executable).parent / "dbops"), "-c", cfg_path, *args], capture_output=True,
                         text=True, timeout=600, check=False)
    try:
        return res.returncode, json.loads(res.stdout)
    except ValueError:
        raise RuntimeError(f"dbops {' '.join(args)} exited {res.returncode}: {res.stderr[-2000:]}") from None


def _primary(cfg_path: str) -> str:
    deadline = time.monotonic() + 60
    while True:
        topo = topology.discover(cfgmod.load(cfg_path))
        if topo.primary and len(topo.standbys) == 2 and all(s.streaming for s in topo.standbys):
            return topo.primary.name
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab not settled: {topo.as_dict()}")
        time.sleep(0.2)


def one_run(cfg_path: str, passfile: str, start_id: int) -> tuple[dict, int]:
    cfg = cfgmod.load(cfg_path)
    old = cfg.node(_primary(cfg_path))
    w = Writer(multi_host(list(cfg.nodes), passfile=passfile), start_id=start_id)
    w.start()
    try:
        w.wait_for_commits(500)
        failover_lab.kill9(old.data_dir)
        t_kill = time.monotonic()
        failover_lab.make_unreachable(old.data_dir)
        code, out = _dbops(cfg_path, "failover", "--primary-lost", "--yes", "--json")
        t_cmd = time.monotonic() - t_kill
        if code not in (0, 15):
            raise RuntimeError(f"failover --primary-lost exited {code}: {json.dumps(out)[-6000:]}")
        w.wait_for_commits(50)
    finally:
        w.stop()
        failover_lab.make_reachable(old.data_dir)
    rep = out.get("report") or {}
    # an acknowledgement already on its way when the server died may arrive just after the kill: the first
    # write on the new primary is the first acknowledgement after the writer's first error
    t_err = next((t for t, _ in w.errors if t >= t_kill), t_kill)
    first = next((t for _, t in w.acked if t > t_err), None)
    before = [i for (i, _), sent in zip(w.acked, w.sent) if sent < t_kill]  # sent while the old primary lived
    new = cfg.node(rep["new_primary"])
    with conn.session(new) as c:
        missing = set(w.lost(c))
    lost = [i for i in before if i in missing]
    rcode, rj = _dbops(cfg_path, "rejoin", old.name, "--yes", "--json")
    if rcode != 0:
        raise RuntimeError(f"rejoin exited {rcode}: {rj.get('message')} {rj.get('detail')}")
    div = (rj.get("report") or {}).get("divergence") or {}
    loss = rep.get("loss") or {}
    return {
        "kill_to_first_write_seconds": round(first - t_kill, 3) if first else None,
        "command_seconds": round(t_cmd, 3),
        "seconds_to_writable_in_command": rep.get("seconds_to_writable"),
        "plan_seconds_in_command": rep.get("plan_seconds"),
        "exit_code": code,
        "probe_acked_before_kill": len(before),
        "probe_lost": len(lost),
        "probe_lost_after_failover": len(missing) - len(lost),
        "report_known_lost_bytes": loss.get("known_lost_bytes"),
        "report_behind_known_end_bytes": loss.get("behind_known_end_bytes"),
        "report_loss_possible": loss.get("possible"),
        "rejoin_listed_commits": div.get("commits"),
        "client_errors": len(w.errors_since(t_kill)),
        "phases": {ph["name"]: ph["seconds"] for ph in rep.get("phases", [])},
    }, w.next_id


def run(d: Path, runs: int) -> dict:
    lab = labmod.up(d / "lab", replicas=2, archive=True)
    try:
        cfg_path = failover_lab.failover_config(lab, extra={"fence_hooks": [failover_lab.FENCE_CHECK_HOOK]},
                                                name="dbops-lost.yaml")
        with conn.session(lab.primary) as c:
            prepare(c)
        passfile = str(Path(lab.dir) / "pgpass")
        results, next_id = [], 1
        for _ in range(runs):
            r, next_id = one_run(cfg_path, passfile, next_id)
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        first = [r["kill_to_first_write_seconds"] for r in results if r["kill_to_first_write_seconds"] is not None]
        return {
            "bench": "failover_primary_lost",
            "runs": runs,
            "kill_to_first_write_seconds": _summary(first),
            "command_seconds": _summary([r["command_seconds"] for r in results]),
            "probe_lost_commits": [r["probe_lost"] for r in results],
            "rejoin_listed_commits": [r["rejoin_listed_commits"] for r in results],
            "report_known_lost_bytes": [r["report_known_lost_bytes"] for r in results],
            "exit_codes": [r["exit_code"] for r in results],
            "lost_after_failover": sum(r["probe_lost_after_failover"] for r in results),
            "details": results,
            "goal": {"kill_to_first_write_max_seconds": 5.0},
        }
    finally:
        labmod.down(d / "lab")


def with_peer(d: Path, runs: int) -> dict:
    """bench_lost's record plus pg_auto_failover's automatic failover measured the same way (see pgaf_peer)."""
    rec = run(d, runs)
    import pgaf_peer

    peer_dir = d / "pgaf"
    peer_dir.mkdir(exist_ok=True)
    os.chmod(peer_dir, 0o755)
    try:
        rec["pg_auto_failover"] = pgaf_peer.run(peer_dir, min(runs, 3))
    except Exception as e:  # the peer is a comparison; its failure must not hide dbops' figures
        rec["pg_auto_failover"] = {"error": f"{type(e).__name__}: {e}"}
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--peer", action="store_true", help="also measure pg_auto_failover (bench/pgaf_peer.py)")
    a = ap.parse_args()
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="dbops-bench-lost-", dir="/tmp"))
    os.chmod(d, 0o755)
    os.environ.setdefault("DBOPS_LOCK_DIR", str(d))
    try:
        print(json.dumps(with_peer(d, a.runs) if a.peer else run(d, a.runs)))
    finally:
        if not a.keep and not a.dir:
            import shutil

            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
