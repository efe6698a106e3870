"""Benchmark: encryption at rest on against off, on two otherwise identical labs at one scale.

For each lab (storage.encryption with a key file, and none): WAL archiving under `pgbench -i -s
SCALE`, the pusher's capacity (16 ready segments), the fast-path wal-push latency, a full backup,
30 s of pgbench, a validated incremental backup, and a PITR restore (started and promoted). Prints
one record per lab and a comparison with the overhead of encryption per figure (goal: <= 10 %,
fast-path p50 unchanged). The pusher's capacity and the restore vary by 20-50 % from one run to
the next on a shared 2-core machine, so each is measured `repeat` times per lab (default 3,
BENCH_ENCRYPTION_REPEAT) and compared by the median; the backups run once (each changes the chain).
Two labs are minutes apart, so the pusher's capacity is also compared inside the encrypted lab:
runs with its configuration and with the same one without the key, alternated (`capacity_ab`).

    python bench/bench_encryption.py --dir DIR [--scale 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Iterator

from dbops import proc
from dbops.lab import harness as labmod
from dbops.ops.backup import run as bk
from dbops.ops.restore import plan as rs
from dbops.ops.restore.target import from_options
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

try:
    from bench import bench_backup, bench_wal
except ImportError:  # run as a script from bench/
    import bench_backup  # type: ignore[no-redef]
    import bench_wal  # type: ignore[no-redef]


def _archived_now(lab: labmod.LabInfo, timeout: float = 300) -> None:
    with pgconn.session(lab.primary) as c:
        name = pgconn.scalar(c, "SELECT pg_walfile_name(pg_switch_wal())")
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    deadline = time.monotonic() + timeout
    while store.head(layout.wal_key(name)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} was not archived within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(data: Path) -> None:
    proc.run([binaries.binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user="postgres",
             timeout=60, check=False)


def _restore(lab: labmod.LabInfo) -> tuple[float, float | None]:
    """One PITR restore to the latest archived commit, started and promoted: (seconds, download seconds)."""
    data = lab.dir / "bench-restore"
    shutil.rmtree(data, ignore_errors=True)
    port = labmod.free_port(None, {lab.primary.port, *(r.port for r in lab.replicas)})
    target = from_options(to="latest")  # the last archived commit (the pgbench run ended before the backup)
    t0 = time.monotonic()
    try:
        res = rs.restore(lab.config, rs.Options(target=target, target_dir=data, start=True, port=port))
        return time.monotonic() - t0, res.timings.get("download")
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)


def capacity_ab(lab: labmod.LabInfo, names: list[str], rounds: int) -> dict:
    """The pusher's capacity with the lab's configuration (encrypted) and without its key, in
    alternating order, into fresh prefixes of one S3 server: the same segments, minutes closer
    together than two labs are."""
    enc = Path(lab.config_path).read_text()
    plain = re.sub(r"(?m)^  encryption:\n(    .*\n)+", "", enc)
    if plain == enc:
        raise ValueError(f"{lab.config_path} has no storage.encryption section to leave out")
    runs: dict[str, list[float]] = {"encrypted": [], "plain": []}
    for r in range(rounds):
        for label in (("plain", "encrypted") if r % 2 == 0 else ("encrypted", "plain")):
            text = plain if label == "plain" else enc
            runs[label].append(bench_wal.push_capacity(lab, names, config_text=text)["segments_per_s"])
    on, off = _median(runs["encrypted"]), _median(runs["plain"])
    return {"on_segments_per_s": on, "off_segments_per_s": off, "overhead_pct": round(100.0 * (off / on - 1), 1),
            "runs": runs}


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def measure(lab: labmod.LabInfo, scale: int, pgbench_seconds: int = 30, repeat: int = 3) -> dict:
    cfg = lab.config
    load = bench_wal.archive_under_load(lab, scale)
    sample = bench_wal.kept_segments(lab)[-16:]
    capacities = []
    for _ in range(repeat):
        capacities.append(bench_wal.push_capacity(lab, sample)["segments_per_s"])  # a fresh prefix each
    # while PostgreSQL still keeps the sample (later checkpoints recycle it)
    same_lab = capacity_ab(lab, sample, repeat) if cfg.storage.encryption.enabled else None
    fast = bench_wal.push_latency(lab, sample, calls=30)[0]
    t0 = time.monotonic()
    full = bk.run_backup(cfg, full=True)
    full_s = time.monotonic() - t0
    bench_backup.pgbench(lab, "-c", "4", "-j", "2", "-T", str(pgbench_seconds), "-n")
    t0 = time.monotonic()
    incr = bk.run_backup(cfg)
    incr_s = time.monotonic() - t0
    _archived_now(lab)
    restores = [_restore(lab) for _ in range(repeat)]
    return {
        "encryption": cfg.storage.encryption.enabled,
        "archive_load_seconds_until_none_ready": round(load["load_seconds"] + load["seconds_until_none_ready"], 2),
        "archive_ready_max_seen": load["ready_max_seen"],
        "push_capacity_segments_per_s": _median(capacities),
        "push_capacity_runs": capacities,
        "push_fast_p50_ms": fast["p50_ms"],
        "backup_full_seconds": round(full_s, 2),
        "backup_full_store_seconds": full.timings.get("store"),
        "backup_incremental_validated_seconds": round(incr_s, 2),
        "backup_incremental_download_seconds": incr.timings.get("download"),
        "restore_seconds": _median([r[0] for r in restores]),
        "restore_download_seconds": _median([r[1] or 0.0 for r in restores]),
        "restore_runs": [round(r[0], 2) for r in restores],
        "logical_bytes": full.manifest.logical_size,
        "stored_bytes_full": full.manifest.stored_bytes,
        **({"push_capacity_same_lab": same_lab} if same_lab else {}),
    }


def compare(on: dict, off: dict) -> dict:
    def overhead(k: str, higher_is_better: bool = False) -> float | None:
        a, b = on.get(k), off.get(k)
        if not a or not b:
            return None
        return round(100.0 * ((b / a - 1) if higher_is_better else (a / b - 1)), 1)

    return {
        "bench": "encryption_overhead",
        "overhead_pct": {
            "backup_full": overhead("backup_full_seconds"),
            "backup_incremental_validated": overhead("backup_incremental_validated_seconds"),
            "restore": overhead("restore_seconds"),
            "wal_push_capacity": overhead("push_capacity_segments_per_s", higher_is_better=True),
            "wal_push_capacity_same_lab": (on.get("push_capacity_same_lab") or {}).get("overhead_pct"),
            "archive_under_load": overhead("archive_load_seconds_until_none_ready"),
        },
        "push_fast_p50_ms": {"on": on["push_fast_p50_ms"], "off": off["push_fast_p50_ms"]},
        "goal": "<= 10 % each; fast-path p50 unchanged",
        "note": "backups: one run each; capacity and restore: medians of the runs listed per lab",
    }


def _repeat() -> int:
    return max(1, int(os.environ.get("BENCH_ENCRYPTION_REPEAT", "3")))


def run(base: Path, scale: int = 100) -> list[dict]:
    return list(records(base, scale, _repeat()))


def records(base: Path, scale: int = 100, repeat: int = 3) -> Iterator[dict]:
    """One record per lab as soon as it is measured, then the comparison."""
    results: dict[bool, dict] = {}
    for encrypt in (False, True):
        d = base / ("encrypted" if encrypt else "plain")
        labmod.down(d, purge=d.exists() and (d / "lab.json").exists())
        d.mkdir(parents=True, exist_ok=True)
        try:
            lab = labmod.up(d, replicas=0, encrypt=encrypt)
            results[encrypt] = measure(lab, scale, repeat=repeat)
        finally:
            labmod.down(d, purge=True)
        yield {"bench": "encryption_run", "scale": scale, **results[encrypt]}
    yield compare(results[True], results[False])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="an empty folder for the two labs")
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=_repeat(), help="capacity and restore runs per lab (median)")
    a = ap.parse_args()
    for rec in records(Path(a.dir), scale=a.scale, repeat=max(1, a.repeat)):
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
