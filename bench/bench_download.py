"""Benchmark: the restore download alone (fetch, decompress, verify, write, fsync), dbops beside
pgBackRest, on one lab kept between runs so a change can be measured again without rebuilding it.

    python -m bench.bench_download setup --dir DIR --scale 400 [--incremental]
    python -m bench.bench_download measure --dir DIR [--runs 2] [--tools dbops,dbops-enc,pgbackrest,dbops-incr,dbops-scratch] [--idle 5] [--parallel N]
    python -m bench.bench_download down --dir DIR

`setup` takes a dbops full backup (plain, as the sweep's lab) and copies it, object by object,
under a second prefix through the encryption layer (``dbops-enc``: the same backup, AES-GCM
sealed), and a pgBackRest full backup (zstd-3, process-max 2, its own S3 server over HTTPS).
`measure` restores each into a fresh folder: dbops through ``restore_snapshot`` (the code a
restore and a validation run; durable: every file fsynced) in a child process, pgBackRest with
`pgbackrest restore`; both under GNU time: wall seconds, peak RSS (KiB), user and system CPU.
Nothing is started. The previous run's folder is removed and the disk synced before each run.
``--incremental``: after the full backups, 30 s of pgbench (as the sweep) and a dbops incremental
(page deltas over the full's blocks); ``dbops-incr`` restores it (its files only, like
``scale_restore_files``); ``dbops-scratch`` restores the full as a validation downloads its scratch
copy (not durable: no fsync, nothing dropped from the page cache). ``--parallel``: the workers
(default: the lab's ``backup.parallel``).
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
from pathlib import Path

from dbops import proc
from dbops.lab import harness as labmod

try:
    from bench import pgbackrest_peer
    from bench.bytecode import compile_dbops
except ImportError:  # run as a script from bench/
    import pgbackrest_peer  # type: ignore[no-redef]
    from bytecode import compile_dbops  # type: ignore[no-redef]

ENC_PREFIX = "lab-enc"


def _pgbench(lab: labmod.LabInfo, *args: str) -> None:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    from dbops.pg import binaries

    proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=7200)


def _enc_config(lab: labmod.LabInfo) -> Path:
    """A copy of the lab's configuration with its archive under ENC_PREFIX, encrypted."""
    from dbops.lab import common
    from dbops.storage import keys

    key_file = lab.dir / "bench-enc.key"
    if not key_file.exists():
        common.write_private(key_file, keys.generate() + "\n")
    text = Path(lab.config_path).read_text().replace("  prefix: lab\n", f"  prefix: {ENC_PREFIX}\n")
    text = text.replace("  credentials_file:", f"  encryption:\n    key_file: {key_file}\n  credentials_file:", 1)
    path = lab.dir / "dbops-enc.yaml"
    path.write_text(text)
    return path


def _copy_encrypted(lab: labmod.LabInfo, backup_id: str) -> None:
    """The backup's manifest and packs, re-stored under ENC_PREFIX through the encryption layer."""
    from dbops import config as cfgmod
    from dbops.storage import open_store
    from dbops.storage.layout import Layout

    src_cfg, dst_cfg = lab.config, cfgmod.load(str(_enc_config(lab)))
    src, dst = open_store(src_cfg.storage), open_store(dst_cfg.storage)
    src_l, dst_l = Layout(src_cfg.storage.prefix), Layout(dst_cfg.storage.prefix)
    raw = src.inner  # type: ignore[attr-defined]  # a plain lab: the S3 store below the layer
    for prefix in (src_l.packs_prefix(), src_l.backup_prefix(backup_id)):
        for o in raw.list(prefix):
            data, info = raw.get_with_info(o.key)
            rel = o.key[len(src_l.root):]
            dst.put(dst_l.root + rel, data, metadata=info.metadata)


