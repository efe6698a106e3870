"""Bad days, on a real lab (PostgreSQL, SeaweedFS, podman): each ends with a clear message, the
documented exit code, nothing half-stored listed, nothing left behind, and a next run that works.

* a scratch folder too small (refused up front, exit 11) or filling up mid-run (ENOSPC named);
* S3 unreachable for a while: backups exit 4, PostgreSQL keeps its WAL (.ready files pile up,
  pg_wal grows), and once S3 is back the archiver drains it with no gap in the archive;
* SIGTERM mid-run (exit 14, container, scratch and lock gone; SIGKILL is test_backup_chain's);
* the primary going away mid-backup (before the target capture: exit 5; after it: not needed);
* a lock left by a run on another host (exit 6 while fresh, taken over once expired).

One private lab for the module; every test leaves it healthy (S3 and the primary running).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from diskfill import fill_up, tmpfs
import yaml

from dbops import config as cfgmod
from dbops.lab import harness as labmod
from dbops.lab import s3 as labs3
from dbops import proc
from dbops.errors import DbopsError, ExitCode
from dbops.storage.lockowner import LockOwner, read_owner
from dbops.ops.backup import run as bk
from dbops.runtime import scratch as scratch_policy
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.container]

QUICK_RETRY = 2  # storage.retry_deadline in the test's configurations: storage errors within seconds


@pytest.fixture(scope="module")
def blab(lab_factory) -> Iterator[labmod.LabInfo]:
    info = lab_factory.create("bad-days", replicas=0)
    yield info
    lab_factory.destroy(info.dir)


@pytest.fixture
def env(blab) -> dict[str, str]:
    return {**os.environ, "DBOPS_CONFIG": blab.config_path}


# --------------------------------------------------------------------------- helpers


def sql(node, statement: str):
    with pgconn.session(node) as c:
        cur = c.execute(statement)
        return cur.fetchall() if cur.description else None


def write_wal(node, rounds: int = 1) -> None:
    """Commit a little and switch to a new segment (a switch with nothing written is a no-op)."""
    for _ in range(rounds):
        sql(node, "CREATE TABLE IF NOT EXISTS bad_days (n int, t timestamptz default now())")
        sql(node, "INSERT INTO bad_days SELECT g FROM generate_series(1, 100) g")
        sql(node, "SELECT pg_switch_wal()")


def config_copy(lab, folder: Path, *, storage: dict | None = None, backup: dict | None = None) -> str:
    """The lab's dbops.yaml with some keys changed, written to folder (the lab's own file stays)."""
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    raw["storage"].update(storage or {})
    raw["backup"].update(backup or {})
    path = folder / f"dbops-{len(list(folder.glob('dbops-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def run(dbops_bin: str, env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([dbops_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def backups(dbops_bin: str, env: dict[str, str]) -> list[dict]:
    r = run(dbops_bin, env, "backup", "list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def take_backup(dbops_bin: str, env: dict[str, str], config: str | None = None) -> dict:
    r = run(dbops_bin, env, *(["-c", config] if config else []), "backup", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def containers(scratch: Path) -> set[str]:
    """dbops' throwaway containers whose folders lie in `scratch` (other test runs on this machine, in
    the other test lane, have theirs elsewhere)."""
    r = subprocess.run(["podman", "ps", "-a", "-q", "--filter", "label=dbops=1"], capture_output=True, text=True,
                       check=False)
    if not r.stdout.split():
        return set()
    # check=False: a container may be removed between the two calls (inspect still prints the others)
    r = subprocess.run(["podman", "inspect", "--format", "{{.Id}} {{range .Mounts}}{{.Source}} {{end}}",
                        *r.stdout.split()], capture_output=True, text=True, check=False)
    root = str(Path(scratch).resolve()) + "/"
    return {line.split()[0][:12] for line in r.stdout.splitlines()
            if any(src.startswith(root) for src in line.split()[1:])}


def run_dirs(scratch: Path) -> list[Path]:
    return list(scratch.glob(f"{scratch_policy.SCRATCH_PREFIX}*"))


def in_process_backup(config: str, hook: Callable[[str], None], *, full: bool = False) -> DbopsError | None:
    """`dbops backup` in this process, with hook(phase) called as each phase begins: the way to act at a
    precise moment of a run (stop the primary, fill the disk). Returns the error it ended with."""
    try:
        bk.run_backup(cfgmod.load(config), full=full, progress=hook)
    except DbopsError as e:
        return e
    return None


def once_at(phase: str, action: Callable[[], None]) -> Callable[[str], None]:
    done = []

    def hook(name: str) -> None:
        if name == phase and not done:
            done.append(name)
            action()

    return hook


def assert_left_nothing(scratch: Path, before_containers: set[str]) -> None:
    assert not run_dirs(scratch), f"scratch left behind: {run_dirs(scratch)}"
    assert not (containers(scratch) - before_containers), "a throwaway container was left behind"


# --------------------------------------------------------------------------- scratch disk




def fill(folder: Path) -> Path:
    """Write a ballast file until the filesystem is full (what another process on that disk might do)."""
    fill_up(folder / "ballast")
    return folder / "ballast"


def test_scratch_too_small_is_refused_before_any_work(blab, env, dbops_bin, tmp_path):
    with tmpfs(blab.dir / "tmpfs-small", 8 * 2**20) as small:
        config = config_copy(blab, tmp_path, backup={"scratch_dir": str(small)})
        listed = backups(dbops_bin, env)
        t0 = time.monotonic()
        r = run(dbops_bin, env, "-c", config, "backup")
        assert r.returncode == ExitCode.PRECONDITION == 11, r.stderr
        assert time.monotonic() - t0 < 30
        assert f"scratch folder {small}" in r.stderr
        assert "MiB free" in r.stderr and "needed" in r.stderr
        assert "backup.scratch_dir" in r.stderr  # the hint: what to change
        assert not any(small.iterdir()), "nothing may be written before the check"
        assert backups(dbops_bin, env) == listed


def test_scratch_filling_up_mid_run(blab, env, dbops_bin, tmp_path):
    """Space runs out after the up-front check passed: in the full backup's copy, while restoring the previous backup,
    and under the throwaway PostgreSQL. Each time: ENOSPC named, scratch and container removed, nothing
    listed, and the previous backup is not blamed (not marked failed)."""
    write_wal(blab.primary)
    first = take_backup(dbops_bin, env)
    size = int(sql(blab.primary, "SELECT sum(pg_database_size(oid)) FROM pg_database")[0][0])
    needed = scratch_policy.scratch_needed(max(size, first["logical_size"]))
    with tmpfs(blab.dir / "tmpfs-scratch", needed + 32 * 2**20) as scratch:
        config = config_copy(blab, tmp_path, backup={"scratch_dir": str(scratch)})
        for phase, full in (("copy", True), ("download", False), ("start", False), ("replay", False)):
            listed = backups(dbops_bin, env)
            before = containers(scratch)
            err = in_process_backup(config, once_at(phase, lambda: fill(scratch)), full=full)
            assert err is not None, f"a full disk in phase {phase} went unnoticed"
            text = err.render()
            assert err.exit_code == ExitCode.FAILED, text
            assert f"scratch folder {scratch} ran out of space (ENOSPC" in err.message, text
            assert f"during phase {phase}" in err.message, text
            assert "backup.scratch_dir" in (err.hint or "")
            assert_left_nothing(scratch, before)
            assert backups(dbops_bin, env) == listed, f"phase {phase}: the backup list changed"
            (scratch / "ballast").unlink()
        # With the space back, the chain goes on from the backup taken before.
        nxt = take_backup(dbops_bin, env, config)
        assert nxt["validated"]["backup_id"] == first["backup_id"]
        assert not run_dirs(scratch)


# --------------------------------------------------------------------------- S3 outage and WAL


def stop_s3(lab) -> None:
    pid = json.loads((lab.dir / labmod.STATE_FILE).read_text())["s3"]["pid"]
    assert labs3.stop_s3(pid)  # returns once it is gone: its port and data folder are free again


def archiver(node) -> dict:
    row = sql(node, "SELECT archived_count, failed_count, last_archived_wal FROM pg_stat_archiver")[0]
    return {"archived": row[0], "failed": row[1], "last_archived": row[2]}


def ready_files(lab) -> list[str]:
    d = Path(lab.primary.data_dir) / "pg_wal" / "archive_status"
    return sorted(p.name[: -len(".ready")] for p in d.glob("*.ready"))


def pg_wal_bytes(lab) -> int:
    d = Path(lab.primary.data_dir) / "pg_wal"
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def wait_for(what: str, cond: Callable[[], bool], timeout: float, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


def test_s3_outage_wal_accumulates_then_drains(blab, env, dbops_bin, tmp_path):
    """S3 down for a while: a backup exits 4 within its retry deadline; archive_command fails, PostgreSQL
    keeps every segment (.ready files pile up, pg_wal grows); when S3 is back the archiver drains it all,
    every segment is in the archive (no gap), and the next backup validates across the outage."""
    first = take_backup(dbops_bin, env)
    quick = config_copy(blab, tmp_path, storage={"retry_deadline": QUICK_RETRY})
    lab_yaml = Path(blab.config_path)
    # archive_command reads the lab's own file: let it give up quickly too (lab.up rewrites it afterwards).
    raw = yaml.safe_load(lab_yaml.read_text())
    raw["storage"]["retry_deadline"] = QUICK_RETRY
    lab_yaml.write_text(yaml.safe_dump(raw, sort_keys=False))
    write_wal(blab.primary)
    wait_for("archiving before the outage", lambda: not ready_files(blab), 60)
    before = archiver(blab.primary)
    wal_before = pg_wal_bytes(blab)

    stop_s3(blab)
    try:
        t0 = time.monotonic()
        r = run(dbops_bin, env, "-c", quick, "backup")
        took = time.monotonic() - t0
        assert r.returncode == ExitCode.STORAGE == 4, r.stderr
        assert "storage unreachable" in r.stderr and blab.s3_endpoint in r.stderr, r.stderr
        assert f"retried for {QUICK_RETRY} s" in r.stderr, r.stderr
        assert took < QUICK_RETRY + 20, took

        write_wal(blab.primary, rounds=5)
        wait_for("archive_command failing", lambda: archiver(blab.primary)["failed"] > before["failed"], 60)
        outage = ready_files(blab)
        assert len(outage) >= 5, outage  # PostgreSQL keeps them all
        assert pg_wal_bytes(blab) >= wal_before + 4 * 16 * 2**20
        assert archiver(blab.primary)["archived"] == before["archived"]
        r = run(dbops_bin, env, "-c", quick, "wal", "status")
        assert r.returncode == ExitCode.STORAGE, r.stderr
    finally:
        labmod.up(blab.dir, replicas=0)  # idempotent: restarts S3, rewrites dbops.yaml

    write_wal(blab.primary)  # ordinary traffic wakes the archiver (else it retries within 60 s)
    wait_for("the archiver draining the backlog", lambda: not ready_files(blab), 120)
    after = archiver(blab.primary)
    assert after["archived"] >= before["archived"] + len(outage)
    sql(blab.primary, "CHECKPOINT")  # segments are removed or recycled now: they must all be archived
    store, layout = open_store(blab.config.storage), Layout(blab.config.storage.prefix)
    missing = [s for s in outage if store.head(layout.wal_key(s)) is None]
    assert not missing, missing
    r = run(dbops_bin, env, "wal", "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["gaps"] == [] and st["ok"], st
    assert st["start"] <= outage[0] and st["end"] >= outage[-1], (st["start"], st["end"], outage)
    assert st["archiver"]["ready_count"] == 0

    nxt = take_backup(dbops_bin, env, quick)
    assert nxt["validated"]["backup_id"] == first["backup_id"]  # replayed every outage segment


# --------------------------------------------------------------------------- interrupted runs


def test_sigterm_mid_run_cleans_up_and_releases_the_lock(blab, env, dbops_bin):
    take_backup(dbops_bin, env)
    scratch = Path(blab.config.backup.scratch_dir)
    listed = backups(dbops_bin, env)
    before = containers(scratch)
    p = subprocess.Popen([dbops_bin, "backup"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the run's container", lambda: bool(containers(scratch) - before) or p.poll() is not None, 60, 0.05)
        assert p.poll() is None, "the run ended before its container could be seen"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == ExitCode.INTERRUPTED == 14, err
    assert "interrupted" in err
    assert_left_nothing(scratch, before)
    store, layout = open_store(blab.config.storage), Layout(blab.config.storage.prefix)
    assert read_owner(store, layout, "backup") is None, "the lock object was left behind"
    assert backups(dbops_bin, env) == listed
    t0 = time.monotonic()
    take_backup(dbops_bin, env)  # starts at once: no exit 6
    assert time.monotonic() - t0 < 120


def pg_ctl(lab, *args: str) -> None:
    proc.run([binaries.binary("pg_ctl"), "-D", lab.primary.data_dir, *args], user="postgres", timeout=120)


def test_primary_gone_before_target_capture(blab, env, dbops_bin):
    """The primary stops (immediate, like a crash) while the previous backup is being restored: the run
    cannot capture a target, exits 5 saying so, stores nothing and does not blame the previous backup."""
    prev = take_backup(dbops_bin, env)
    scratch = Path(blab.config.backup.scratch_dir)
    listed = backups(dbops_bin, env)
    before = containers(scratch)
    try:
        err = in_process_backup(blab.config_path,
                                once_at("capture", lambda: pg_ctl(blab, "-m", "immediate", "-w", "stop")))
        assert err is not None
        text = err.render()
        assert err.exit_code == ExitCode.POSTGRES == 5, text
        assert "cannot capture the backup's target" in err.message and "no reachable primary" in err.message, text
        assert blab.primary.name in (err.detail or ""), text
        assert_left_nothing(scratch, before)
        assert backups(dbops_bin, env) == listed  # prev still "stored", nothing new
    finally:
        labmod.up(blab.dir, replicas=0)  # starts the primary again (crash recovery)
    nxt = take_backup(dbops_bin, env)
    assert nxt["validated"]["backup_id"] == prev["backup_id"]


def test_primary_gone_after_target_capture_is_not_needed(blab, env, dbops_bin):
    """Once the target is captured and archived the run needs only the archive: a primary that stops
    during validation does not spoil it, and the stored backup validates after the primary is back."""
    write_wal(blab.primary)
    try:
        err = in_process_backup(blab.config_path,
                                once_at("replay", lambda: pg_ctl(blab, "-m", "immediate", "-w", "stop")))
        assert err is None, err.render()
        assert not pgconn_ok(blab.primary)
    finally:
        labmod.up(blab.dir, replicas=0)
    made = backups(dbops_bin, env)[-1]
    nxt = take_backup(dbops_bin, env)
    assert nxt["validated"]["backup_id"] == made["backup_id"]


def pgconn_ok(node) -> bool:
    try:
        sql(node, "SELECT 1")
    except DbopsError:
        return False
    return True


# --------------------------------------------------------------------------- locks


def test_lock_from_another_host_blocks_until_it_expires(blab, env, dbops_bin):
    store, layout = open_store(blab.config.storage), Layout(blab.config.storage.prefix)
    ttl = 8.0
    now = time.time()
    stale = LockOwner(host="other-host", pid=4242, command="backup", started=now, expires=now + ttl, ttl=ttl,
                      token="feedface" * 4)
    assert store.put(layout.lock("backup"), stale.to_bytes(), if_absent=True)
    info = store.head(layout.lock("backup"))

    r = run(dbops_bin, env, "backup")
    assert r.returncode == ExitCode.LOCKED == 6, r.stderr
    assert "other-host" in r.stderr and "pid 4242" in r.stderr, r.stderr
    assert read_owner(store, layout, "backup") == stale  # a refused run leaves the lock alone

    # Expiry is judged on the server's clock: Last-Modified + ttl (+ 1 s for its resolution).
    wait_for("the lock to expire", lambda: (store.server_time() or time.time()) > info.last_modified + ttl + 1.5,
             ttl + 30)
    r = run(dbops_bin, env, "backup", "--json")
    assert r.returncode == 0, r.stderr
    assert "taking over expired lock" in r.stderr and "other-host" in r.stderr, r.stderr
    assert read_owner(store, layout, "backup") is None  # taken over, then released
