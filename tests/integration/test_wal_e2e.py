"""WAL archiving end to end: PostgreSQL 15 with archive_command = `dbops wal-push %p` and
restore_command = `dbops wal-fetch %f %p`, against a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from dbops.lab import common as labcommon
from dbops.lab import harness as labmod
from dbops.lab import s3 as labs3
from dbops import proc
from dbops.config import Node
from dbops.ops.wal.archive import META_SHA256, WalArchive
from dbops.pg import binaries, conn
from dbops.pg.lsn import SEGMENT_RE
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# --------------------------------------------------------------------------- helpers


def sql(node, q: str):
    with conn.session(node) as c:
        cur = c.execute(q)
        return cur.fetchall() if cur.description else None


def one(node, q: str):
    return sql(node, q)[0][0]


def wait_until(fn, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def switch(node) -> str:
    """Write a little, switch to a new segment; returns the name of the segment just completed."""
    sql(node, "CREATE TABLE IF NOT EXISTS t_switch (i int); INSERT INTO t_switch SELECT generate_series(1, 100)")
    return one(node, "SELECT pg_walfile_name(pg_switch_wal())")


def archived_up_to(node, name: str) -> bool:
    last = one(node, "SELECT last_archived_wal FROM pg_stat_archiver")
    return bool(last) and SEGMENT_RE.match(last) and last[8:] >= name[8:] and last[:8] >= name[:8]


def ready_files(node) -> list[str]:
    d = Path(node.data_dir) / "pg_wal" / "archive_status"
    return sorted(n[:-6] for n in os.listdir(d) if n.endswith(".ready"))


def dbops(dbops_bin, cfg_path, *args, cwd=None, user=None, timeout=180):
    return proc.run([dbops_bin, "-c", str(cfg_path), *args], cwd=cwd, user=user, check=False, timeout=timeout)


def pgbench_init(node, scale: int) -> None:
    proc.run([binaries.binary("pgbench"), "-i", "-q", "-s", str(scale), "-h", node.host, "-p", str(node.port),
              "-U", node.user, node.dbname], env={"PGPASSFILE": node.passfile}, timeout=300)


def archive_of(lab) -> WalArchive:
    return WalArchive(open_store(lab.config.storage), Layout(lab.config.storage.prefix))


def set_storage(cfg_path: str, **values) -> None:
    text = Path(cfg_path).read_text()
    for k, v in values.items():
        text = re.sub(rf"^  {k}: .*\n", "", text, flags=re.MULTILINE)
        text = text.replace("storage:\n", f"storage:\n  {k}: {v}\n", 1)
    Path(cfg_path).write_text(text)


def s3_pid(lab) -> int:
    return json.loads((lab.dir / "lab.json").read_text())["s3"]["pid"]


def assert_archived_copies_identical(lab, node, tmp_path) -> int:
    """Every segment PostgreSQL marked archived (.done) and still has: fetched back, it is byte-identical."""
    pg_wal = Path(node.data_dir) / "pg_wal"
    done = sorted(n[:-5] for n in os.listdir(pg_wal / "archive_status") if n.endswith(".done"))
    arc = archive_of(lab)
    checked = 0
    for name in done:
        if not (pg_wal / name).exists():
            continue
        arc.fetch(name, tmp_path / name)
        assert (tmp_path / name).read_bytes() == (pg_wal / name).read_bytes(), name
        (tmp_path / name).unlink()
        checked += 1
    return checked


@pytest.fixture
def pgdir(base_dir, request):
    """A fresh folder the postgres OS user can use (pytest's own tmp is private to root)."""
    d = base_dir / f"wal-{request.node.name[:40]}-{time.monotonic_ns()}".replace("[", "-").replace("]", "")
    d.mkdir()
    proc.run(["chown", "postgres:postgres", str(d)])
    yield d
    proc.run(["rm", "-rf", str(d)], check=False)


def status_json(dbops_bin, lab) -> tuple[int, dict]:
    r = dbops(dbops_bin, lab.config_path, "wal", "status", "--json")
    return r.returncode, json.loads(r.stdout)


# --------------------------------------------------------------------------- the happy path under load


def test_pgbench_load_is_archived_byte_identical_without_gaps(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=0)
    node = lab.primary
    pgbench_init(node, 3)
    last = switch(node)
    wait_until(lambda: archived_up_to(node, last), 90, f"{last} archived")
    assert one(node, "SELECT failed_count FROM pg_stat_archiver") == 0
    assert assert_archived_copies_identical(lab, node, tmp_path) >= 3
    # the objects carry the sha256 of their uncompressed content, and were compressed
    arc = archive_of(lab)
    info = arc.store.head(arc.layout.wal_key(last))
    assert info.metadata[META_SHA256] == hashlib.sha256((Path(node.data_dir) / "pg_wal" / last).read_bytes()).hexdigest()
    assert info.size < 16 * 1024 * 1024
    # the pusher never wrote into archive_status: only PostgreSQL's .ready/.done files are there
    assert all(n.endswith((".ready", ".done")) for n in os.listdir(Path(node.data_dir) / "pg_wal" / "archive_status"))
    code, st = status_json(dbops_bin, lab)
    assert code == 0, st
    assert st["ok"] and st["gap_count"] == 0 and st["end"] == last
    assert st["timelines"][0]["newest"] == last and st["timelines"][0]["newest_age"] < 120
    assert st["archiver"]["node"] == "pg1" and st["archiver"]["failed_count"] == 0
    metrics = tmp_path / "wal.prom"
    r = dbops(dbops_bin, lab.config_path, "wal", "status", "--metrics-file", str(metrics))
    assert r.returncode == 0 and last in r.stdout and "no gaps" in r.stdout
    assert 'dbops_wal_archive_ok{cluster="lab"} 1' in metrics.read_text()


# --------------------------------------------------------------------------- S3 outage


def test_s3_outage_mid_load_loses_nothing_and_acknowledges_nothing_early(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=0)
    set_storage(lab.config_path, retry_deadline=2, connect_timeout=1, read_timeout=5)
    node = lab.primary
    before = switch(node)
    wait_until(lambda: archived_up_to(node, before), 60, f"{before} archived")

    assert labs3.stop_s3(s3_pid(lab))  # returns once it is gone
    during = [switch(node) for _ in range(3)]
    pgbench_init(node, 2)
    during.append(switch(node))
    failed = wait_until(lambda: one(node, "SELECT failed_count FROM pg_stat_archiver"), 90, "a failed archive attempt")
    # and a retry that failed too: PostgreSQL kept trying while S3 was down
    wait_until(lambda: one(node, "SELECT failed_count FROM pg_stat_archiver") > failed, 90, "a second failed attempt")
    # nothing acknowledged while S3 was down; PostgreSQL keeps every segment
    assert one(node, "SELECT last_archived_wal FROM pg_stat_archiver") == before
    for name in during:
        assert (Path(node.data_dir) / "pg_wal" / name).exists()
    assert during[0] in ready_files(node)

    labmod.up(lab.dir, replicas=0)  # brings S3 back on the same port with the same data
    during.append(switch(node))  # a new segment also wakes PostgreSQL's archiver from its back-off
    wait_until(lambda: archived_up_to(node, during[-1]) and not ready_files(node), 180, "archiving to catch up")
    code, st = status_json(dbops_bin, lab)
    assert code == 0 and st["ok"], st["gaps"]
    assert assert_archived_copies_identical(lab, node, tmp_path) >= len(during)
    # every completion the spool recorded is really in S3 with that checksum
    arc = archive_of(lab)
    for rec_file in (lab.dir / "spool").glob("*/done/*"):
        rec = json.loads(rec_file.read_text())
        assert arc.store.head(rec["key"]).metadata[META_SHA256] == rec["sha256"]


def test_a_killed_pusher_is_replaced_and_nothing_is_lost(make_lab, dbops_bin, tmp_path):
    import threading

    lab = make_lab(replicas=0)
    node = lab.primary
    first = switch(node)
    wait_until(lambda: archived_up_to(node, first), 60, f"{first} archived")
    lock = next((lab.dir / "spool").glob("*/pusher.lock"))
    killed: list[int] = []

    def kill_pushers():  # kill whichever pusher runs, a few times, while the load goes on
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(killed) < 3:
            try:
                pid = int(lock.read_text().split()[0])
                if pid not in killed and "dbops.ops.wal.worker" in labcommon.cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.3)

    t = threading.Thread(target=kill_pushers)
    t.start()
    pgbench_init(node, 3)
    t.join()
    last = switch(node)
    wait_until(lambda: archived_up_to(node, last) and not ready_files(node), 180, "archiving to catch up")
    assert killed, "no pusher was seen running during the load"
    code, st = status_json(dbops_bin, lab)
    assert code == 0 and st["ok"], st["gaps"]
    assert assert_archived_copies_identical(lab, node, tmp_path) >= 3