def setup(d: Path, scale: int, resume: bool = False, incremental: bool = False) -> None:
    """``resume``: go on from the last step done (the lab kept)."""
    done = d / "bench-download-steps.json"
    steps = json.loads(done.read_text()) if resume and done.exists() else {}
    if not resume:
        labmod.down(d, purge=d.exists() and (d / "lab.json").exists())
    d.parent.mkdir(parents=True, exist_ok=True)
    lab = labmod.up(d, replicas=0, encrypt=False)
    if "backup_id" not in steps:
        _pgbench(lab, "-i", "-s", str(scale), "-q")
        r = proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup", "--full", "--json"], timeout=7200)
        steps["backup_id"] = json.loads(r.stdout)["backup_id"]
        done.write_text(json.dumps(steps))
    backup_id = steps["backup_id"]
    _copy_encrypted(lab, backup_id)
    if pgbackrest_peer.available():
        with pgbackrest_peer.session(lab) as p:
            pgbackrest_peer.backup(p, "full")
    if incremental and "incremental_id" not in steps:
        _pgbench(lab, "-c", "4", "-j", "2", "-T", "30", "-n")
        r = proc.run([labmod.dbops_executable(), "-c", lab.config_path, "backup", "--json"], timeout=7200)
        steps["incremental_id"] = json.loads(r.stdout)["backup_id"]
        done.write_text(json.dumps(steps))
    (d / "bench-download.json").write_text(json.dumps({"backup_id": backup_id, "scale": scale,
                                                       "incremental_id": steps.get("incremental_id")}))


def _timed(argv: list[str], **kw) -> dict:
    fd, out = tempfile.mkstemp(prefix="bench-time-")
    os.close(fd)
    try:
        t0 = time.monotonic()
        r = proc.run(["/usr/bin/time", "-f", "%M %U %S", "-o", out, *argv], timeout=7200, **kw)
        wall = time.monotonic() - t0
        rss, user, system = Path(out).read_text().split()[-3:]
        return {"wall_seconds": round(wall, 2), "rss_kib": int(rss), "cpu_user": float(user),
                "cpu_system": float(system), "stdout": r.stdout}
    finally:
        os.unlink(out)


