"""A/B rounds of restoring a full backup and an incremental with page deltas, on one lab.

    python bench/ab_deltarestore.py setup --dir DIR --scale 100        (under testlock: builds the lab)
    python bench/ab_deltarestore.py rounds --dir DIR --rounds 3 --code A=/path/to/tree --code B=/other/tree
    python bench/ab_deltarestore.py pitr --dir DIR --rounds 3 --code A=... --code B=... [--peer]

``setup``: a lab at the scale (no encryption), `pgbench -i`, the primary also archiving to
pgBackRest (its own async archive-push), `dbops backup --full` and a pgBackRest full, 30 s of
pgbench (as bench_scale.py), a validated `dbops backup` (the incremental: page deltas on the full)
and a pgBackRest incremental, 10 s more of pgbench, a target time 2 s before its end, archived by both.
``rounds``: for each round and each code tree (a folder holding the ``dbops`` package, run in a
process of its own with it first on sys.path), the files of the full, then of the incremental,
restored into a fresh folder (fetch, check, write, fsync: ``restore_snapshot`` as
bench_scale.py's ``scale_restore_files``), the disk synced before each (not timed). One JSON line
per restore: wall, its timings, requests, CPU seconds of the process (user, system).
``pitr``: each code tree restores the target (`restore --to TIME --start`, promoted: the
incremental is the backup it starts from), with ``--peer`` pgBackRest too (its own archive-get).
"""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod

try:
    from bench import pgbackrest_peer
    from bench.ab_restore import RUN_TREE, dbops_restore, code_parser, code_trees, each_round, timed_setup
    from bench.bench_scale import _archived_through_now, _now, _pgbench
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]
    from ab_restore import RUN_TREE, dbops_restore, code_parser, code_trees, each_round, timed_setup  # type: ignore[no-redef]
    from bench_scale import _archived_through_now, _now, _pgbench  # type: ignore[no-redef]


def setup(d: Path, scale: int) -> None:
    lab = labmod.up(d / "lab", replicas=0, encrypt=False)
    _pgbench(lab, "-i", "-s", str(scale), "-q")
    ids = []
    with pgbackrest_peer.session(lab, own_wal=True) as p, pgbackrest_peer.archiving(lab, p):
        for args, kind in ((("--full",), "full"), ((), "incr")):
            if kind == "incr":
                _pgbench(lab, "-c", "4", "-j", "2", "-T", "30", "-n")
            res = proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup", *args, "--json"],
                           timeout=3600)
            ids.append(json.loads(res.stdout)["backup_id"])
            pgbackrest_peer.backup(p, kind)
        _pgbench(lab, "-c", "4", "-j", "2", "-T", "10", "-n")
        target_time = _now(lab) - 2.0
        _archived_through_now(lab)
    (d / "target.json").write_text(json.dumps({"time": target_time, "full": ids[0], "incremental": ids[1]}))


# One restore of a backup's files in a process of its own, with the tree's dbops (argv: tree,
# config, backup id, folder); prints a JSON line.
_FILES = """
import json, os, resource, shutil, sys, time
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout
from dbops.config import load
cfg_path, backup_id, folder = sys.argv[1:4]
cfg = load(cfg_path)
store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
m = mf.load(store, layout, backup_id)
shutil.rmtree(folder, ignore_errors=True)
os.sync()
r0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.monotonic()
st = restore_snapshot(store, layout, m, folder, parallel=4)
wall = time.monotonic() - t
r1 = resource.getrusage(resource.RUSAGE_SELF)
shutil.rmtree(folder, ignore_errors=True)
print(json.dumps({"wall": round(wall, 2), "timings": st.timings, "requests": st.requests,
                  "fetched_bytes": st.fetched_bytes, "user": round(r1.ru_utime - r0.ru_utime, 2),
                  "sys": round(r1.ru_stime - r0.ru_stime, 2)}))
"""


def _files(lab: labmod.LabInfo, tree: Path, backup_id: str, folder: Path) -> dict:
    run = RUN_TREE.replace("from dbops.cli.entry import main; sys.argv[0] = 'dbops'; main()",
                            "exec(sys.argv.pop(1))")
    out = subprocess.run([sys.executable, "-c", run, str(tree), _FILES, lab.config_path, backup_id, str(folder)],
                         check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounds(d: Path, n: int, codes: list[tuple[str, Path]], pitr: bool, peer: bool) -> None:
    lab = labmod.info(d / "lab")
    t = json.loads((d / "target.json").read_text())
    for _label, tree in codes:
        compileall.compile_dir(str(tree / "dbops"), quiet=1)
    folder = lab.dir / "ab-deltarestore"

    def one(r: int, p) -> None:
        for label, tree in codes:
            if pitr:
                rec = dbops_restore(lab, tree, t["time"], folder)
                print(json.dumps({"round": r, "tool": "dbops", "variant": label, **rec}), flush=True)
                continue
            for kind in ("full", "incremental"):
                rec = _files(lab, tree, t[kind], folder)
                print(json.dumps({"round": r, "variant": label, "backup": kind, **rec}), flush=True)
        if p is not None:
            os.sync()
            res = pgbackrest_peer.restore(p, lab, t["time"])
            print(json.dumps({"round": r, "tool": "pgbackrest", "wall": res["wall_seconds"],
                              "phases": res["phases"]}), flush=True)

    each_round(lab, n, one, peer)


def main() -> int:
    a = code_parser(("setup", "rounds", "pitr")).parse_args()
    d = Path(a.dir).resolve()
    if a.mode == "setup":
        return timed_setup(d, a.scale, setup)
    rounds(d, a.rounds, code_trees(a), a.mode == "pitr", a.peer and a.mode == "pitr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
