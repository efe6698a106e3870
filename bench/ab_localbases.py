"""A/B rounds of the validated incremental with its page-delta bases saved from the restored folder
(B, the code as it is) or all fetched back from storage (A: nothing predicted), on one lab.

    python bench/ab_localbases.py setup --dir DIR --scale 100     (under testlock/benchlock)
    python bench/ab_localbases.py rounds --dir DIR --rounds 2

``setup``: a lab at the scale (no replica, no encryption, as bench_scale), `dbops backup --full`,
then 30 s of pgbench (4 clients, as bench_scale). ``rounds``: A then B, ``--rounds`` times; each run
is a child process that builds one validated incremental on the full backup (the same parent every
time: the run's own incremental is built, listed, and left; a later round still takes the full as
its parent), a target captured on the primary as `dbops backup` does. One JSON line per run: wall,
peak RSS of the run's process, the phases, the store's base counts.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from dbops.lab import harness as labmod
from dbops import proc

try:
    from bench.ab_validation import ab_parser, lab_after_full, set_up
except ImportError:  # run as a script from bench/
    from ab_validation import ab_parser, lab_after_full, set_up  # type: ignore[no-redef]


def setup(d: Path, scale: int) -> None:
    lab = lab_after_full(d, scale)
    (d / "full_id").write_text(json.loads(proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup",
                                                    "list", "--json"]).stdout)[0]["backup_id"])


def one(d: Path, variant: str) -> dict:
    """In a child process: one validated incremental on the full backup."""
    from dbops.ops.backup import basesave, run
    from dbops.pg.inspect import find_primary
    from dbops.repo import catalog
    from dbops.runtime.scratch import join_removals

    if variant == "A":  # nothing predicted: every base fetched (the code before the local bases)
        basesave.predict = lambda *a, **k: basesave.Predicted()  # type: ignore[assignment]
    lab = labmod.info(d / "lab")
    full_id = (d / "full_id").read_text().strip()
    t0 = time.monotonic()
    r = run.BackupRun(lab.config)
    prev = next(b for b in catalog.list_backups(r.store, r.layout) if b.backup_id == full_id)
    try:
        res = r._incremental(find_primary(lab.config.nodes), prev)
    finally:
        join_removals(r.removals)  # as `dbops backup` does before it returns
    wall = time.monotonic() - t0
    c = res.manifest.counts
    return {"variant": variant, "wall": round(wall, 2), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "timings": {k: v for k, v in res.timings.items()},
            "counts": {k: c.get(k) for k in ("delta_chunks", "local_bases", "local_base_misses", "local_base_pages",
                                              "saved_pages", "base_blocks",
                                              "base_requests", "base_fetched_bytes")},
            "stored_bytes": res.manifest.stored_bytes}


def main() -> int:
    ap = ab_parser(("setup", "rounds", "one"), rounds=2)
    ap.add_argument("--variant", default="B")
    ap.add_argument("--variants", default="A,B")
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    if a.mode == "setup":
        set_up(d, a.scale, setup)
        return 0
    if a.mode == "one":
        print(json.dumps(one(d, a.variant)), flush=True)
        return 0
    for r in range(a.rounds):
        for v in a.variants.split(","):
            os.sync()  # each run starts with no other writes pending
            out = subprocess.run([sys.executable, __file__, "one", "--dir", str(d), "--variant", v],
                                 capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps(
                {"variant": v, "error": out.stderr[-2000:]})
            rec = json.loads(line)
            rec["round"] = r
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
