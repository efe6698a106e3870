"""A/B rounds of a restore whose WAL to replay is long beside its backup: how long it takes and how
much the scratch folder holds at its peak, for two checkouts of dbops.

    python bench/ab_longwal.py setup --dir DIR --scale 20 [--pgbench 120]      (under benchlock)
    python bench/ab_longwal.py rounds --dir DIR --rounds 2 --variants A=/path/to/old,B=/path/to/new[:CONFIG]

``setup``: a lab at the scale, `dbops backup --full`, 30 s of pgbench, then ``--pgbench`` seconds
more (4 clients), the last segment archived. ``rounds``: each variant in turn, ``--rounds`` times:
`dbops restore --to latest --json` run with that checkout first on PYTHONPATH (and CONFIG, default
the lab's), into a fresh folder,
the disk synced and 5 s idle before; the scratch folder's bytes sampled every 0.1 s. One JSON line
per run: wall, the restore's timings, its WAL figures, the scratch folder's peak bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from dbops.lab import harness as labmod

try:
    from bench.ab_validation import _pgbench, ab_parser, lab_after_full, set_up
except ImportError:  # run as a script from bench/
    from ab_validation import _pgbench, ab_parser, lab_after_full, set_up  # type: ignore[no-redef]


def tree_bytes(root: Path) -> int:
    total, seen = 0, set()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:  # a file's hard links count once
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def setup(d: Path, scale: int, seconds: int) -> None:
    def make(d: Path, scale: int) -> None:
        lab = lab_after_full(d, scale)
        _pgbench(lab, "-c", "4", "-j", "2", "-T", str(seconds), "-n")
        from labkit import switch_and_archive  # type: ignore[import-not-found]

        switch_and_archive(lab)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    set_up(d, scale, make)


def one(d: Path, name: str, checkout: str) -> dict:
    lab = labmod.info(d / "lab")
    checkout, _, config = checkout.partition(":")
    config = config or lab.config_path
    target = d / f"restored-{name}"
    shutil.rmtree(target, ignore_errors=True)
    scratch = Path(lab.config.backup.scratch_dir)
    os.sync()
    time.sleep(5)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], tree_bytes(scratch))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    env = dict(os.environ, PYTHONPATH=checkout)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "dbops", "-c", config, "restore", "--to", "latest",
                        "--target-dir", str(target), "--json"], env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    stop.set()
    t.join()
    shutil.rmtree(target, ignore_errors=True)
    if r.returncode != 0:
        return {"variant": name, "error": r.stderr[-1500:]}
    res = json.loads(r.stdout)
    return {"variant": name, "wall": round(wall, 2), "timings": res["timings"], "wal": res["wal"],
            "segments": res["plan"].get("wal", {}).get("segments") if isinstance(res["plan"].get("wal"), dict)
            else None, "scratch_peak_mib": round(peak[0] / 2**20, 1)}


def main() -> int:
    ap = ab_parser(("setup", "rounds"), rounds=2)
    ap.add_argument("--pgbench", type=int, default=120)
    ap.add_argument("--variants", default="")
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    if a.mode == "setup":
        setup(d, a.scale, a.pgbench)
        return 0
    variants = [v.split("=", 1) for v in a.variants.split(",") if v]
    for _ in range(a.rounds):
        for name, checkout in variants:
            print(json.dumps(one(d, name, checkout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
