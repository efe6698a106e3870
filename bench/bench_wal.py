"""Benchmark: WAL archiving with archive_command = `dbops wal-push %p` (async pusher on).

Measurements (one JSON object each):
* wal_archive_load       `pgbench -i -s SCALE`: WAL produced, segments/s and MB/s archived, `.ready`
                         files when the load ended (and the most seen), seconds until none were left;
* wal_push_capacity      the pusher alone: N segments ready at once, uploaded (parallel) into a
                         fresh prefix: segments/s, MB/s;
* wal_push_latency       one archive_command call, as PostgreSQL runs it (a new process, as postgres):
                         fast path (already stored by the pusher) and slow path (`--sync`: typer,
                         boto3, compress, upload, verify), p50/p95;
* wal_fetch_latency      restore_command calls in replay order: from the archive vs from the prefetch spool;
* wal_fetch_range        the parallel range download a restore/backup replay uses: MB/s;
* wal_compression        zstd levels and none on real segments: ratio, compress/decompress MB/s.

    python bench/bench_wal.py --lab DIR [--scale 100]     (DIR: a running `dbops lab up` folder)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import zstandard

from dbops.lab import harness as labmod
from dbops import proc
from dbops.ops.wal.archive import fetch_range
from dbops.pg import binaries, conn
from dbops.pg.lsn import SEGMENT_RE
from dbops.storage import open_store
from dbops.storage.layout import Layout

MB = 1024 * 1024


def _one(node, q: str):
    with conn.session(node) as c:
        return conn.scalar(c, q)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000, 1)


def _latency(name: str, secs: list[float], **extra) -> dict:
    return {"bench": "wal_push_latency" if "push" in name else "wal_fetch_latency", "path": name,
            "calls": len(secs), "p50_ms": _pct(secs, 50), "p95_ms": _pct(secs, 95),
            "mean_ms": round(statistics.mean(secs) * 1000, 1), **extra}


def _dbops(lab, *args, cwd=None, config=None) -> float:
    t0 = time.perf_counter()
    proc.run([labmod.dbops_executable(), "-c", str(config or lab.config_path), *args], user="postgres",
             cwd=cwd, timeout=300)
    return time.perf_counter() - t0


def _scratch(lab, tag: str, names: list[str], ready: bool) -> Path:
    """A folder shaped like the primary's data folder (its pg_control) holding copies of segments."""
    src = Path(lab.primary.data_dir)
    d = lab.dir / "scratch" / f"walbench-{tag}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "global").mkdir(parents=True)
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    shutil.copy(src / "global" / "pg_control", d / "global" / "pg_control")
    shutil.copy(src / "PG_VERSION", d / "PG_VERSION")
    for n in names:
        shutil.copy(src / "pg_wal" / n, d / "pg_wal" / n)
        if ready:
            (d / "pg_wal" / "archive_status" / f"{n}.ready").touch()
    proc.run(["chown", "-R", "postgres:postgres", str(d)])
    return d


def kept_segments(lab) -> list[str]:
    """Archived segments PostgreSQL still keeps in pg_wal (it marked them .done)."""
    st = Path(lab.primary.data_dir) / "pg_wal" / "archive_status"
    return sorted(n[:-5] for n in os.listdir(st) if n.endswith(".done") and SEGMENT_RE.match(n[:-5])
                  and (st.parent / n[:-5]).exists())


def archive_under_load(lab, scale: int) -> dict:
    node = lab.primary
    status = Path(node.data_dir) / "pg_wal" / "archive_status"
    lsn0 = _one(node, "SELECT pg_current_wal_lsn()::text")
    count0 = _one(node, "SELECT archived_count FROM pg_stat_archiver")
    env = {"PGPASSFILE": str(lab.dir / "pgpass")}
    done = threading.Event()
    err: list[BaseException] = []

    def load():
        try:
            proc.run([binaries.binary("pgbench"), "-i", "-q", "-s", str(scale), "-h", node.host, "-p", str(node.port),
                      "-U", "postgres", "postgres"], env=env, timeout=3600)
        except Exception as e:  # noqa: BLE001  reported by the caller
            err.append(e)
        finally:
            done.set()

    def ready() -> int:
        return sum(1 for n in os.listdir(status) if n.endswith(".ready"))

    t0 = time.monotonic()
    threading.Thread(target=load, daemon=True).start()
    most = 0
    while not done.wait(0.2):
        most = max(most, ready())
    load_s = time.monotonic() - t0
    if err:
        raise err[0]
    left = ready()
    most = max(most, left)
    last = _one(node, "SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")  # the newest complete one, at most
    while ready() and time.monotonic() - t0 < load_s + 600:
        time.sleep(0.1)
    drained = time.monotonic() - t0
    lsn1 = _one(node, "SELECT pg_current_wal_lsn()::text")
    wal_bytes = _one(node, f"SELECT pg_wal_lsn_diff('{lsn1}', '{lsn0}')")
    archived = _one(node, "SELECT archived_count FROM pg_stat_archiver") - count0
    failed = _one(node, "SELECT failed_count FROM pg_stat_archiver")
    return {"bench": "wal_archive_load", "scale": scale, "load_seconds": round(load_s, 2),
            "wal_mb": round(float(wal_bytes) / MB, 1), "segments_archived": archived,
            "segments_per_s": round(archived / drained, 2), "archive_mb_per_s": round(archived * 16 / drained, 1),
            "ready_at_load_end": left, "ready_max_seen": most,
            "seconds_until_none_ready": round(drained - load_s, 2), "failed_count": failed, "last_segment": last}


