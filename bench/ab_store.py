"""A/B rounds of a validated incremental's store alone (the phase "store"), on one kept copy.

    python bench/ab_store.py setup --dir DIR --scale 100          (under testlock/benchlock)
    python bench/ab_store.py rounds --dir DIR --rounds 3 --a SRC_A --b SRC_B [--profile]

``setup``: a lab at the scale (as bench/ab_localbases.py: `dbops backup --full`, 30 s of pgbench),
then one validated incremental whose store runs as usual; once it returned, the stopped, replayed
copy is moved (renamed: the files keep their identity, so the known-unchanged files stay known)
to DIR/kept with the saved pages' side file, and what the store was given is pickled beside it.
``rounds``: A then B, ``--rounds`` times, each a child process that imports dbops from SRC_A or
SRC_B (a checkout's root; default this one) and stores the kept copy again (``save=False``: the
manifest stays local, the packs become orphans), with the same parent, saved pages and known files.
One JSON line per run: the store's wall, its process CPU seconds, per-thread CPU (sampled from
/proc/self/task), the counts and the stored bytes; ``--profile``: cProfile of every store thread
(the top functions by own time, on stderr).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _known_state(known) -> dict | None:
    if known is None:
        return None
    return {k: v for k, v in vars(known).items() if k != "lock"}


def _known_from(state: dict | None):
    if state is None:
        return None
    from dbops.repo.known import Known

    k = Known()
    for name, v in state.items():
        setattr(k, name, v)
    return k


def setup(d: Path, scale: int) -> None:
    from bench.ab_localbases import setup as lab_setup
    from dbops.lab import harness as labmod

    if not (d / "full_id").exists():
        lab_setup(d, scale)
    labmod.info(d / "lab")
    out = subprocess.run([sys.executable, "-m", "bench.ab_store", "keep", "--dir", str(d)], text=True, cwd=HERE)
    if out.returncode:
        raise SystemExit(out.returncode)


def keep(d: Path) -> None:
    """One validated incremental on the full backup; its stopped copy kept in d/kept."""
    from dbops.lab import harness as labmod
    from dbops.ops.backup import run
    from dbops.pg.inspect import find_primary
    from dbops.repo import catalog
    from dbops.runtime.scratch import join_removals

    lab = labmod.info(d / "lab")
    full_id = (d / "full_id").read_text().strip()
    kept = d / "kept"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir()
    orig = run.BackupRun._store

    def store_and_keep(self, data, target, val, phases, **kw):
        t0 = time.monotonic()
        m = orig(self, data, target, val, phases, **kw)
        wall = time.monotonic() - t0
        saved, known = kw.get("saved"), kw.get("known")
        was = os.path.realpath(data)
        os.rename(data, kept / "data")
        if saved is not None:
            os.rename(saved.path, kept / "bases")
        if known is not None:
            known.folder = str(kept)
        state = {"data_was": was, "parent_id": kw["parent_id"], "unchanged_lsn": kw.get("unchanged_lsn"), "pg": m.pg,
                 "tablespaces": kw.get("tablespaces"), "saved_index": saved.index if saved else None,
                 "known": _known_state(known), "first_store": round(wall, 3), "counts": m.counts,
                 "stored_bytes": m.stored_bytes}
        (kept / "state.pickle").write_bytes(pickle.dumps(state))
        print(json.dumps({"kept": str(kept), "first_store": round(wall, 3), "timings": phases.t,
                          "counts": m.counts, "stored_bytes": m.stored_bytes}), flush=True)
        return m

    run.BackupRun._store = store_and_keep  # type: ignore[method-assign]
    r = run.BackupRun(lab.config)
    prev = next(b for b in catalog.list_backups(r.store, r.layout) if b.backup_id == full_id)
    try:
        r._incremental(find_primary(lab.config.nodes), prev)
    finally:
        join_removals(r.removals)


class ThreadCPU:
    """Per-thread CPU seconds of this process, sampled from /proc/self/task (threads that ended keep
    their last sample), grouped by thread name."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[str, float]] = {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.t = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        self.names.update((t.native_id, t.name) for t in threading.enumerate() if t.native_id)
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            name = self.names.get(int(tid)) or stat[stat.index("(") + 1:stat.rindex(")")]
            f = stat[stat.rindex(")") + 2:].split()
            self.last[tid] = (name, (int(f[11]) + int(f[12])) / self.tick)

    def _loop(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, s in self.last.values():
            key = name.rstrip("0123456789_-") or name
            out[key] = round(out.get(key, 0.0) + s, 2)
        return out


def one(d: Path, profile: bool) -> dict:
    import resource

    from dbops.lab import harness as labmod
    from dbops.repo import manifest as mf
    from dbops.repo.store import store_snapshot
    try:
        from dbops.repo.snapshot import Snapshot
    except ImportError:  # a checkout before the split
        from dbops.repo import store as old
        Snapshot = getattr(old, "_Snapshot")
    from dbops.repo.savedpages import SavedPages
    from dbops.storage import open_store
    from dbops.storage.layout import Layout

    lab = labmod.info(d / "lab")
    cfg = lab.config
    state = pickle.loads((d / "kept" / "state.pickle").read_bytes())
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    parent = mf.load(store, layout, state["parent_id"])
    saved = None
    if state["saved_index"]:  # its keys: the files' real paths, now in kept/data
        now = os.path.realpath(d / "kept" / "data")
        saved = SavedPages(str(d / "kept" / "bases"), {now + k[len(state["data_was"]):]: v
                                                       for k, v in state["saved_index"].items()})
    known = _known_from(state["known"])
    profs = []
    if profile:
        import cProfile

        lock = threading.Lock()
        orig = Snapshot.process

        def wrapped(self, unit):
            p = cProfile.Profile()
            with lock:
                profs.append(p)
            p.enable()
            try:
                return orig(self, unit)
            finally:
                p.disable()

        Snapshot.process = wrapped  # type: ignore[method-assign]
    tmp = d / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = ThreadCPU()
    cpu.sample()
    before = {k: v for k, v in cpu.by_name().items()}
    cpu.t.start()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    m = store_snapshot(
        store, layout, str(d / "kept" / "data"), backup_id=f"abstore{int(time.time() * 1000)}",
        parent_manifests=(parent,), compression=cfg.compression, chunk_size=cfg.backup.chunk_size,
        pack_size=cfg.backup.pack_size, parallel=int(os.environ.get("AB_PARALLEL", cfg.backup.parallel)), pg=state["pg"],
        parent_id=state["parent_id"], unchanged_lsn=state["unchanged_lsn"], tmp_dir=str(tmp),
        tablespaces=state["tablespaces"], saved=saved, known=known, save=False)
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu.stop.set()
    cpu.t.join()
    cpu.sample()
    threads = {k: round(v - before.get(k, 0.0), 2) for k, v in cpu.by_name().items() if v - before.get(k, 0.0) > 0.005}
    shutil.rmtree(tmp, ignore_errors=True)
    if profs:
        import io
        import pstats

        s = io.StringIO()
        ps = pstats.Stats(profs[0], stream=s)
        for p in profs[1:]:
            ps.add(p)
        ps.sort_stats("tottime").print_stats(35)
        print(s.getvalue(), file=sys.stderr)
    c = m.counts
    import dbops

    return {"src": str(Path(dbops.__file__).parent.parent), "store": round(wall, 3),
            "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 2), "threads": threads,
            "timings": {k: m.timings.get(k) for k in ("walk_chunk", "upload_wait", "base_fetch")},
            "counts": {k: c.get(k) for k in ("files", "chunks", "delta_chunks", "unchanged_files", "hashed_bytes",
                                              "lsn_reused_chunks", "new_chunks", "local_bases", "local_base_misses",
                                              "base_blocks", "packs")},
            "stored_bytes": m.stored_bytes}


def main() -> int:
    from bench.ab_validation import ab_parser, set_up

    ap = ab_parser(("setup", "keep", "rounds", "one"), rounds=3)
    ap.add_argument("--a", default=str(HERE))
    ap.add_argument("--b", default=str(HERE))
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    single = {"setup": lambda: set_up(d, a.scale, setup), "keep": lambda: keep(d),
              "one": lambda: print(json.dumps(one(d, a.profile)), flush=True)}
    if a.mode in single:
        single[a.mode]()
        return 0
    for r in range(a.rounds):
        for v, src in (("A", a.a), ("B", a.b)):
            os.sync()
            env = {**os.environ, "PYTHONPATH": src}
            # this script, with bench.ab_validation and dbops imported from src
            out = subprocess.run([sys.executable, "-c", "import runpy,sys; sys.argv=sys.argv[1:]; "
                                  "runpy.run_path(sys.argv[0], run_name='__main__')", str(HERE / "bench" / "ab_store.py"),
                                  "one", "--dir", str(d), *(["--profile"] if a.profile else [])],
                                 capture_output=True, text=True, env=env, cwd=src)
            if a.profile:
                Path(d / f"profile_{v}_{r}.txt").write_text(out.stderr)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps(
                {"error": out.stderr[-2000:]})
            rec = json.loads(line)
            rec.update(variant=v, round=r)
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
