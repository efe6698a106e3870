"""Benchmark: the incremental's store alone (format 5 page deltas), repeated on one lab.

    python bench/bench_incr_store.py setup --dir DIR --scale 100
    python bench/bench_incr_store.py run --dir DIR [--repeat 2]
    python bench/bench_incr_store.py verify --dir DIR [--repeat 2]
    python bench/bench_incr_store.py down --dir DIR

``setup``: a lab (no replica, no encryption, as bench_scale), ``pgbench -i``, the primary stopped
and stored as a full backup, then started again for 30 s of pgbench (as bench_scale) and stopped.
``run``: the stopped primary's folder stored as an incremental on that full backup (page-LSN rule
from the full's REDO point, as the validated incremental after its replay), ``--repeat`` times;
nothing listed (the manifest is not saved; its packs are left as orphans). ``verify``: `dbops
verify` of such an incremental (stored and listed once, then kept), ``--repeat`` times. One JSON line a round:
wall and CPU seconds, peak RSS, the store's timings and counts, the stored bytes. A/B: run it with
PYTHONPATH pointing at another checkout's dbops (the lab stays the same).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod
from dbops.lab import postgres as labpg
from dbops.pg import binaries
from dbops.repo import catalog, store
from dbops.repo import manifest as mf
from dbops.storage import open_store
from dbops.storage.layout import Layout

PGBENCH_SECONDS = 30


def _pgbench(lab: labmod.LabInfo, *args: str) -> None:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=7200)


def _store(lab: labmod.LabInfo, backup_id: str, parents=(), unchanged_lsn=None, save=True) -> mf.Manifest:
    cfg = lab.config
    return store.store_snapshot(
        open_store(cfg.storage), Layout(cfg.storage.prefix), lab.primary.data_dir, backup_id=backup_id,
        parent_manifests=list(parents), compression=cfg.compression, chunk_size=cfg.backup.chunk_size,
        pack_size=cfg.backup.pack_size, parallel=cfg.backup.parallel, unchanged_lsn=unchanged_lsn,
        tmp_dir=str(lab.dir / "scratch"), save=save)


def setup(d: Path, scale: int) -> None:
    lab = labmod.up(d, replicas=0, archive=False, encrypt=False)
    _pgbench(lab, "-i", "-s", str(scale), "-q")
    pdata = Path(lab.primary.data_dir)
    labpg.pg_ctl(pdata, "-m", "fast", "-w", "-t", "120", "stop", timeout=180)
    full = _store(lab, catalog.new_backup_id())
    print(json.dumps({"setup": full.backup_id, "full_stored_bytes": full.stored_bytes}), flush=True)
    updates(d, full.backup_id, scale)


def updates(d: Path, full_id: str, scale: int) -> None:
    """30 s of pgbench on the primary, stopped again (the folder the incremental stores)."""
    lab = labmod.up(d, replicas=0, archive=False, encrypt=False)  # (started again; another port if taken)
    _pgbench(lab, "-c", "4", "-j", "2", "-T", str(PGBENCH_SECONDS), "-n")
    labpg.pg_ctl(Path(lab.primary.data_dir), "-m", "fast", "-w", "-t", "120", "stop", timeout=180)
    (d / "incr-store.json").write_text(json.dumps({"full": full_id, "scale": scale}))


def run(d: Path, repeat: int) -> None:
    lab = labmod.info(d)
    state = json.loads((d / "incr-store.json").read_text())
    cfg = lab.config
    parent = mf.load(open_store(cfg.storage), Layout(cfg.storage.prefix), state["full"])
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        m = _store(lab, catalog.new_backup_id(), [parent], parent.pg.redo_lsn, save=False)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"bench": "incr_store", "scale": state["scale"], "dbops": str(Path(store.__file__).parents[2]), "wall_seconds": round(wall, 2),
                          "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                          "rss_kib": r1.ru_maxrss, "stored_bytes": m.stored_bytes,
                          "timings": m.timings, "counts": m.counts}), flush=True)


def verify(d: Path, repeat: int) -> None:
    from dbops.repo.verify import verify_backup

    lab = labmod.info(d)
    state = json.loads((d / "incr-store.json").read_text())
    cfg = lab.config
    st, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    if "incremental" not in state:
        parent = mf.load(st, layout, state["full"])
        state["incremental"] = _store(lab, catalog.new_backup_id(), [parent], parent.pg.redo_lsn).backup_id
        (d / "incr-store.json").write_text(json.dumps(state))
    m = mf.load(st, layout, state["incremental"])
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        rep = verify_backup(st, layout, m, cfg.backup.parallel)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"bench": "incr_verify", "scale": state["scale"], "dbops": str(Path(store.__file__).parents[2]),
                          "ok": rep.ok, "wall_seconds": round(wall, 2),
                          "cpu_seconds": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2),
                          "rss_kib": r1.ru_maxrss, "fetched_bytes": rep.fetched_bytes,
                          "requests": st.requests()}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("setup", "run", "verify", "down"))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    if a.what == "setup":
        setup(d, a.scale)
    elif a.what == "run":
        run(d, a.repeat)
    elif a.what == "verify":
        verify(d, a.repeat)
    else:
        print(labmod.down(d, purge=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
