"""A/B rounds of the validated incremental on one lab, with the page cache's dirty and writeback
bytes sampled through the run: where the download of the previous backup (and the validation
after it) spends its time.

    python bench/ab_download.py setup --dir DIR --scale 400       (under benchlock)
    python bench/ab_download.py rounds --dir DIR --rounds 3 --variants A,B [--pgbench 30] [--no-sync]

``setup``: as bench/ab_localbases.py (a lab, `dbops backup --full`, 30 s of pgbench). ``rounds``:
the variants in turn, ``--rounds`` times; each run is a child process building one validated
incremental on the full backup (as ab_localbases). Before each: ``--pgbench`` seconds of pgbench
(4 clients, as bench_scale before its incremental: the primary's dirty buffers and WAL), then
``os.sync()`` unless ``--no-sync`` (bench_scale does not sync before its incremental).

Variants (the child patches nothing for ``A``, the code as it is):
``nosave``: nothing predicted, so no pages saved beside the download (every base fetched);
``fadv``: the scratch download starts each file's writeback every 8 MiB as a durable restore does
(``posix_fadvise(DONTNEED)``); ``srf``: the same with ``sync_file_range(SYNC_FILE_RANGE_WRITE)``
(writeback started, nothing dropped from the page cache).

One JSON line per run: wall, the phases (their start, from the run's start, and seconds), the
validation's checks, and /proc/meminfo Dirty and Writeback (MiB) sampled every 0.25 s: their
peaks and means during the download, and the series every second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dbops.lab import harness as labmod

try:
    from bench.ab_localbases import setup
    from bench.ab_validation import ab_parser, set_up
    from bench.bench_scale import _pgbench
except ImportError:  # run as a script from bench/
    from ab_localbases import setup  # type: ignore[no-redef]
    from ab_validation import ab_parser, set_up  # type: ignore[no-redef]
    from bench_scale import _pgbench  # type: ignore[no-redef]


def meminfo() -> tuple[float, float]:
    """(Dirty, Writeback) in MiB."""
    got = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("Dirty", "Writeback"):
                got[k] = int(v.split()[0]) / 1024
    return got["Dirty"], got["Writeback"]


def cpu_jiffies() -> tuple[int, int, int]:
    """(busy, total, iowait) jiffies of all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = v[3], v[4]
    return sum(v) - idle - iowait, sum(v), iowait


class Sampler:
    def __init__(self, t0: float, every: float = 0.25):
        self.t0, self.every, self.samples = t0, every, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.monotonic() - self.t0, *meminfo(), *cpu_jiffies()))
            self.stop.wait(self.every)

    def between(self, a: float, b: float) -> dict:
        s = [x for x in self.samples if a <= x[0] <= b]
        if not s:
            return {}
        busy = (s[-1][3] - s[0][3]) / max(1, s[-1][4] - s[0][4])
        return {"cpu_busy": round(busy, 2), "iowait": round((s[-1][5] - s[0][5]) / max(1, s[-1][4] - s[0][4]), 2),
                "dirty_max": round(max(x[1] for x in s)), "dirty_mean": round(sum(x[1] for x in s) / len(s)),
                "writeback_max": round(max(x[2] for x in s)),
                "writeback_mean": round(sum(x[2] for x in s) / len(s))}


def patch(variant: str) -> None:
    from dbops.ops.backup import basesave
    from dbops.repo import rangewrite, restore

    if variant == "fullcks":  # pg_checksums reads every file (no shadow folder), as before it
        from dbops.ops.backup import shadow

        shadow.build = lambda *a, **k: None  # type: ignore[assignment]
    elif variant == "nosave":
        basesave.predict = lambda *a, **k: basesave.Predicted()  # type: ignore[assignment]
    elif variant in ("srf", "fadv"):  # the scratch download's writeback started early (as a durable restore's)
        if variant == "srf":
            rangewrite.Flusher.flush = staticmethod(start_writeback)  # type: ignore[method-assign]
        inner = restore.write_range

        def write_range(*args, **kw):
            kw["flush"] = True
            return inner(*args, **kw)

        restore.write_range = write_range  # type: ignore[assignment]


def start_writeback(fd: int, lo: int, hi: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): writeback started, the pages kept cached."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range(ctypes.c_int(fd), ctypes.c_longlong(lo), ctypes.c_longlong(hi - lo), ctypes.c_uint(2))


def one(d: Path, variant: str) -> dict:
    """In a child process: one validated incremental on the full backup."""
    from dbops.ops.backup import run
    from dbops.pg.inspect import find_primary
    from dbops.repo import catalog
    from dbops.runtime.scratch import join_removals

    patch(variant)
    lab = labmod.info(d / "lab")
    full_id = (d / "full_id").read_text().strip()
    t0 = time.monotonic()
    starts: dict[str, float] = {}
    sampler = Sampler(t0)
    sampler.thread.start()
    r = run.BackupRun(lab.config, progress=lambda name: starts.setdefault(name, round(time.monotonic() - t0, 2)))
    prev = next(b for b in catalog.list_backups(r.store, r.layout) if b.backup_id == full_id)
    try:
        res = r._incremental(find_primary(lab.config.nodes), prev)
    finally:
        join_removals(r.removals)
    wall = time.monotonic() - t0
    sampler.stop.set()
    sampler.thread.join()
    t = res.timings
    dl0 = starts.get("download", starts.get("capture", 0.0))
    dl1 = dl0 + t.get("download", 0.0)
    series = [(round(x[0]), round(x[1]), round(x[2])) for x in sampler.samples[::4]]
    return {"variant": variant, "wall": round(wall, 2), "starts": starts, "timings": dict(t),
            "download_mem": sampler.between(dl0, dl1), "series_t_dirty_wb": series,
            "checks": [c for c in res.validated.checks if c.get("check") == "pg_checksums"],
            "saved_pages": res.manifest.counts.get("saved_pages")}


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads; for self, children waited for too)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")


