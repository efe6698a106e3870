"""A/B rounds of the validated incremental's store with and without the known files (dbops.repo.known)
on one lab: the store that takes a file the download finished and replay did not write unread,
against the store that reads every file.

    python -m bench.bench_fullab up --dir DIR --scale 400      (under testlock: lab + pgbench -i)
    python -m bench.bench_fullab run --dir DIR --rounds 1      (a full backup: the parent)
    python bench/ab_unchanged.py rounds --dir DIR --rounds 3 --workload small|pgbench

Each round: the workload on the primary (``small``: 20 updates of a 1,000-row table, created at the
first round; ``pgbench``: 30 s of pgbench, 4 clients, as bench_scale before its incremental), then
the newest usable backup proved into scratch (download, replay to a target captured now, checks,
stop) and the next incremental stored from that folder twice, ``read`` (every file read) and
``known`` (the records of the download), in alternate order, manifests kept local (their packs are
orphans for retention). One JSON line per store: its wall, phase and counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dbops.lab import harness as labmod
from dbops.ops.backup.target import capture_target
from dbops.ops.backup.validate import prove
from dbops.pg import conn as pgconn
from dbops.phases import Phases
from dbops.repo import catalog, pgstate
from dbops.repo import manifest as mf
from dbops.repo.store import store_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout

try:
    from bench.bench_scale import _pgbench
except ImportError:  # run as a script from bench/
    from bench_scale import _pgbench  # type: ignore[no-redef]


def workload(lab: labmod.LabInfo, kind: str) -> None:
    if kind == "pgbench":
        _pgbench(lab, "-c", "4", "-j", "2", "-T", "30", "-n")
        return
    with pgconn.session(lab.primary) as c:
        c.execute("CREATE TABLE IF NOT EXISTS small AS SELECT g AS id, 0 AS n FROM generate_series(1, 1000) g")
        for _ in range(20):
            c.execute("UPDATE small SET n = n + 1 WHERE id % 10 = (random() * 9)::int")


def one_round(lab: labmod.LabInfo, kind: str, r: int) -> None:
    cfg = lab.config
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    workload(lab, kind)
    prev = [b for b in catalog.list_backups(store, layout) if b.usable][-1]
    m = mf.load(store, layout, prev.backup_id)
    phases = Phases()
    with prove(cfg, store, layout, m, phases, run_id=f"abunchanged{r}", name=f"ab-unchanged-{r}",
               target=lambda: capture_target(cfg, archive_wait=600, store=store, layout=layout),
               save_bases=True) as proof:
        ts = proof.tablespaces.snapshot(proof.data, proof.validation.tablespace_names)
        pg = pgstate.read(str(proof.data), consistent_lsn=proof.target.lsn, consistent_time=proof.target.time)
        order = ("read", "known") if r % 2 == 0 else ("known", "read")
        for variant in order:
            os.sync()
            t0 = time.monotonic()
            out = store_snapshot(store, layout, str(proof.data), backup_id=catalog.new_backup_id(),
                                 parent_manifests=(m,), compression=cfg.compression,
                                 chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size,
                                 parallel=cfg.backup.parallel, pg=pg, unchanged_lsn=m.pg.redo_lsn,
                                 tmp_dir=str(proof.data.parent), tablespaces=ts, saved=proof.saved, save=False,
                                 known=proof.known if variant == "known" else None)
            wall = time.monotonic() - t0
            keep = ("files", "chunks", "new_chunks", "delta_chunks", "lsn_reused_chunks", "hashed_bytes",
                    "unchanged_files", "unchanged_bytes", "local_bases", "base_blocks")
            print(json.dumps({"bench": "ab_unchanged", "workload": kind, "round": r, "variant": variant,
                              "store_wall": round(wall, 2), "store": out.timings.get("store"),
                              "logical_bytes": out.logical_size, "proof": {k: phases.t.get(k) for k in (
                                  "download", "replay", "checks", "stop")},
                              "counts": {k: out.counts.get(k) for k in keep}}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("rounds",))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workload", choices=("small", "pgbench"), default="small")
    a = ap.parse_args()
    lab = labmod.info(Path(a.dir).resolve())
    for r in range(a.rounds):
        one_round(lab, a.workload, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
