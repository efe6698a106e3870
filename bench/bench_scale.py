"""Benchmark: the scale sweep. For each pgbench scale in BENCH_SCALES (default "100 400"), on a
fresh lab: dbops and pgBackRest side by side on the same data and the same machine.

Sequence per scale: `pgbench -i`; the primary's archive_command also pushes to pgBackRest (its own
async archive-push, after `dbops wal-push`); dbops full backup; pgBackRest full; 30 s of pgbench;
dbops validated incremental; pgBackRest incremental; 10 s more of pgbench, the target time 2 s
before its end, that WAL archived by both; then a point-in-time restore to that target, started
and promoted: dbops (`restore --to TIME --start`), pgBackRest (its own async archive-get), and as
a second line pgBackRest replaying the dbops archive through `dbops wal-fetch` (``wal: dbops``).
Before each restore the disk is synced (not timed): the one that runs first would otherwise also
pay for the writes pgbench and the backups left in the page cache, and then the machine idles
(``BENCH_IDLE`` seconds, default 15, not timed; also before each backup): on a VM that hands freed
memory back to its host, the tool that runs right after another's removal of its restored folder
would otherwise find that memory still warm, where the first found it cold. Before each backup, of either
tool, the primary is settled (not timed, ``settle_seconds``): the WAL so far archived by every
archiver, a `CHECKPOINT`, the disk synced. Without it the tool that runs first after `pgbench`
(dbops, by this order) also paid for the checkpoint of pgbench's dirty buffers (its backup's own
fast checkpoint), the archivers' backlog of pgbench's WAL (its capture waits for its segment, behind
them) and the kernel's write-back of both, and the tool after it found them done.
``BENCH_SETTLE=0`` times the backups as before (no settling; ``settle_seconds`` null).

Every command runs as a child under GNU time: ``rss_kib`` is its peak resident set (the largest
process of the tree it waits for: dbops itself, pg_basebackup, pgBackRest's workers; not the
throwaway PostgreSQL server, which is not its child). ``manifest_bytes``: the stored manifest.
``primary_read_bytes``: bytes read through the primary's own processes during the command
(/proc/PID/io rchar, sampled; autovacuum workers and the archiver, whose archive_command reads
every WAL segment anyway, left out): the data a full backup streams, and
for dbops' incremental only its few queries, since it restores the previous backup from storage
instead of reading the primary. For pgBackRest's incremental: the bytes of the files it copied
(``info.delta``: it reads every changed file whole). ``stored_by``: a dbops backup's new stored
bytes by kind of block (WAL, main-fork page deltas, main-fork whole blocks, the rest).
``scale_restore_files``: each dbops backup's files restored on their own in this process (fetch,
check, write, fsync; the incremental's page deltas over their bases), no server started.

``scale_backup_incremental_chain``: last, ``BENCH_CHAIN`` (default 2) more dbops incrementals,
each after 30 s of pgbench and on the one before (``chain_depth`` 2, 3: incrementals since the
full), as cron takes them day after day.

``scratch_cache``: whether a dbops backup's validation kept its copy of the previous backup in the
page cache or dropped it as it was written (``backup.scratch_cache``, auto: dropped when larger
than the memory available).

``copy_method``: how a dbops full backup copied the source (auto: straight from its data folder
here; pg_basebackup when the config says so).

    python bench/bench_scale.py --dir DIR [--scales "100 400"]   (BENCH_SCALES, BENCH_ONLY=full)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod
from dbops.pg import binaries
from dbops.storage import open_store
from dbops.storage.layout import Layout

try:
    from bench import pgbackrest_peer
    from bench.bytecode import compile_dbops
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]
    from bytecode import compile_dbops  # type: ignore[no-redef]

PGBENCH_SECONDS = 30
CHAIN = int(os.environ.get("BENCH_CHAIN", "2"))  # incrementals after the first, each on the one before
PITR_PGBENCH_SECONDS = 10  # WAL after the incremental that a restore to the target replays
# BENCH_ONLY=full: only the full backups (dbops with its default copy, pgBackRest, dbops with
# backup.copy_method pg_basebackup, dbops again): an A/B round on one lab.
ONLY = os.environ.get("BENCH_ONLY", "")
SETTLE = os.environ.get("BENCH_SETTLE", "1") != "0"
# Seconds of idle before each timed backup and restore, of either tool, after the disk is synced.
# Some VMs (this project's machines: free page reporting) hand memory freed in the guest back to
# their host within a second or two, and the host faults it in again, page by page, when the guest
# next writes it: 1.2-2 s more kernel time per GB (docs/backups.md, capacity model). The tool that runs right after another's
# removal of a restored or scratch folder found that memory still warm; after the idle both find it
# returned. 0 times as before.
IDLE = float(os.environ.get("BENCH_IDLE", "15"))


def _pgbench(lab: labmod.LabInfo, *args: str) -> None:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=7200)


class PrimaryReads:
    """Sum of rchar over the primary's processes (not autovacuum workers), sampled while it runs."""

    def __init__(self, data_dir: str):
        self.pid = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.stop = threading.Event()

    def _sample(self) -> None:
        # Not the postmaster's own counter: the kernel adds the reads of every child it reaps to it.
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                        cmd = Path(f"/proc/{d}/cmdline").read_bytes()
                        if b"autovacuum" not in cmd and b"archiver" not in cmd:
                            pids.append(int(d))
                except (OSError, ValueError, IndexError):
                    continue
        for pid in pids:
            try:
                rchar = int(next(x for x in Path(f"/proc/{pid}/io").read_text().splitlines()
                                 if x.startswith("rchar:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            self.first.setdefault(pid, rchar if self.started else 0)
            self.last[pid] = rchar

    def __enter__(self) -> PrimaryReads:
        self.started = True
        self._sample()
        self.started = False  # processes seen later started during the command: count from 0
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            self._sample()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.t.join()
        self._sample()

    @property
    def bytes(self) -> int:
        return sum(self.last[p] - self.first.get(p, 0) for p in self.last)


def _timed(argv: list[str], *, timeout: float = 7200) -> tuple[float, int, str]:
    """(wall seconds, peak RSS KiB, stdout) of a command run under GNU time."""
    fd, out = tempfile.mkstemp(prefix="bench-rss-")
    os.close(fd)
    try:
        t0 = time.monotonic()
        r = proc.run(["/usr/bin/time", "-f", "%M", "-o", out, *argv], timeout=timeout)
        wall = time.monotonic() - t0
        return wall, int(Path(out).read_text().split()[-1]), r.stdout
    finally:
        os.unlink(out)


def _dbops(lab: labmod.LabInfo, *args: str) -> tuple[float, int, dict]:
    wall, rss, out = _timed([labmod.dbops_executable(), "-c", lab.config_path, *args, "--json"])
    return wall, rss, json.loads(out)


def stored_by(store, layout: Layout, backup_id: str, parent_id: str | None) -> dict[str, int]:
    """The backup's new stored bytes by kind of block (a frame's bytes shared by its blocks in
    proportion to their raw bytes): WAL, main-fork page deltas, main-fork whole blocks, the rest."""
    from dbops.repo import blocks
    from dbops.repo import manifest as mf

    old = mf.load_header(store, layout, parent_id).packs() if parent_id else set()
    out = {"pg_wal": 0, "main_fork_deltas": 0, "main_fork_whole": 0, "other": 0}
    for e in mf.load(store, layout, backup_id).entries():
        kind = ("pg_wal" if e.path.startswith("pg_wal/") else
                "main_fork_" if blocks.is_main_fork(e.path) else "other")
        for c in e.chunks:
            if c.pack is None or c.pack in old or not c.frame_raw:
                continue
            k = kind + ("deltas" if c.mask else "whole") if kind == "main_fork_" else kind
            out[k] += c.length * c.stored_raw // c.frame_raw
    return out


def restore_download(store, layout: Layout, backup_id: str, folder: Path) -> dict:
    """Seconds to restore the backup's files (fetch, check, write, fsync) in this process."""
    from dbops.repo import manifest as mf
    from dbops.repo.restore import restore_snapshot

    shutil.rmtree(folder, ignore_errors=True)
    os.sync()  # untimed: no other writes pending
    t = time.monotonic()
    st = restore_snapshot(store, layout, mf.load(store, layout, backup_id), str(folder), parallel=4)
    wall = time.monotonic() - t
    shutil.rmtree(folder, ignore_errors=True)
    return {"wall_seconds": round(wall, 2), "fetched_bytes": st.fetched_bytes, "requests": st.requests,
            "logical_bytes": st.logical_bytes}


def _config_with_copy(lab: labmod.LabInfo, method: str) -> str:
    """The lab's configuration with backup.copy_method set (written beside it)."""
    import yaml

    raw = yaml.safe_load(Path(lab.config_path).read_text())
    raw.setdefault("backup", {})["copy_method"] = method
    path = lab.dir / f"dbops-{method}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _db_size(lab: labmod.LabInfo) -> int:
    from dbops.pg import conn as pgconn

    with pgconn.session(lab.primary) as c:
        return int(pgconn.scalar(c, "SELECT sum(pg_database_size(oid))::bigint FROM pg_database"))


def _stop(data: Path) -> None:
    proc.run([binaries.binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user="postgres",
             timeout=60, check=False)


def _archived_through_now(lab: labmod.LabInfo, timeout: float = 600) -> None:
    """Switch WAL and wait until the primary reports that segment archived (by every command in
    its archive_command: dbops and, while it is attached, pgBackRest)."""
    from dbops.pg import conn as pgconn

    with pgconn.session(lab.primary) as c:
        name = pgconn.scalar(c, "SELECT pg_walfile_name(pg_switch_wal())")
        deadline = time.monotonic() + timeout
        while (pgconn.scalar(c, "SELECT last_archived_wal FROM pg_stat_archiver") or "") < name:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not archived within {timeout:.0f} s")
            time.sleep(0.2)


def _settle(lab: labmod.LabInfo) -> float | None:
    """Untimed, before each backup of either tool: every archiver caught up, the primary's dirty
    buffers checkpointed, the disk synced; the seconds it took (None with BENCH_SETTLE=0)."""
    from dbops.pg import conn as pgconn

    if not SETTLE:
        _idle()
        return None
    t0 = time.monotonic()
    _archived_through_now(lab)
    with pgconn.session(lab.primary) as c:
        c.execute("CHECKPOINT")
    os.sync()
    settled = round(time.monotonic() - t0, 2)
    _idle()
    return settled


def _idle() -> None:
    """Untimed, after the disk is synced, before each timed backup and restore: see IDLE."""
    if IDLE > 0:
        time.sleep(IDLE)


def _now(lab: labmod.LabInfo) -> float:
    from dbops.pg import conn as pgconn

    with pgconn.session(lab.primary) as c:
        return float(pgconn.scalar(c, "SELECT extract(epoch FROM clock_timestamp())"))


def sweep_one(lab: labmod.LabInfo, scale: int) -> list[dict]:
    _pgbench(lab, "-i", "-s", str(scale), "-q")
    if not pgbackrest_peer.available():
        return _sweep(lab, scale, None)
    with pgbackrest_peer.session(lab, own_wal=True) as p, pgbackrest_peer.archiving(lab, p):
        return _sweep(lab, scale, p)


def _sweep(lab: labmod.LabInfo, scale: int, p: pgbackrest_peer.Peer | None) -> list[dict]:
    out: list[dict] = []
    size = _db_size(lab)
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    base = {"scale": scale, "database_bytes": size}

    def dbops_backup(bench: str, *args: str, copy_method: str = "auto", **extra: object) -> None:
        config = lab.config_path if copy_method == "auto" else _config_with_copy(lab, copy_method)
        settled = _settle(lab)
        with PrimaryReads(lab.primary.data_dir) as reads:
            wall, rss, out_ = _timed([labmod.dbops_executable(), "-c", config, "backup", *args, "--json"])
            res = json.loads(out_)
        head = store.head(layout.manifest(res["backup_id"]))
        out.append({**base, "bench": bench, "tool": "dbops", "copy_method": copy_method, **extra,
                    "wall_seconds": round(wall, 2), "rss_kib": rss, "settle_seconds": settled,
                    "manifest_bytes": head.size if head else None, "stored_bytes": res["stored_bytes"],
                    "logical_bytes": res["logical_size"], "primary_read_bytes": reads.bytes,
                    "counts": res.get("counts"), "timings": res.get("timings"),
                    "scratch_cache": (res.get("validated") or {}).get("scratch_cache"),
                    "stored_by": stored_by(store, layout, res["backup_id"], res.get("parent_id"))})
        ids.append(res["backup_id"])

    def peer_backup(bench: str, kind: str) -> None:
        try:
            rss: list[int] = []
            settled = _settle(lab)
            wall, b = pgbackrest_peer.backup(p, kind, rss)
            out.append({**base, "bench": bench, "tool": "pgbackrest", "wall_seconds": round(wall, 2),
                        "rss_kib": rss[0], "settle_seconds": settled, "manifest_bytes": p.manifest_bytes(b["label"]),
                        "stored_bytes": b["info"]["repository"]["delta"], "logical_bytes": b["info"]["size"],
                        "primary_read_bytes": b["info"]["delta"]})
        except Exception as e:  # the peer's figures are optional; ours stand
            out.append({**base, "bench": bench, "tool": "pgbackrest", "error": f"{type(e).__name__}: {e}",
                        "detail": (getattr(e, "detail", None) or "")[-2000:]})

    peer = p is not None
    ids: list[str] = []
    dbops_backup("scale_backup_full", "--full")
    if peer:
        peer_backup("scale_backup_full", "full")
    if ONLY == "full":  # A/B of the full backup alone: the base copy by pg_basebackup, then ours again
        dbops_backup("scale_backup_full", "--full", copy_method="pg_basebackup")
        dbops_backup("scale_backup_full", "--full")
        return out
    _pgbench(lab, "-c", "4", "-j", "2", "-T", str(PGBENCH_SECONDS), "-n")
    dbops_backup("scale_backup_incremental")
    if peer:
        peer_backup("scale_backup_incremental", "incr")
    # The files of each backup restored on their own (the incremental's page deltas over their bases).
    for kind, backup_id in zip(("full", "incremental"), ids):
        out.append({**base, "bench": "scale_restore_files", "tool": "dbops", "backup": kind,
                    **restore_download(store, layout, backup_id, lab.dir / "bench-scale-files")})

    # A point-in-time target after some more WAL, archived by both tools.
    _pgbench(lab, "-c", "4", "-j", "2", "-T", str(PITR_PGBENCH_SECONDS), "-n")
    target_time = _now(lab) - 2.0
    _archived_through_now(lab)
    target = datetime.fromtimestamp(target_time, UTC).isoformat()
    base = {**base, "target_time": target}

    data = lab.dir / "bench-scale-restore"
    shutil.rmtree(data, ignore_errors=True)
    port = labmod.free_port(None, {lab.primary.port, *(r.port for r in lab.replicas)})
    os.sync()  # each restore starts with no other writes pending (the first would pay for pgbench's)
    _idle()
    try:
        wall, rss_kib, res = _dbops(lab, "restore", "--to", target, "--target-dir", str(data), "--start",
                                    "--port", str(port))
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)
    plan = res.get("plan") or {}
    out.append({**base, "bench": "scale_restore", "tool": "dbops", "wall_seconds": round(wall, 2),
                "rss_kib": rss_kib, "timings": res.get("timings"), "download": res.get("download"),
                "backup_state": (plan.get("backup") or {}).get("state"),
                "wal_segments": (plan.get("wal") or {}).get("segments"), "fell_back_from": res.get("fell_back_from")})
    for wal in ("pgbackrest", "dbops") if peer else ():
        rss = []
        os.sync()
        _idle()
        try:
            r = pgbackrest_peer.restore(p, lab, target_time, rss=rss, wal=wal)
            out.append({**base, "bench": "scale_restore", "tool": "pgbackrest", "wal": wal,
                        "wall_seconds": r["wall_seconds"], "rss_kib": rss[0] if rss else None, "phases": r["phases"]})
        except Exception as e:  # the peer's figures are optional; ours stand
            out.append({**base, "bench": "scale_restore", "tool": "pgbackrest", "wal": wal,
                        "error": f"{type(e).__name__}: {e}", "detail": (getattr(e, "detail", None) or "")[-2000:]})
    # The other commands that read a whole backup or the whole catalog: their memory too.
    for bench, argv in (("scale_verify", ("verify", ids[-1])), ("scale_prune_preview", ("backup", "prune"))):
        try:
            wall, rss_kib, res = _dbops(lab, *argv)
            out.append({**base, "bench": bench, "tool": "dbops", "wall_seconds": round(wall, 2), "rss_kib": rss_kib,
                        "result": {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool))}})
        except Exception as e:  # the figures above stand
            out.append({**base, "bench": bench, "tool": "dbops", "error": f"{type(e).__name__}: {e}",
                        "detail": (getattr(e, "detail", None) or "")[-2000:]})
    # The steady state of a cron job: more incrementals, each on the one before (its deltas over the
    # full's blocks cover more pages each time). Last, so the figures above compare as before.
    for depth in range(2, 2 + CHAIN):
        _pgbench(lab, "-c", "4", "-j", "2", "-T", str(PGBENCH_SECONDS), "-n")
        dbops_backup("scale_backup_incremental_chain", chain_depth=depth)
    return out


def run_sweep(root: Path, scales: list[int], emit) -> int:
    """One fresh lab per scale under root; emit(record) for every measurement. Returns failures."""
    compile_dbops()  # the commands timed start as an installed dbops does
    failed = 0
    for scale in scales:
        d = root / f"scale-{scale}"
        labmod.down(d, purge=d.exists() and (d / "lab.json").exists())
        d.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(d.parent, 0o755)
        print(f"== bench_scale {scale}", file=sys.stderr, flush=True)
        lab = labmod.up(d, replicas=0, encrypt=False)  # as the pgBackRest peer: no encryption at rest
        try:
            for rec in sweep_one(lab, scale):
                emit(rec)
        except Exception as e:  # report and go on with the next scale
            failed += 1
            emit({"bench": "scale", "scale": scale, "error": f"{type(e).__name__}: {e}",
                  "detail": (getattr(e, "detail", None) or "")[-3000:]})
        finally:
            labmod.down(d, purge=True)
    return failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / ".bench" / "sweep"))
    ap.add_argument("--scales", default=os.environ.get("BENCH_SCALES", "100 400"))
    a = ap.parse_args()
    return 1 if run_sweep(Path(a.dir), [int(s) for s in a.scales.split()],
                          lambda r: print(json.dumps(r), flush=True)) else 0


if __name__ == "__main__":
    sys.exit(main())