def restore_only(d: Path, variant: str) -> dict:
    """In a child: the full backup's files restored alone (no WAL, no server), as ``variant`` says:
    ``durable`` (as bench_scale's scale_restore_files), ``scratch`` (durable=False, as the
    validation's download), ``saver`` (scratch, and the pages the last run's WAL names saved beside)."""
    import shutil

    from dbops.ops.backup import basesave
    from dbops.repo import manifest as mf
    from dbops.repo.restore import restore_snapshot
    from dbops.repo.savedpages import Saver
    from dbops.storage import open_store
    from dbops.storage.layout import Layout

    lab = labmod.info(d / "lab")
    cfg = lab.config
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    m = mf.load(store, layout, (d / "full_id").read_text().strip())
    out = d / "restore-only"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    weed = json.loads((d / "lab" / "lab.json").read_text()).get("s3", {}).get("pid")
    saver = None
    if variant == "saver":
        saver = Saver(out / "data", str(out / "bases"))
        wanted = json.loads((d / "wanted.json").read_text()) if (d / "wanted.json").exists() else None
        if wanted is None:
            saver.predicted({})
    c0, w0, t0 = cpu_seconds(), cpu_seconds(weed) if weed else 0.0, time.monotonic()
    sampler = Sampler(t0)
    sampler.thread.start()
    restore_snapshot(store, layout, m, str(out / "data"), parallel=cfg.backup.parallel, owner=cfg.os_user,
                     durable=variant == "durable", on_file=saver.file_done if saver else None)
    if saver is not None:
        saver.finish()
    wall = time.monotonic() - t0
    sampler.stop.set()
    rec = {"variant": variant, "wall": round(wall, 2), "cpu": round(cpu_seconds() - c0, 2),
           "weed_cpu": round(cpu_seconds(weed) - w0, 2) if weed else None, "mem": sampler.between(0, wall)}
    t1 = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    rec["rm"] = round(time.monotonic() - t1, 2)
    return rec


def full_backup(d: Path, variant: str) -> dict:
    """In a child: `dbops backup --full` (its run), as ``variant`` says."""
    from dbops.ops.backup import run

    patch(variant)
    lab = labmod.info(d / "lab")
    t0 = time.monotonic()
    res = run.BackupRun(lab.config).run(full=True)
    return {"variant": variant, "kind": "full", "backup_id": res.backup_id, "wall": round(time.monotonic() - t0, 2),
            "timings": dict(res.timings),
            "checks": [c for c in (res.validated.checks if res.validated else res.manifest.meta.get("checks") or [])
                       if c.get("check") == "pg_checksums"]}


def child(d: Path, mode: str, variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, mode, "--dir", str(d), "--variant", variant],
                         capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps(
        {"variant": variant, "error": out.stderr[-2000:]})
    return json.loads(line)


def cycle(d: Path, rounds: int, variants: list[str]) -> int:
    """Per round and variant, as bench_scale orders it: `dbops backup --full` (untimed), 30 s of
    pgbench, the validated incremental (``one``), then os.sync() and the full's files restored
    alone (``restore-one``, durable, as scale_restore_files)."""
    from dbops import proc

    lab = labmod.info(d / "lab")
    for r in range(rounds):
        for v in variants:
            full = child(d, "full", v)
            full["round"] = r
            print(json.dumps(full), flush=True)
            (d / "full_id").write_text(full["backup_id"])
            _pgbench(lab, "-c", "4", "-j", "2", "-T", "30", "-n")
            rec = child(d, "one", v)
            rec["round"] = r
            print(json.dumps(rec), flush=True)
            if os.environ.get("AB_RESTORE_ALONE"):
                os.sync()
                rec = child(d, "restore-one", "durable")
                rec["round"] = r
                print(json.dumps(rec), flush=True)
    return 0


def main() -> int:
    ap = ab_parser(("setup", "rounds", "one", "restore", "restore-one", "cycle", "full"), rounds=3)
    ap.add_argument("--variant", default="A")
    ap.add_argument("--variants", default="A,nosave")
    ap.add_argument("--pgbench", type=int, default=0)
    ap.add_argument("--no-sync", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir).resolve()
    children = {"one": one, "full": full_backup, "restore-one": restore_only}  # each run in a child process
    if a.mode in children:
        print(json.dumps(children[a.mode](d, a.variant)), flush=True)
        return 0
    if a.mode == "setup":
        set_up(d, a.scale, setup)
        return 0
    only = a.mode == "restore"
    if a.mode == "cycle":  # each round as bench_scale: a new full, 30 s of pgbench, the incremental, the files alone
        return cycle(d, a.rounds, a.variants.split(","))
    lab = labmod.info(d / "lab")
    for r in range(a.rounds):
        for v in a.variants.split(","):
            if a.pgbench:
                _pgbench(lab, "-c", "4", "-j", "2", "-T", str(a.pgbench), "-n")
            if not a.no_sync:
                os.sync()
            rec = child(d, "restore-one" if only else "one", v)
            rec["round"] = r
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

