"""Storage-side bad days on a real lab (PostgreSQL 15, SeaweedFS behind a fault proxy, podman), issue 13:

* S3 5xx, latency and dropped connections (before and after the server acted) while WAL is pushed
  and a backup runs; then a normal run;
* a store that ignores If-None-Match (the proxy strips it): check, backup and a first WAL push
  refuse it with exit 11 naming the store;
* 409 ConditionalRequestConflict is retried, not reported as a conflicting archive;
* the spool filesystem full: archive_command still stores every segment before exit 0;
* the scratch filesystem filling up while a run proves the previous backup: exit 1 naming ENOSPC,
  the previous backup keeps its status, scratch left empty; the next run with room validates it;
* a backup planted in the bucket (a real one copied under a newer ID with a hostile entry):
  restore and backup refuse it (exit 7) and touch nothing outside their target;
* a backup stopped (SIGSTOP) past the lock's TTL while a prune takes the lock over: continued,
  it stops (exit 6) without writing or deleting anything.

After each: the invariants of tests/faults/invariants.py. One private lab for the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from diskfill import fill_up, tmpfs
from labkit import own_lab
from invariants import archived_segments_are_in_the_archive, every_listed_backup_restores, scratch_is_empty, sql
from s3proxy import S3FaultProxy

from dbops import proc
from dbops.repo import catalog
from dbops.runtime import scratch as scratch_policy
from dbops.repo import manifest as mf
from dbops.repo import mformat
from dbops.repo.manifest import DIR, FileEntry
from dbops.storage import open_store
from dbops.storage.layout import Layout
from dbops.storage.lockowner import read_owner

pytestmark = [pytest.mark.integration, pytest.mark.container, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def flab(lab_factory):
    yield from own_lab(lab_factory, "faults-storage")


@pytest.fixture(scope="module")
def proxy(flab) -> Iterator[S3FaultProxy]:
    p = S3FaultProxy(flab.s3_endpoint, flab.access_key, flab.secret_key)
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _healthy(flab, proxy):
    proxy.reset()
    yield
    proxy.reset()
    set_archive_command(flab, f"{proc.dbops_executable()} -c {flab.config_path} wal-push %p")


@pytest.fixture
def env(flab) -> dict[str, str]:
    return {**os.environ, "DBOPS_CONFIG": flab.config_path}


def config_copy(lab, name: str, *, storage: dict | None = None, archive: dict | None = None,
                backup: dict | None = None) -> str:
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    for section, values in (("storage", storage), ("archive", archive), ("backup", backup)):
        raw.setdefault(section, {}).update(values or {})
    path = lab.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.chmod(path, 0o644)  # archive_command runs as postgres
    return str(path)


def run(dbops_bin: str, env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([dbops_bin, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def set_archive_command(lab, command: str) -> None:
    sql(lab.primary, f"ALTER SYSTEM SET archive_command = '{command}'")
    sql(lab.primary, "SELECT pg_reload_conf()")
    time.sleep(0.3)


def switch(lab) -> str:
    sql(lab.primary, "CREATE TABLE IF NOT EXISTS faults (n int, t timestamptz default now())")
    sql(lab.primary, "INSERT INTO faults SELECT g FROM generate_series(1, 1000) g")
    return sql(lab.primary, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]


def wait_archived(lab, names: list[str], timeout: float = 180) -> None:
    status = Path(lab.primary.data_dir) / "pg_wal" / "archive_status"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((status / f"{n}.done").exists() for n in names):
            return
        time.sleep(0.3)
    raise AssertionError(f"not archived within {timeout:.0f} s: "
                         f"{[n for n in names if not (status / f'{n}.done').exists()]}")


def invariants(lab, dbops_bin, env, tmp_path) -> None:
    assert archived_segments_are_in_the_archive(lab, tmp_path) > 0
    every_listed_backup_restores(dbops_bin, env)
    scratch_is_empty(Path(lab.config.backup.scratch_dir))


def keys(lab, prefix: str) -> dict[str, str]:
    store = open_store(lab.config.storage)
    return {o.key: o.etag for o in store.list(prefix)}


# --------------------------------------------------------------------------- S3 faults


def test_s3_errors_latency_and_dropped_connections_lose_nothing(flab, proxy, env, dbops_bin, tmp_path):
    via = config_copy(flab, "via-proxy", storage={"endpoint": proxy.endpoint, "retry_deadline": 30})
    set_archive_command(flab, f"{dbops_bin} -c {via} wal-push %p")
    proxy.fail_every, proxy.latency = 5, 0.02  # 503 SlowDown on every fifth request
    proxy.drop_every = 7  # and every seventh connection dropped ...
    names = []
    for i in range(6):
        proxy.drop_after = bool(i % 2)  # ... before the server saw it, or after it acted (answer lost)
        names.append(switch(flab))
    r = run(dbops_bin, {**env, "DBOPS_CONFIG": via}, "backup", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    wait_archived(flab, names)
    assert proxy.stats["failed_503"] and (proxy.stats["dropped"] or proxy.stats["dropped_after"])
    proxy.reset()
    set_archive_command(flab, f"{dbops_bin} -c {flab.config_path} wal-push %p")
    names = [switch(flab)]
    r = run(dbops_bin, env, "backup", "--json")  # the normal run validates the one taken under faults
    assert r.returncode == 0, r.stderr[-3000:]
    wait_archived(flab, names)
    invariants(flab, dbops_bin, env, tmp_path)


def test_a_ranged_read_cut_short_mid_body_resumes_where_it_stopped(flab, proxy):
    """A restore reads each range as a stream (ObjectStore.open_range): a connection that dies in
    the middle of a body is resumed with a new ranged GET from the first byte not yet read."""
    store = open_store(dataclasses.replace(flab.config.storage, endpoint=proxy.endpoint, retry_deadline=30))
    data = os.urandom(3 * 1024 * 1024 + 5)
    key = f"{flab.config.storage.prefix}/resume-test"
    assert store.put(key, data)
    proxy.only = lambda method, path: method == "GET" and "resume-test" in path
    proxy.cut_every = 2  # every second GET (the encryption header's read counts too) is cut halfway
    for start, length in ((0, 1000), (100, len(data)), (len(data) - 7, 100), (5, len(data) - 10)):
        with store.open_range(key, start, length) as src:
            got = b"".join(iter(lambda: src.read(256 * 1024), b""))
        assert got == data[start:start + length]
    assert proxy.stats["cut"] >= 2


def test_a_409_conditional_conflict_is_retried_not_reported_as_split_brain(flab, proxy, dbops_bin, tmp_path):
    cfg = config_copy(flab, "conflict-409", storage={"endpoint": proxy.endpoint, "prefix": "lab-409",
                                                      "retry_deadline": 20})
    seen = {"n": 0}

    def first_two_wal_puts(method: str, path: str) -> bool:
        if method == "PUT" and "/wal/0" in path:
            seen["n"] += 1
            return seen["n"] <= 2
        return False

    proxy.fail_every, proxy.fail_status, proxy.only = 1, 409, first_two_wal_puts
    seg = switch(flab)
    wait_archived(flab, [seg])
    r = proc.run([dbops_bin, "-c", cfg, "wal-push", "--sync", f"pg_wal/{seg}"], user="postgres",
                 cwd=flab.primary.data_dir, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    assert proxy.stats["failed_409"] == 2
    store = open_store(dataclasses.replace(flab.config.storage, prefix="lab-409"))
    assert store.head(Layout("lab-409").wal_key(seg)) is not None


# --------------------------------------------------------------------------- conditional writes


def test_a_store_that_ignores_if_none_match_is_refused_with_exit_11(flab, proxy, env, dbops_bin, tmp_path):
    strip = config_copy(flab, "strips-header", storage={"endpoint": proxy.endpoint, "prefix": "lab-strip"})
    proxy.strip_if_none_match = True
    r = run(dbops_bin, env, "-c", strip, "check", "--skip-runtime")
    assert r.returncode == 11, r.stdout + r.stderr
    assert "ignores conditional writes" in r.stdout and proxy.endpoint in r.stdout
    r = run(dbops_bin, env, "-c", strip, "backup")
    assert r.returncode == 11, r.stderr
    assert "ignores conditional writes" in r.stderr and proxy.endpoint in r.stderr
    seg = switch(flab)
    wait_archived(flab, [seg])
    r = proc.run([dbops_bin, "-c", strip, "wal-push", "--sync", f"pg_wal/{seg}"], user="postgres",
                 cwd=flab.primary.data_dir, check=False, timeout=120)
    assert r.returncode == 11 and "ignores conditional writes" in r.stderr, r.stderr
    assert not keys(flab, Layout("lab-strip").root + "wal/")  # nothing archived there
    proxy.strip_if_none_match = False
    r = run(dbops_bin, env, "-c", strip, "check", "--skip-runtime")
    assert "a second conditional put (If-None-Match) is refused" in r.stdout, r.stdout


# --------------------------------------------------------------------------- spool full




def test_a_full_spool_filesystem_still_archives_before_acknowledging(flab, env, dbops_bin, tmp_path):
    with tmpfs(flab.dir / "tmpfs-spool", 256 * 1024) as spool:
        os.chown(spool, *_pg_ids())
        cfg = config_copy(flab, "full-spool", archive={"spool_dir": str(spool / "s")})
        filler = spool / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        set_archive_command(flab, f"{dbops_bin} -c {cfg} wal-push %p")
        names = [switch(flab) for _ in range(3)]
        wait_archived(flab, names, timeout=120)
        set_archive_command(flab, f"{dbops_bin} -c {flab.config_path} wal-push %p")
    names = [switch(flab)]
    wait_archived(flab, names)
    assert archived_segments_are_in_the_archive(flab, tmp_path) >= 3


def _pg_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


# --------------------------------------------------------------------------- scratch full

VALIDATION_PHASES = ("download", "wal_fetch", "start", "replay", "checks", "stop")


def fill_when_a_run_starts(scratch: Path, stop: threading.Event, *, leave: int) -> threading.Thread:
    """Fill the filesystem the moment a run makes its folder there (just before it restores the previous
    backup): what another process writing to the same disk might do. All but ``leave`` bytes are
    taken beforehand (the run's own check of free space still passes), so that the last ones go
    within a few writes, while the run restores, however slow the machine: a fill that ended only
    after the validation (the store's packs then meet the full disk) would test something else."""
    with open(scratch / "ballast", "wb") as f:
        f.truncate(max(0, shutil.disk_usage(scratch).free - leave))
        os.posix_fallocate(f.fileno(), 0, max(1, f.seek(0, os.SEEK_END)))

    def watch() -> None:
        while not stop.is_set():
            if any(scratch.glob(f"{scratch_policy.SCRATCH_PREFIX}*")):
                fill_up(scratch / "ballast")
                return
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def status_of(dbops_bin, env, backup_id: str):
    r = run(dbops_bin, env, "backup", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {b["backup_id"]: b["status"] for b in json.loads(r.stdout)}.get(backup_id)


def test_the_scratch_filesystem_filling_up_during_validation(flab, env, dbops_bin, tmp_path):
    store, layout = open_store(flab.config.storage), Layout(flab.config.storage.prefix)
    if not [b for b in catalog.list_backups(store, layout) if b.usable]:
        r = run(dbops_bin, env, "backup", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
    prev = [b for b in catalog.list_backups(store, layout) if b.usable][-1]
    before = status_of(dbops_bin, env, prev.backup_id)
    listed = run(dbops_bin, env, "backup", "list", "--json").stdout
    # Room for the next normal run: the copy grows to the primary's size while it replays, and the
    # module's earlier tests may have written a lot since the previous backup.
    base = Path(flab.primary.data_dir) / "base"
    needed = scratch_policy.scratch_needed(max(mf.load(store, layout, prev.backup_id).logical_size,
                                               scratch_policy.tree_bytes(base)))
    with tmpfs(flab.dir / "tmpfs-scratch", needed + 128 * 2**20) as scratch:
        cfg = config_copy(flab, "small-scratch", backup={"scratch_dir": str(scratch)})
        names = [switch(flab)]
        stop = threading.Event()
        filler = fill_when_a_run_starts(scratch, stop, leave=needed + 32 * 2**20)
        try:
            r = run(dbops_bin, env, "-c", cfg, "backup")
        finally:
            stop.set()
            filler.join(timeout=30)
        assert (scratch / "ballast").exists(), "the run never made its scratch folder"
        assert r.returncode == 1, r.stderr[-3000:]
        assert f"the scratch folder {scratch} ran out of space (ENOSPC" in r.stderr, r.stderr[-3000:]
        phase = r.stderr.split("during phase ", 1)[1].split()[0] if "during phase " in r.stderr else None
        assert phase in VALIDATION_PHASES, r.stderr[-3000:]
        assert "no backup was marked failed" in r.stderr and "backup.scratch_dir" in r.stderr
        assert status_of(dbops_bin, env, prev.backup_id) == before  # a full disk is not the backup's fault
        assert run(dbops_bin, env, "backup", "list", "--json").stdout == listed  # nothing stored
        (scratch / "ballast").unlink()
        scratch_is_empty(scratch)  # the run's folder removed; the container too (no mount left in use)

        r = run(dbops_bin, env, "-c", cfg, "backup", "--json")  # the next normal run, with room
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["validated"]["backup_id"] == prev.backup_id
        assert status_of(dbops_bin, env, prev.backup_id) == "validated"
        wait_archived(flab, names)
        scratch_is_empty(scratch)
    invariants(flab, dbops_bin, env, tmp_path)


def test_a_restore_target_filling_up(flab, env, dbops_bin, tmp_path):
    """A restore onto a filesystem too small for the backup is refused before the download (exit 11,
    what it needs and what is free, nothing written). Past that check (--no-space-check, as on a
    filesystem that compresses), the disk filling up mid-run is exit 1 naming ENOSPC and the target
    folder with what is free there, no traceback, and what it wrote removed."""
    store, layout = open_store(flab.config.storage), Layout(flab.config.storage.prefix)
    if not [b for b in catalog.list_backups(store, layout) if b.usable]:
        r = run(dbops_bin, env, "backup", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
    with tmpfs(flab.dir / "tmpfs-target", 8 * 2**20) as mnt:
        target = mnt / "restored"
        r = run(dbops_bin, env, "restore", "--to", "latest", "--target-dir", str(target), "--dry-run", "--json")
        assert r.returncode == 0, r.stderr[-3000:]  # the plan says so before anything is tried
        assert any(n.startswith(f"not enough free space now: {target}: needs ") and "8.0 MiB free" in n
                   for n in json.loads(r.stdout)["notes"]), r.stdout
        r = run(dbops_bin, env, "restore", "--to", "latest", "--target-dir", str(target))
        assert r.returncode == 11, r.stderr[-3000:]
        assert f"error: not enough free space for the restore: {target}: needs " in r.stderr, r.stderr[-3000:]
        assert "8.0 MiB free" in r.stderr and "nothing was downloaded or written" in r.stderr
        assert "--no-space-check" in r.stderr and "Traceback" not in r.stderr
        assert list(mnt.iterdir()) == []

        r = run(dbops_bin, env, "restore", "--to", "latest", "--target-dir", str(target), "--no-space-check")
        assert r.returncode == 1, r.stderr[-3000:]
        assert "the restore ran out of disk space (ENOSPC: No space left on device) during phase download" \
            in r.stderr, r.stderr[-3000:]
        assert f"the target folder {target}: " in r.stderr and "what this restore wrote was removed" in r.stderr
        assert "--target-dir" in r.stderr
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-3000:]
        assert list(mnt.iterdir()) == []  # the folder it made is gone: nothing looks like a restored database
    scratch_is_empty(Path(flab.config.backup.scratch_dir))


def test_a_scratch_folder_too_small_for_the_wal_to_replay(flab, env, dbops_bin, tmp_path):
    """The WAL between the backup and the target is fetched into the scratch folder before the server
    starts. A scratch filesystem too small for it is refused before the download (exit 11, naming the
    scratch folder, what it needs and what is free), not found full half way; with room, the same
    restore works."""
    store, layout = open_store(flab.config.storage), Layout(flab.config.storage.prefix)
    r = run(dbops_bin, env, "backup", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    names = [switch(flab) for _ in range(8)]  # eight segments and more to replay past the backup (128 MiB+)
    wait_archived(flab, names)
    with tmpfs(flab.dir / "tmpfs-walroom", 64 * 2**20) as scratch:
        cfg = config_copy(flab, "small-wal-scratch", backup={"scratch_dir": str(scratch)})
        target = flab.dir / "restored-walroom"  # a folder postgres can reach
        r = run(dbops_bin, env, "-c", cfg, "restore", "--to", "latest", "--target-dir", str(target), "--dry-run",
                "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert any(n.startswith("not enough free space now: ") and "(scratch: the WAL to replay): needs " in n
                   for n in json.loads(r.stdout)["notes"]), r.stdout
        r = run(dbops_bin, env, "-c", cfg, "restore", "--to", "latest", "--target-dir", str(target))
        assert r.returncode == 11, r.stderr[-3000:]
        assert "error: not enough free space for the restore: " in r.stderr, r.stderr[-3000:]
        assert f"{scratch}/run-" in r.stderr and "/wal (scratch: the WAL to replay): needs " in r.stderr
        assert "of WAL to replay in the scratch folder" in r.stderr and "backup.scratch_dir" in r.stderr
        assert "Traceback" not in r.stderr and not target.exists()
        assert list(scratch.iterdir()) == []  # the run's scratch folder, with the plan's segments, is gone
    r = run(dbops_bin, env, "restore", "--to", "latest", "--target-dir", str(target), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["wal"]["fetched_ahead"] >= len(names)
    shutil.rmtree(target)
    scratch_is_empty(Path(flab.config.backup.scratch_dir))


# --------------------------------------------------------------------------- the bucket is untrusted


def plant(lab, hostile: FileEntry) -> str:
    """A copy of the newest real backup under a newer ID, with one hostile entry."""
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    newest = catalog.list_backups(store, layout)[-1]
    m = mf.load(store, layout, newest.backup_id)
    files = list(m.files) + [hostile]
    planted = mf.Manifest(catalog.new_backup_id(), dataclasses.replace(m.pg, consistent_time=m.pg.consistent_time + 1),
                          m.chunk_size, m.compression, files=files, parent_id=m.parent_id, created=m.created + 1,
                          meta=m.meta)
    path = lab.dir / "planted.manifest"
    w = mformat.Writer(str(path))  # encoded as an attacker would (Manifest.to_bytes refuses hostile entries)
    for f in files:
        w.add(f)
    w.finish(planted.header(w))
    meta = {**m.summary_metadata(), "backup-id": planted.backup_id,
            "consistent-time": repr(planted.pg.consistent_time), "created": repr(planted.created)}
    store.put(layout.manifest(planted.backup_id), path.read_bytes(), metadata=meta, if_absent=True)
    path.unlink()
    return planted.backup_id


def remove_backup(lab, backup_id: str) -> None:
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    store.delete_many([o.key for o in store.list(layout.backup_prefix(backup_id))])


@pytest.mark.parametrize("kind", ["absolute-dir", "dotdot-file"])
def test_a_planted_hostile_backup_is_refused_and_nothing_outside_changes(flab, env, dbops_bin, tmp_path, kind):
    victim = flab.dir / f"victim-{kind}"
    victim.mkdir(mode=0o755, exist_ok=True)
    os.chmod(victim, 0o755)
    target = flab.dir / f"restore-{kind}"
    hostile = (FileEntry(str(victim), DIR, 0o777, 0) if kind == "absolute-dir"
               else FileEntry(f"base/../../victim-{kind}/planted", "file", 0o666, 0, size=0, block=8192))
    bid = plant(flab, hostile)
    before = (os.stat(victim).st_uid, os.stat(victim).st_mode, sorted(os.listdir(victim)))
    try:
        # --backup: exactly the planted one, with no fallback (left to choose, a restore would take it as the
        # newest and, finding it damaged, fall back to the validated backup)
        r = run(dbops_bin, env, "restore", "--to", "latest", "--backup", bid, "--target-dir", str(target))
        assert r.returncode == 7, r.stderr
        assert "refusing a hostile or damaged entry" in r.stderr and bid in r.stderr
        no_heal = config_copy(flab, "no-heal", backup={"validation": {"heal": False}})
        r = run(dbops_bin, env, "-c", no_heal, "backup")
        assert r.returncode == 7, r.stderr
        assert "refusing a hostile or damaged entry" in r.stderr
        after = (os.stat(victim).st_uid, os.stat(victim).st_mode, sorted(os.listdir(victim)))
        assert after == before
        assert not target.exists() or not any(target.iterdir())
        store, layout = open_store(flab.config.storage), Layout(flab.config.storage.prefix)
        assert catalog.latest_status(store, layout, bid).state == catalog.FAILED  # never "validated"
    finally:
        remove_backup(flab, bid)
    scratch_is_empty(Path(flab.config.backup.scratch_dir))


# --------------------------------------------------------------------------- the lock


def test_a_backup_paused_past_its_lock_aborts_without_writing_or_deleting(flab, env, dbops_bin, tmp_path):
    short = config_copy(flab, "short-ttl", storage={"lock_ttl": 4}, backup={"retention": {"keep_last": 1}})
    store, layout = open_store(flab.config.storage), Layout(flab.config.storage.prefix)
    sql(flab.primary, "SELECT pg_switch_wal()")
    first = subprocess.Popen([dbops_bin, "-c", short, "backup"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            owner = read_owner(store, layout, "backup")
            if owner is not None and owner.pid == first.pid:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the backup never took its lock")
        time.sleep(1.0)
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(4 + 3)  # past the TTL
        other_host = tmp_path / "other-host-locks"  # a second host: its own host-local lock folder
        other_host.mkdir(mode=0o700)
        r = run(dbops_bin, {**env, "DBOPS_LOCK_DIR": str(other_host)}, "-c", short, "backup", "prune",
                "--confirm", "--json")
        assert r.returncode == 0, r.stderr  # took the expired lock over and pruned
        assert json.loads(r.stdout)["remove"], r.stdout  # it deleted something while the first was stopped
        before = keys(flab, layout.root)
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 6, err[-3000:]
        assert "was lost" in err
        after = keys(flab, layout.root)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        assert not {k for k in changed if "/locks/" not in k and "/probe/" not in k}, sorted(changed)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    scratch_is_empty(Path(flab.config.backup.scratch_dir))
    invariants(flab, dbops_bin, env, tmp_path)