def _fresh(folder: Path, idle: float = 0.0) -> None:
    """The folder removed and the disk synced; then ``idle`` seconds waited: the memory its page
    cache held, freed just now and taken again at once by the next run, is cheap; on a VM that
    hands free memory back to its host (free page reporting, a couple of seconds after it is
    freed), memory free for longer costs a fault to the host when first written (``--idle``)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    if idle:
        time.sleep(idle)


def measure(d: Path, runs: int, tools: list[str], profile: str | None = None, code: str | None = None,
            idle: float = 0.0, parallel: int | None = None) -> list[dict]:
    lab = labmod.info(d)
    meta = json.loads((d / "bench-download.json").read_text())
    target = d / "bench-download-restore"
    compile_dbops()
    out = []
    for n in range(runs):
        for tool in tools:
            _fresh(target, idle)
            if tool in ("dbops", "dbops-enc", "dbops-incr", "dbops-scratch"):
                cfg = str(d / "dbops-enc.yaml") if tool == "dbops-enc" else lab.config_path
                backup_id = meta["incremental_id"] if tool == "dbops-incr" else meta["backup_id"]
                argv = [sys.executable, "-m", "bench.bench_download", "child", cfg, backup_id, str(target)]
                if code:  # another checkout's dbops (e.g. the code before a change), this bench
                    argv[1:3] = ["-c", "import runpy, sys; sys.meta_path = [f for f in sys.meta_path if 'editable' "
                                 f"not in repr(f)]; sys.path.insert(0, {code!r}); "
                                 "runpy.run_module('bench.bench_download', run_name='__main__')"]
                if profile:
                    argv += ["--profile", f"{profile}-{tool}-{n}.pstats"]
                if tool == "dbops-scratch":
                    argv.append("--scratch")
                if parallel:
                    argv += ["--parallel", str(parallel)]
                rec = _timed(argv, cwd=str(Path(__file__).resolve().parent.parent))
                stats = json.loads(rec.pop("stdout"))
            else:
                with pgbackrest_peer.session(lab) as p:
                    _fresh(p.private / "restore", idle)
                    (p.private / "restore").mkdir(mode=0o700)
                    proc.chown_to(p.private / "restore", "postgres")
                    t0 = time.monotonic()
                    rss: list[int] = []
                    p.run("restore", f"--pg1-path={p.private / 'restore'}", rss=rss)
                    rec = {"wall_seconds": round(time.monotonic() - t0, 2), "rss_kib": rss[0]}
                    _fresh(p.private / "restore")
                stats = {}
            out.append({"bench": "download", "tool": tool, "scale": meta["scale"], "run": n, **rec, **stats})
            print(json.dumps(out[-1]), flush=True)
    _fresh(target)
    return out


def child(config: str, backup_id: str, target: str, profile: str | None, scratch: bool = False,
          parallel: int | None = None) -> None:
    from dbops import config as cfgmod
    from dbops.repo import manifest as mf
    from dbops.repo.restore import restore_snapshot
    from dbops.storage import open_store
    from dbops.storage.layout import Layout

    cfg = cfgmod.load(config)
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    m = mf.load(store, layout, backup_id)
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # resident set over time: where the peak comes from
        while not stop.wait(0.1):
            samples.append(int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                                    if x.startswith("VmRSS:")).split()[1]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    st = restore_snapshot(store, layout, m, target, parallel=parallel or cfg.backup.parallel, durable=not scratch)
    stop.set()
    sampler.join()
    if profile:
        prof.disable()
        prof.dump_stats(profile)
    import dbops

    print(json.dumps({"code": str(Path(dbops.__file__).parent.parent), "download_seconds": st.seconds, "timings": st.timings, "logical_bytes": st.logical_bytes,
                      "fetched_bytes": st.fetched_bytes, "requests": st.requests,
                      "rss_kib_deciles": [samples[int(i * (len(samples) - 1) / 10)] for i in range(11)] if samples else []}))


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--dir", required=True)
    s.add_argument("--scale", type=int, default=400)
    s.add_argument("--resume", action="store_true", help="go on with a lab whose setup stopped")
    s.add_argument("--incremental", action="store_true", help="also an incremental after 30 s of pgbench")
    m = sub.add_parser("measure")
    m.add_argument("--dir", required=True)
    m.add_argument("--runs", type=int, default=1)
    m.add_argument("--tools", default="dbops,dbops-enc,pgbackrest")
    m.add_argument("--profile", default=None, help="cProfile output prefix for the dbops runs")
    m.add_argument("--code", default=None, help="a folder holding another dbops package to measure (before/after)")
    m.add_argument("--parallel", type=int, default=None, help="the dbops runs' workers (default: the lab's)")
    m.add_argument("--idle", type=float, default=0.0,
                   help="seconds waited after the previous run's folder is removed, before each run")
    c = sub.add_parser("child")
    c.add_argument("config")
    c.add_argument("backup_id")
    c.add_argument("target")
    c.add_argument("--profile", default=None)
    c.add_argument("--scratch", action="store_true")
    c.add_argument("--parallel", type=int, default=None)
    dn = sub.add_parser("down")
    dn.add_argument("--dir", required=True)
    a = ap.parse_args()
    if a.cmd == "setup":
        setup(Path(a.dir).resolve(), a.scale, a.resume, a.incremental)
    elif a.cmd == "measure":
        measure(Path(a.dir).resolve(), a.runs, a.tools.split(","), a.profile, a.code, a.idle, a.parallel)
    elif a.cmd == "child":
        child(a.config, a.backup_id, a.target, a.profile, a.scratch, a.parallel)
    else:
        labmod.down(Path(a.dir).resolve(), purge=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
