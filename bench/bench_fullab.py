"""Benchmark: A/B rounds of the full backup alone on one lab kept between rounds.

    python -m bench.bench_fullab up --dir DIR --scale 100        # lab + pgbench -i (once)
    python -m bench.bench_fullab run --dir DIR [--rounds 2] [--peer] [--bin B ...]   # dbops backup --full
    python -m bench.bench_fullab down --dir DIR

``run`` prints one JSON line per backup: wall seconds, peak RSS (KiB, GNU time), the run's phases
(copy, prestore, capture, start, checks, stop, checksums, store ...), the stored bytes; with
``--peer``, a pgBackRest full on the same lab first (its own S3 server, zstd-3, process-max 2).
The disk is synced before each backup (untimed), so a round does not pay for the last one's writes.
``--bin``: dbops executables to compare (default: this installation's), run in turn in each round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dbops.lab import harness as labmod

try:
    from bench import pgbackrest_peer
    from bench.bench_scale import _db_size, _pgbench, _timed
    from bench.bytecode import compile_dbops
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]
    from bench_scale import _db_size, _pgbench, _timed  # type: ignore[no-redef]
    from bytecode import compile_dbops  # type: ignore[no-redef]


def up(d: Path, scale: int) -> None:
    d.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(d.parent, 0o755)
    fresh = not (d / "lab.json").exists()
    lab = labmod.up(d, replicas=0, encrypt=False)
    if fresh:
        _pgbench(lab, "-i", "-s", str(scale), "-q")
    print(json.dumps({"lab": str(d), "database_bytes": _db_size(lab)}), flush=True)


def _dbops_full(lab: labmod.LabInfo, exe: str) -> dict:
    os.sync()
    wall, rss, out = _timed([exe, "-c", lab.config_path, "backup", "--full", "--json"])
    res = json.loads(out)
    return {"bench": "full_ab", "tool": "dbops", "bin": exe, "wall_seconds": round(wall, 2), "rss_kib": rss,
            "stored_bytes": res["stored_bytes"], "logical_bytes": res["logical_size"],
            "timings": res.get("timings"), "counts": res.get("counts")}


def run(d: Path, rounds: int, peer: bool, bins: list[str]) -> None:
    compile_dbops()
    lab = labmod.info(d)
    size = _db_size(lab)
    exes = bins or [labmod.dbops_executable()]

    def rounds_of_dbops() -> None:
        for _ in range(rounds):
            for exe in exes:
                print(json.dumps({"database_bytes": size, **_dbops_full(lab, exe)}), flush=True)

    if peer and pgbackrest_peer.available():
        with pgbackrest_peer.session(lab, own_wal=True) as p, pgbackrest_peer.archiving(lab, p):
            os.sync()
            rss: list[int] = []
            wall, b = pgbackrest_peer.backup(p, "full", rss)
            print(json.dumps({"bench": "full_ab", "tool": "pgbackrest", "database_bytes": size,
                              "wall_seconds": round(wall, 2), "rss_kib": rss[0] if rss else None,
                              "stored_bytes": b["info"]["repository"]["delta"]}), flush=True)
            rounds_of_dbops()
        return
    rounds_of_dbops()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("up", "run", "down"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--bin", action="append", default=[])
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    if a.action == "up":
        up(d, a.scale)
    elif a.action == "run":
        run(d, a.rounds, a.peer, a.bin)
    else:
        labmod.down(d, purge=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
