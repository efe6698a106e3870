"""`make bench`: every benchmark on one lab at pgbench scale BENCH_SCALE (default 100), then the
scale sweep (bench_scale: dbops and pgBackRest side by side on a fresh lab per scale in
BENCH_SCALES, default "100 400").

Prints one JSON object per line on stdout; progress goes to stderr. Each benchmark module has
`run(lab, **kw) -> list[dict]`. Order matters: WAL archiving under `pgbench -i` fills the
database the backup, restore and failover benchmarks then use.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bytecode import compile_dbops  # noqa: E402
from dbops.lab import harness as labmod  # noqa: E402

BENCHES = ["bench_wal", "bench_backup", "bench_restore", "bench_failover", "bench_lost", "bench_dropfind", "bench_relmap",
           "bench_encryption", "bench_scale", "bench_tablespaces"]


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=int(os.environ.get("BENCH_SCALE", "100")))
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", str(ROOT / ".bench" / "lab")))
    ap.add_argument("--only", nargs="*", default=None, help="benchmark module names")
    ap.add_argument("--keep", action="store_true", help="leave the lab running")
    a = ap.parse_args()
    d = Path(a.dir)
    labmod.down(d, purge=d.exists() and (d / "lab.json").exists())
    d.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(d.parent, 0o755)
    emit({"bench": "environment", "scale": a.scale, "cpus": os.cpu_count(), "python": platform.python_version(),
          "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    compile_dbops()  # the commands timed start as an installed dbops does
    lab = labmod.up(d, replicas=1)
    failed = 0
    try:
        for name in a.only or BENCHES:
            try:
                mod = importlib.import_module(f"bench.{name}")
            except ImportError as e:
                emit({"bench": name, "skipped": f"not available: {e}"})
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                if name == "bench_scale":  # the sweep: a fresh lab per scale in BENCH_SCALES (default "100 400")
                    scales = [int(x) for x in os.environ.get("BENCH_SCALES", "100 400").split()]
                    failed += mod.run_sweep(d.parent / "sweep", scales, emit)
                    continue
                if name in ("bench_failover", "bench_lost"):  # each builds its own lab with two replicas
                    fdir = d.parent / name.removeprefix("bench_")
                    fdir.mkdir(exist_ok=True)
                    os.chmod(fdir, 0o755)
                    runner = getattr(mod, "with_peer", mod.run)  # bench_lost: pg_auto_failover beside it
                    records = [runner(fdir, runs=int(os.environ.get("BENCH_FAILOVER_RUNS", "5")))]
                elif name == "bench_encryption":  # two labs of its own: encryption on and off
                    edir = d.parent / "encryption"
                    edir.mkdir(exist_ok=True)
                    os.chmod(edir, 0o755)
                    records = mod.run(edir, scale=a.scale)
                elif name == "bench_tablespaces":  # its own lab without replicas (they would share the folder)
                    records = mod.run(d.parent / "tablespaces", scale=max(1, a.scale // 3))
                else:
                    records = mod.run(lab, scale=a.scale)
                for rec in records:
                    emit(rec)
            except Exception as e:  # report and go on with the next benchmark
                failed += 1
                emit({"bench": name, "error": f"{type(e).__name__}: {e}"})
    finally:
        if not a.keep:
            labmod.down(d, purge=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
