"""Diagnosis: one full backup run in this process on a lab (see bench_fullab ``up``), with its
resident memory sampled every 20 ms beside the phase running, the CPU seconds of each kind of
thread (copy, store workers, uploads, main), each store's start and end, and the run's tail
(status record, retention, scratch removal) timed: where the memory and the time of a full
backup go. With ``--trace``: tracemalloc's peak and its largest allocations at that peak (slower;
its own overhead inflates RSS).

    python -m bench.bench_fullprobe --dir DIR [--trace]      (one JSON line)

Used for docs/backups.md ("The full backup's RSS growth"): a run at scale 100 against one at 400.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from dbops import config as cfgmod
from dbops.lab import harness as labmod
from dbops.ops.backup import prestore
from dbops.ops.backup import run as bk


class Probe:
    def __init__(self, trace: bool):
        self.t0 = time.monotonic()
        self.trace, self.phase, self.stop = trace, "init", threading.Event()
        self.samples: list[tuple[float, int, str]] = []
        self.marks: list[tuple] = []
        self.threads: dict[int, tuple[str, float, float]] = {}
        self.best, self.snap, self.snap_phase = 0, None, ""

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def progress(self, name: str) -> None:
        self.phase = name
        self.marks.append((name, self.now()))

    def timed(self, name: str, fn):
        def call(*a, **k):
            t = self.now()
            try:
                return fn(*a, **k)
            finally:
                self.marks.append((name, t, round(self.now() - t, 2)))
        return call

    def _threads_cpu(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        tck = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir("/proc/self/task"):
            try:
                parts = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = names.get(int(tid)) or self.threads.get(int(tid), ("?",))[0]
            self.threads[int(tid)] = (name, int(parts[11]) / tck, int(parts[12]) / tck)

    def sample(self) -> None:
        while not self.stop.is_set():
            self._threads_cpu()
            if self.trace and (cur := tracemalloc.get_traced_memory()[0]) > self.best + 4 * 2**20:
                self.best, self.snap, self.snap_phase = cur, tracemalloc.take_snapshot(), self.phase
            rss = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                       if x.startswith("VmRSS:"))
            self.samples.append((time.monotonic() - self.t0, rss, self.phase))
            time.sleep(0.02)

    def report(self) -> dict[str, Any]:
        by: dict[str, list[float]] = {}
        for name, user, system in self.threads.values():
            v = by.setdefault(name.rsplit("_", 1)[0] if name[-1:].isdigit() else name, [0.0, 0.0])
            v[0], v[1] = v[0] + user, v[1] + system
        peak = max(self.samples, key=lambda s: s[1])
        out: dict[str, Any] = {
            "threads_cpu": {k: [round(u, 2), round(s, 2)] for k, (u, s) in sorted(by.items(), key=lambda kv: -sum(kv[1]))},
            "marks": self.marks, "peak": {"t": round(peak[0], 2), "rss_kib": peak[1], "phase": peak[2]},
            "rss_mib_each_second": [(round(t, 1), r // 1024, p) for i, (t, r, p) in enumerate(self.samples) if i % 50 == 0]}
        if self.trace:
            out["traced_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
            if self.snap is not None:
                out["at_traced_peak"] = {"phase": self.snap_phase, "top": [
                    f"{st.size / 2**20:.1f} MiB x{st.count}: {st.traceback.format()[-1].strip()}"
                    for st in self.snap.statistics("traceback")[:15]]}
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--trace", action="store_true")
    a = ap.parse_args()
    cfg = cfgmod.load(labmod.info(Path(a.dir).resolve()).config_path)
    p = Probe(a.trace)
    stores: list[dict] = []

    def store(fn, name):
        def call(*args, **kw):
            t = p.now()
            m = fn(*args, **kw)
            if m is not None:
                stores.append({"store": name, "start": t, "end": p.now(), "packs": m.counts.get("packs"),
                               **{k: m.timings.get(k) for k in ("walk_chunk", "upload_wait")}})
            return m
        return call

    prestore.store_snapshot = store(prestore.store_snapshot, "first")
    bk.store_snapshot = store(bk.store_snapshot, "final")
    bk.catalog.record_status = p.timed("record_status", bk.catalog.record_status)
    bk.join_removals = p.timed("join_removals", bk.join_removals)
    bk.BackupRun._auto_prune = p.timed("auto_prune", bk.BackupRun._auto_prune)
    if a.trace:
        tracemalloc.start(8)
    sampler = threading.Thread(target=p.sample, daemon=True)
    sampler.start()
    res = bk.run_backup(cfg, full=True, progress=p.progress)
    wall = p.now()
    p.stop.set()
    sampler.join()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"bench": "full_probe", "wall_seconds": wall, "maxrss_kib": ru.ru_maxrss,
                      "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2), "timings": res.timings,
                      "stored_bytes": res.manifest.stored_bytes, "logical_bytes": res.manifest.logical_size,
                      "stores": stores, **p.report()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
