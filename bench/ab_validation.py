"""A/B rounds of the throwaway server's phases (start, replay, checks, stop, pg_checksums) on one lab.

    python bench/ab_validation.py setup --dir DIR --scale 100     (under testlock: builds the lab)
    python bench/ab_validation.py rounds --dir DIR --rounds 2 [--settings '{"shared_buffers": "1GB"}' ...]

``setup``: a lab at the scale, `dbops backup --full`, 30 s of pgbench, a target captured on the
primary (as a validated incremental does), the full backup restored into DIR/pristine and the WAL
from its redo point to the target fetched into DIR/wal. ``rounds``: for each round and each
settings variant (a JSON object of server settings merged over the validation's own; ``{}`` is the
code as it is), the pristine copy is copied into a scratch folder (its pages dirty in the page
cache, as after the download) and ``recover_to_target`` runs on it. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod
from dbops.ops.backup import tablespaces as tbs
from dbops.ops.backup import recoveryconf, validate
from dbops.ops.backup.target import capture_target, fetch_wal
from dbops.pg.lsn import segment_of_lsn
from dbops.phases import Phases
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout

try:
    from bench.bench_scale import _pgbench
except ImportError:  # run as a script from bench/
    from bench_scale import _pgbench  # type: ignore[no-redef]


def lab_after_full(d: Path, scale: int) -> labmod.LabInfo:
    """A lab in d/lab at the scale (no replica, no encryption), `dbops backup --full`, then 30 s of
    pgbench (4 clients, as bench_scale before its incremental)."""
    lab = labmod.up(d / "lab", replicas=0, encrypt=False)
    _pgbench(lab, "-i", "-s", str(scale), "-q")
    proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup", "--full", "--json"], timeout=3600)
    _pgbench(lab, "-c", "4", "-j", "2", "-T", "30", "-n")
    return lab


def ab_parser(modes: tuple[str, ...], rounds: int) -> argparse.ArgumentParser:
    """The A/B scripts' common arguments: MODE (setup first), --dir, --scale, --rounds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=modes)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=rounds)
    return ap


def set_up(d: Path, scale: int, make) -> None:
    """``make(d, scale)`` in the folder d, created for the lab's users to enter."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    make(d, scale)


def setup(d: Path, scale: int) -> None:
    lab = lab_after_full(d, scale)
    cfg = lab.config
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    prev = [b for b in catalog.list_backups(store, layout) if b.usable][-1]
    m = mf.load(store, layout, prev.backup_id)
    target = capture_target(cfg, archive_wait=600, store=store, layout=layout)
    for sub in ("pristine", "wal"):
        shutil.rmtree(d / sub, ignore_errors=True)
    (d / "wal").mkdir()
    proc.chown_to(d / "wal", cfg.os_user)
    fetch_wal(cfg, store, layout, segment_of_lsn(m.pg.timeline, m.pg.redo_lsn, m.pg.wal_segment_size), target,
              d / "wal")
    restore_snapshot(store, layout, m, str(d / "pristine"), parallel=4, owner=cfg.os_user, durable=False)
    (d / "target.pickle").write_bytes(pickle.dumps(target))
    os.sync()


def one_round(d: Path, settings: dict, label: str) -> dict:
    lab = labmod.info(d / "lab")
    cfg = lab.config
    target = pickle.loads((d / "target.pickle").read_bytes())
    scratch = d / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    proc.chown_to(scratch, cfg.os_user)
    subprocess.run(["cp", "-a", str(d / "pristine"), str(scratch / "data")], check=True)
    subprocess.run(["cp", "-a", str(d / "wal"), str(scratch / "wal")], check=True)
    ts = tbs.ScratchTablespaces(scratch)
    ts.prepare(cfg.os_user)
    saved = dict(recoveryconf.RECOVERY_SETTINGS_BASE), dict(recoveryconf.RECOVERY_SETTINGS_PG15)
    for k, v in settings.items():  # a PostgreSQL 15 setting is applied after the base ones
        (recoveryconf.RECOVERY_SETTINGS_PG15 if k in saved[1] else recoveryconf.RECOVERY_SETTINGS_BASE)[k] = v
    phases = Phases()
    t0 = time.monotonic()
    try:
        val = validate.recover_to_target(cfg, scratch / "data", scratch / "wal", target, phases,
                                         name="ab-validation", tablespaces=ts)
    finally:
        for current, before in zip((recoveryconf.RECOVERY_SETTINGS_BASE, recoveryconf.RECOVERY_SETTINGS_PG15), saved):
            current.clear()
            current.update(before)
    wall = time.monotonic() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return {"variant": label, "settings": settings, "wall": round(wall, 2), "timings": phases.t,
            "checks": [c for c in val.checks if c.get("check") != "read_tables" or c.get("rows")]}


def main() -> int:
    ap = ab_parser(("setup", "rounds"), rounds=2)
    ap.add_argument("--settings", action="append", default=[])
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    if a.mode == "setup":
        set_up(d, a.scale, setup)
        return 0
    variants = a.settings or ["{}"]
    for r in range(a.rounds):
        for v in variants:
            rec = one_round(d, json.loads(v), v)
            rec["round"] = r
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