# --------------------------------------------------------------------------- idempotency, conflicts, foreign clusters


@pytest.fixture(scope="module")
def archived(lab_factory):
    """A private lab with a few segments archived: (lab, names)."""
    lab = lab_factory.create("wal-conflicts", replicas=0)
    names = [switch(lab.primary) for _ in range(2)]
    wait_until(lambda: archived_up_to(lab.primary, names[-1]), 60, "segments archived")
    return lab, names


def _scratch_copy(lab, folder: Path, name: str, flip: bool) -> Path:
    """A scratch 'data folder' (the cluster's pg_control, PG_VERSION) with one copy of a segment."""
    src = Path(lab.primary.data_dir)
    d = folder / "scratch"
    (d / "global").mkdir(parents=True)
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    (d / "global" / "pg_control").write_bytes((src / "global" / "pg_control").read_bytes())
    (d / "PG_VERSION").write_text((src / "PG_VERSION").read_text())
    data = bytearray((src / "pg_wal" / name).read_bytes())
    if flip:
        data[8 * 1024 * 1024] ^= 0xFF
    (d / "pg_wal" / name).write_bytes(bytes(data))
    (d / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    proc.run(["chown", "-R", "postgres:postgres", str(d)])
    return d


@pytest.mark.parametrize("mode", [[], ["--sync"]], ids=["async", "sync"])
def test_identical_repush_succeeds(archived, dbops_bin, mode):
    lab, names = archived
    before = archive_of(lab).store.head(archive_of(lab).layout.wal_key(names[0]))
    r = dbops(dbops_bin, lab.config_path, "wal-push", *mode, f"pg_wal/{names[0]}", cwd=lab.primary.data_dir,
              user="postgres")
    assert r.returncode == 0, r.stderr
    after = archive_of(lab).store.head(archive_of(lab).layout.wal_key(names[0]))
    assert (after.etag, after.last_modified) == (before.etag, before.last_modified)


@pytest.mark.parametrize("mode", [[], ["--sync"]], ids=["async", "sync"])
def test_conflicting_push_fails_and_leaves_the_object(archived, dbops_bin, pgdir, mode):
    lab, names = archived
    arc = archive_of(lab)
    key = arc.layout.wal_key(names[0])
    stored = arc.store.get(key)
    scratch = _scratch_copy(lab, pgdir, names[0], flip=True)
    local_sha = hashlib.sha256((scratch / "pg_wal" / names[0]).read_bytes()).hexdigest()
    r = dbops(dbops_bin, lab.config_path, "wal-push", *mode, f"pg_wal/{names[0]}", cwd=scratch, user="postgres")
    assert r.returncode == 13, r.stderr
    assert arc.store.head(key).metadata[META_SHA256] in r.stderr and local_sha in r.stderr
    assert arc.store.get(key) == stored


def test_segment_of_a_foreign_cluster_is_refused(archived, dbops_bin, pgdir):
    lab, _names = archived
    other = pgdir / "other"
    proc.run([binaries.binary("initdb"), "-D", str(other), "-U", "postgres"], user="postgres", timeout=120)
    seg = next(n for n in sorted(os.listdir(other / "pg_wal")) if SEGMENT_RE.match(n))
    (other / "pg_wal" / "archive_status" / f"{seg}.ready").touch()
    r = dbops(dbops_bin, lab.config_path, "wal-push", f"pg_wal/{seg}", cwd=other, user="postgres")
    assert r.returncode == 13, r.stderr
    assert "another cluster" in r.stderr
    assert archive_of(lab).store.head(archive_of(lab).layout.wal_key(seg)) is not None  # lab's own, untouched


def test_missing_files_make_wal_fetch_exit_9_quietly(archived, dbops_bin, tmp_path):
    lab, names = archived
    for name in ("0000000100000000000000FF", "00000009.history"):
        r = dbops(dbops_bin, lab.config_path, "wal-fetch", name, str(tmp_path / "x"))
        assert r.returncode == 9 and r.stderr.strip() == "", r.stderr
    assert not (tmp_path / "x").exists()
    r = dbops(dbops_bin, lab.config_path, "wal-fetch", names[0], str(tmp_path / "y"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "y").read_bytes() == (Path(lab.primary.data_dir) / "pg_wal" / names[0]).read_bytes()


def test_wrong_credentials_and_unreachable_endpoint_exit_4(archived, dbops_bin, tmp_path, pgdir):
    lab, names = archived
    # a segment not archived yet (the one being written), in a scratch data folder
    sql(lab.primary, "INSERT INTO t_switch VALUES (0)")
    current = one(lab.primary, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    wait_until(lambda: (Path(lab.primary.data_dir) / "pg_wal" / current).exists(), 10, f"{current} to exist")
    scratch = _scratch_copy(lab, pgdir, current, flip=False)
    bad_creds = pgdir / "bad-credentials"
    bad_creds.write_text(f"[default]\naws_access_key_id = {lab.access_key}\naws_secret_access_key = wrong-secret-xyz\n")
    wrong = pgdir / "wrong.yaml"
    wrong.write_text(Path(lab.config_path).read_text().replace(str(lab.dir / "s3-credentials"), str(bad_creds))
                     .replace(str(lab.dir / "spool"), str(pgdir / "spool")))
    gone = pgdir / "gone.yaml"
    gone.write_text(wrong.read_text())
    set_storage(str(gone), endpoint=f"http://127.0.0.1:{labmod.free_port()}", retry_deadline=1, connect_timeout=1)
    proc.run(["chown", "-R", "postgres:postgres", str(pgdir)])

    for cfg_file, words in ((wrong, ("refused", "SignatureDoesNotMatch", "secret key")), (gone, ("unreachable",))):
        t0 = time.monotonic()
        for args, user, cwd in ((["wal", "status"], None, None),
                                (["wal-fetch", names[0], str(tmp_path / "z")], None, None),
                                (["wal-push", f"pg_wal/{current}"], "postgres", scratch),
                                (["wal-push", "--sync", f"pg_wal/{current}"], "postgres", scratch)):
            r = dbops(dbops_bin, cfg_file, *args, user=user, cwd=cwd)
            assert r.returncode == 4, (args, r.stderr)
            assert all(w in r.stderr for w in words), (args, r.stderr)
            assert "wrong-secret-xyz" not in r.stderr + r.stdout
        assert time.monotonic() - t0 < 90
    assert not (tmp_path / "z").exists()
    assert archive_of(lab).store.head(archive_of(lab).layout.wal_key(current)) is None


def test_seaweedfs_verifies_content_md5_with_when_required_checksums(archived):
    lab, _ = archived
    from dbops.storage.s3 import S3Store

    store = S3Store(lab.config.storage)  # the S3 client itself, below the encryption layer
    cfg = store.client.meta.config
    assert (cfg.request_checksum_calculation, cfg.response_checksum_validation) == ("when_required",) * 2
    key = archive_of(lab).layout.probe("md5-check")
    assert store.put(key, b"hello", if_absent=True) and store.get(key) == b"hello"
    assert not store.put(key, b"other", if_absent=True) and store.get(key) == b"hello"
    import botocore.exceptions

    from dbops.storage.s3 import _md5_b64

    with pytest.raises(botocore.exceptions.ClientError) as ei:  # a body that does not match its Content-MD5
        store.client.put_object(Bucket=store.bucket, Key=key + "-bad", Body=b"hello",
                                ContentMD5=_md5_b64(b"hello world"))
    assert ei.value.response["Error"]["Code"] in ("BadDigest", "InvalidDigest")
    assert store.head(key + "-bad") is None
    store.delete(key)


# --------------------------------------------------------------------------- timeline switch and restore


def test_promotion_archives_the_new_timeline_and_restore_follows_it(make_lab, dbops_bin, pgdir):
    lab = make_lab(replicas=1)
    primary, replica = lab.primary, lab.replicas[0]
    base = pgdir / "base"
    proc.run([binaries.binary("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U", "postgres",
              "-D", str(base), "-X", "none", "-c", "fast", "-w"], user="postgres",
             env={"PGPASSFILE": primary.passfile}, timeout=300)
    sql(primary, "CREATE TABLE t_tl (i int, tl text); INSERT INTO t_tl VALUES (1, 'one')")
    last1 = switch(primary)
    wait_until(lambda: archived_up_to(primary, last1), 60, "timeline 1 archived")
    lsn = one(primary, "SELECT pg_current_wal_lsn()::text")
    wait_until(lambda: one(replica, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"), 60, "replica caught up")
    proc.run([binaries.binary("pg_ctl"), "-D", primary.data_dir, "-m", "fast", "-w", "stop"], user="postgres")
    proc.run([binaries.binary("pg_ctl"), "-D", replica.data_dir, "-w", "promote"], user="postgres")
    wait_until(lambda: not one(replica, "SELECT pg_is_in_recovery()"), 60, "promotion")
    sql(replica, "INSERT INTO t_tl VALUES (2, 'two')")
    last2 = switch(replica)
    assert last2.startswith("00000002")
    wait_until(lambda: archived_up_to(replica, last2), 90, "timeline 2 archived")

    arc = archive_of(lab)
    assert arc.exists("00000002.history")
    code, st = status_json(dbops_bin, lab)
    assert code == 0, st["gaps"]
    assert st["end"] == last2 and {t["timeline"] for t in st["timelines"]} >= {1, 2}
    assert "00000002.history" in st["histories"]

    # a restore of the timeline-1 base backup replays through the switch via restore_command
    port = labmod.free_port()
    with open(base / "postgresql.auto.conf", "a") as f:
        f.write(f"port = {port}\narchive_mode = off\nrestore_command = '{dbops_bin} -c {lab.config_path} "
                "wal-fetch %f %p'\nrecovery_target_timeline = 'latest'\nprimary_conninfo = ''\n")
    (base / "recovery.signal").touch()
    (base / "standby.signal").unlink(missing_ok=True)
    proc.run(["chown", "-R", "postgres:postgres", str(base)])
    log = pgdir / "restore.log"
    try:
        proc.run([binaries.binary("pg_ctl"), "-D", str(base), "-l", str(log), "-w", "-t", "300", "start"],
                 user="postgres", timeout=330)
        node = Node(name="restored", host="127.0.0.1", port=port, user="postgres",
                             passfile=primary.passfile, data_dir=str(base))
        wait_until(lambda: not one(node, "SELECT pg_is_in_recovery()"), 120, "restore to finish")
        assert sql(node, "SELECT i, tl FROM t_tl ORDER BY i") == [(1, "one"), (2, "two")]
        assert "restored log file \"00000002.history\" from archive" in log.read_text()
        assert f'restored log file "{last2}" from archive' in log.read_text()
    finally:
        proc.run([binaries.binary("pg_ctl"), "-D", str(base), "-m", "immediate", "-w", "stop"], user="postgres",
                 check=False)