def push_capacity(lab, names: list[str], config_text: str | None = None) -> dict:
    """config_text: the configuration to push with (default: the lab's), into a fresh prefix."""
    d = _scratch(lab, "capacity", names, ready=True)
    cfg = lab.dir / "scratch" / "walbench-capacity.yaml"
    prefix = f"walbench-{time.time_ns()}"  # a fresh archive (and so a fresh spool) per run
    text = (config_text or Path(lab.config_path).read_text()).replace("prefix: lab", f"prefix: {prefix}")
    cfg.write_text(text)
    os.chmod(cfg, 0o644)
    t0 = time.perf_counter()
    _dbops(lab, "wal-push", f"pg_wal/{names[-1]}", cwd=d, config=cfg)  # starts the pusher
    spools = list((lab.dir / "spool").glob("*/data_dir"))
    spool = next(p.parent for p in spools if p.read_text().strip() == str(d.resolve())
                 and (p.parent / "archive").read_text().strip().endswith("|" + prefix))
    while len(list((spool / "done").iterdir())) < len(names) and time.perf_counter() - t0 < 300:
        time.sleep(0.02)
    secs = time.perf_counter() - t0
    return {"bench": "wal_push_capacity", "segments": len(names), "seconds": round(secs, 2),
            "segments_per_s": round(len(names) / secs, 2), "mb_per_s": round(len(names) * 16 / secs, 1),
            "parallel": lab.config.archive.parallel, "compression": f"zstd-{lab.config.compression.level}"}


def push_latency(lab, names: list[str], calls: int = 30) -> list[dict]:
    d = Path(lab.primary.data_dir)
    # fast path: PostgreSQL calling again for segments the pusher has stored (as after a burst)
    scratch = _scratch(lab, "fast", names[:3], ready=True)
    for n in names[:3]:
        _dbops(lab, "wal-push", f"pg_wal/{n}", cwd=scratch)
    fast = [_dbops(lab, "wal-push", f"pg_wal/{names[i % 3]}", cwd=scratch) for i in range(calls)]
    slow = [_dbops(lab, "wal-push", "--sync", f"pg_wal/{names[i % len(names)]}", cwd=d) for i in range(10)]
    return [_latency("push_fast", fast, note="answered from the spool; no typer, no boto3"),
            _latency("push_slow_sync", slow, note="typer + boto3 client + read + zstd + upload + verify")]


def fetch_latency(lab, names: list[str], replay_gap: float = 0.2) -> list[dict]:
    """restore_command calls in replay order, replay_gap seconds apart (the server replaying a segment)."""
    d = _scratch(lab, "fetch", [], ready=False)
    archive, prefetched = [], []
    for n in names:
        hit = any(p.read_text().strip() == str(d.resolve()) and any(p.parent.glob(f"prefetch/*/{n}"))
                  for p in (lab.dir / "spool").glob("*/data_dir"))
        t = _dbops(lab, "wal-fetch", n, "pg_wal/RECOVERYXLOG", cwd=d)
        (prefetched if hit else archive).append(t)
        time.sleep(replay_gap)
    out = [_latency("fetch_from_archive", archive, note="typer + boto3 + download + verify + decompress")]
    if prefetched:
        out.append(_latency("fetch_prefetched", prefetched, note=f"served from the prefetch spool "
                            f"(prefetch={lab.config.archive.prefetch}, calls {replay_gap} s apart)"))
    return out


def range_fetch(lab, names: list[str]) -> dict:
    dest = lab.dir / "scratch" / "walbench-range"
    shutil.rmtree(dest, ignore_errors=True)
    store = open_store(lab.config.storage)
    t0 = time.perf_counter()
    res = fetch_range(store, Layout(lab.config.storage.prefix), names[0], names[-1], dest,
                      parallel=lab.config.archive.parallel)
    secs = time.perf_counter() - t0
    shutil.rmtree(dest, ignore_errors=True)
    return {"bench": "wal_fetch_range", "segments": len(res.segments), "seconds": round(secs, 2),
            "mb_per_s": round(res.bytes / MB / secs, 1), "parallel": lab.config.archive.parallel}


def compression(lab, names: list[str]) -> list[dict]:
    pg_wal = Path(lab.primary.data_dir) / "pg_wal"
    data = [(pg_wal / n).read_bytes() for n in names]
    total = sum(len(x) for x in data)
    out = []
    for algo, level in (("none", 0), ("zstd", 1), ("zstd", 3), ("zstd", 6), ("zstd", 9)):
        if algo == "none":
            out.append({"bench": "wal_compression", "algorithm": "none", "ratio": 1.0, "segments": len(data)})
            continue
        t0 = time.perf_counter()
        comp = [zstandard.ZstdCompressor(level=level).compress(x) for x in data]
        c_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c in comp:
            zstandard.ZstdDecompressor().decompress(c)
        d_s = time.perf_counter() - t0
        out.append({"bench": "wal_compression", "algorithm": "zstd", "level": level, "segments": len(data),
                    "ratio": round(total / sum(len(c) for c in comp), 2),
                    "compress_mb_per_s": round(total / MB / c_s, 1), "decompress_mb_per_s": round(total / MB / d_s, 1)})
    return out


def run(lab, scale: int = 100) -> list[dict]:
    out = [archive_under_load(lab, scale)]
    kept = kept_segments(lab)
    sample = kept[-16:]
    out.append(push_capacity(lab, sample))
    out += push_latency(lab, sample)
    out += fetch_latency(lab, sample)
    out.append(range_fetch(lab, sample))
    out += compression(lab, kept[:: max(1, len(kept) // 8)][:8])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lab", required=True, help="folder of a running `dbops lab up` lab")
    ap.add_argument("--scale", type=int, default=100)
    a = ap.parse_args()
    for rec in run(labmod.info(a.lab), scale=a.scale):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
