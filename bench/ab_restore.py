"""A/B rounds of the point-in-time restore (`dbops restore --to TIME --start`, promoted) on one lab.

    python bench/ab_restore.py setup --dir DIR --scale 100          (under testlock: builds the lab)
    python bench/ab_restore.py rounds --dir DIR --rounds 3 --code A=/path/to/tree --code B=/other/tree [--peer]

``setup``: a lab at the scale (no encryption, as the pgBackRest peer), `pgbench -i`, the primary's
archive_command also pushing to pgBackRest (its own async archive-push), a dbops full backup and a
pgBackRest full, 10 s of pgbench, a target time 2 s before its end, that WAL archived by both.
``rounds``: for each round, each code tree (a folder holding the ``dbops`` package, byte-compiled
first, run as ``python -m dbops`` with it first on PYTHONPATH) restores to the target into a fresh
folder, started and promoted, under GNU time; with ``--peer`` pgBackRest restores the same target
with its own archive-get (as bench_scale.py). The disk is synced before each restore (not timed).
One JSON line per restore: wall, peak RSS, dbops' phase timings.
"""

from __future__ import annotations

import compileall
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod

try:
    from bench import pgbackrest_peer
    from bench.ab_validation import ab_parser, set_up
    from bench.bench_scale import _archived_through_now, _now, _pgbench, _stop, _timed
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]
    from ab_validation import ab_parser, set_up  # type: ignore[no-redef]
    from bench_scale import _archived_through_now, _now, _pgbench, _stop, _timed  # type: ignore[no-redef]


def setup(d: Path, scale: int) -> None:
    lab = labmod.up(d / "lab", replicas=0, encrypt=False)
    _pgbench(lab, "-i", "-s", str(scale), "-q")
    with pgbackrest_peer.session(lab, own_wal=True) as p, pgbackrest_peer.archiving(lab, p):
        proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup", "--full", "--json"], timeout=3600)
        pgbackrest_peer.backup(p, "full")
        _pgbench(lab, "-c", "4", "-j", "2", "-T", "10", "-n")
        target_time = _now(lab) - 2.0
        _archived_through_now(lab)
    (d / "target.json").write_text(json.dumps({"time": target_time}))


# dbops from the tree given as the first argument: the venv's editable install puts a finder for the
# worktree's package ahead of sys.path, so it goes first.
RUN_TREE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             "sys.path.insert(0, sys.argv.pop(1)); import dbops; assert dbops.__file__.startswith(sys.path[0]), "
             "dbops.__file__; from dbops.cli.entry import main; sys.argv[0] = 'dbops'; main()")


def dbops_restore(lab: labmod.LabInfo, tree: Path, target_time: float, folder: Path) -> dict:
    target = datetime.fromtimestamp(target_time, UTC).isoformat()
    port = labmod.free_port(None, {lab.primary.port})
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    try:
        wall, rss, out = _timed([sys.executable, "-c", RUN_TREE, str(tree), "-c", lab.config_path, "restore",
                                 "--to", target, "--target-dir", str(folder), "--start", "--port", str(port),
                                 "--json"])
    finally:
        _stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
    res = json.loads(out)
    return {"wall": round(wall, 2), "rss_kib": rss, "timings": res.get("timings"),
            "reached": (res.get("reached") or {}).get("last_commit_time"),
            "timeline": (res.get("reached") or {}).get("promoted_timeline")}


def rounds(d: Path, n: int, codes: list[tuple[str, Path]], peer: bool) -> None:
    lab = labmod.info(d / "lab")
    target_time = json.loads((d / "target.json").read_text())["time"]
    for _label, tree in codes:
        compileall.compile_dir(str(tree / "dbops"), quiet=1)
    folder = lab.dir / "ab-restore"

    def one(r: int, p) -> None:
        for label, tree in codes:
            rec = dbops_restore(lab, tree, target_time, folder)
            print(json.dumps({"round": r, "tool": "dbops", "variant": label, **rec}), flush=True)
        if p is not None:
            os.sync()
            res = pgbackrest_peer.restore(p, lab, target_time)
            print(json.dumps({"round": r, "tool": "pgbackrest", "wall": res["wall_seconds"],
                              "phases": res["phases"]}), flush=True)

    each_round(lab, n, one, peer)


def each_round(lab: labmod.LabInfo, n: int, one, peer: bool) -> None:
    """one(round, pgBackRest's peer or None) for each of n rounds; with ``peer``, in a pgBackRest session."""
    if not peer:
        for r in range(n):
            one(r, None)
        return
    with pgbackrest_peer.session(lab, own_wal=True) as p:
        for r in range(n):
            one(r, p)


def code_parser(modes: tuple[str, ...]):
    """ab_parser with --code LABEL=FOLDER (repeatable) and --peer."""
    ap = ab_parser(modes, rounds=3)
    ap.add_argument("--code", action="append", default=[], help="LABEL=FOLDER holding the dbops package")
    ap.add_argument("--peer", action="store_true", help="pgBackRest restores the same target each round")
    return ap


def code_trees(a) -> list[tuple[str, Path]]:
    """The --code trees (LABEL, folder), or this checkout's as "this"."""
    codes = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in a.code]
    return codes or [("this", Path(__file__).resolve().parent.parent)]


def timed_setup(d: Path, scale: int, make) -> int:
    """set_up(d, scale, make), its seconds printed as a JSON line; 0."""
    t0 = time.monotonic()
    set_up(d, scale, make)
    print(json.dumps({"setup_seconds": round(time.monotonic() - t0, 1)}), flush=True)
    return 0


def main() -> int:
    a = code_parser(("setup", "rounds")).parse_args()
    d = Path(a.dir).resolve()
    if a.mode == "setup":
        return timed_setup(d, a.scale, setup)
    rounds(d, a.rounds, code_trees(a), a.peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
