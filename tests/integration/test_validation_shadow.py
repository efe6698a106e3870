"""pg_checksums on a shadow folder without the main forks the server verified itself (the tables the
checks read in full): a bad heap page of such a table is still caught (by the server, as the
validation's table reads report it), a bad index page is caught by pg_checksums on the shadow,
and both ways agree on every file but those left to the server (podman one-shot and a local tool)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dbops import proc
from dbops.errors import ValidationError
from dbops.ops.backup import shadow
from dbops.ops.backup.checks import run_checks
from dbops.config.parse import parse
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.repo.store import store_snapshot
from dbops.runtime import InstanceSpec, open_runtime

from test_backup_chain import backup, mark, sql, store_of
from test_runtime import copy_cluster, no_leftovers, own_folder, settings, stopped_cluster  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.container]

PAGE = 8192


@pytest.fixture(scope="module")
def work(base_dir) -> Path:
    return own_folder(base_dir, "validation-shadow")


def flip(f: Path, page: int = 1) -> None:
    """One byte in the middle of a page flipped: its checksum no longer matches."""
    body = bytearray(f.read_bytes())
    assert len(body) > page * PAGE and any(body[page * PAGE:(page + 1) * PAGE])
    body[page * PAGE + PAGE // 2] ^= 0xFF
    f.write_bytes(bytes(body))


def static_table(node) -> tuple[str, str]:
    """A table with an index that nothing changes after it is made (no replay touches its pages):
    (its file, its index's file)."""
    sql(node, "CREATE TABLE still (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = off)")
    sql(node, "INSERT INTO still SELECT g, repeat('s', 100) FROM generate_series(1, 2000) g")
    sql(node, "VACUUM (FREEZE) still")
    sql(node, "CHECKPOINT")
    return (sql(node, "SELECT pg_relation_filepath('still')")[0][0],
            sql(node, "SELECT pg_relation_filepath('still_pkey')")[0][0])


def store_damaged(lab, tmp_path: Path, rel: str) -> str:
    """The newest backup's files with one page of rel flipped, stored again as the newest backup."""
    store, layout = store_of(lab)
    cfg = lab.config
    newest = [b for b in catalog.list_backups(store, layout) if b.usable][-1]
    m = mf.load(store, layout, newest.backup_id)
    folder = tmp_path / f"copy-{Path(rel).name}"
    restore_snapshot(store, layout, m, str(folder), parallel=2, durable=False)
    flip(folder / rel)
    bad_id = catalog.new_backup_id()
    store_snapshot(store, layout, str(folder), backup_id=bad_id, parent_manifests=(m,), pg=m.pg,
                   compression=cfg.compression, chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size,
                   parallel=2, meta={**m.meta, "kind": "full"})
    return bad_id


def test_pages_the_server_read_are_left_to_it_and_bad_pages_still_fail(make_lab, cli, tmp_path):
    lab = make_lab(replicas=0)
    heap, index = static_table(lab.primary)
    mark(lab.primary, 1)
    r1, _ = backup(cli, lab)
    assert r1.exit_code == 0, r1
    mark(lab.primary, 2)
    r2, b2 = backup(cli, lab)
    assert r2.exit_code == 0, r2
    # The table reads verified the tables' main forks; pg_checksums read the rest (on the shadow).
    record = next(c for c in b2["validated"]["checks"] if c["check"] == "pg_checksums")
    assert record["ok"] and record["verified_by_server"] > 0 and record["files"] > 0, record
    reads = [c for c in b2["validated"]["checks"] if c["check"] == "read_tables"]
    assert reads and all(c["pages_verified"] for c in reads), reads

    # A bad heap page of a table the checks read: the server's read fails the validation.
    bad = store_damaged(lab, tmp_path, heap)
    r3 = cli(["-c", lab.config_path, "-v", "backup"])
    assert r3.exit_code == 7, r3
    assert f"backup {bad} failed validation: database postgres of the restored backup cannot be read" \
        in r3.stderr, r3.stderr
    assert "invalid page in block 1 of relation" in r3.stderr, r3.stderr

    # A bad index page (no table read reads it): pg_checksums on the shadow fails it, naming the file.
    bad = store_damaged(lab, tmp_path, index)
    r4 = cli(["-c", lab.config_path, "-v", "backup"])
    assert r4.exit_code == 7, r4
    assert f"backup {bad} failed validation: pg_checksums found bad pages" in r4.stderr, r4.stderr
    assert Path(index).name in r4.stderr
    rows = json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout)
    assert rows[-1]["kind"] == "full" and rows[-1]["parent_id"] is None  # healed, as after any failed validation


def _config():
    return parse({"cluster": "t", "nodes": [{"name": "n1", "host": "127.0.0.1", "port": 5432, "data_dir": "/x"}],
                  "storage": {"bucket": "shadow-test", "endpoint": "http://127.0.0.1:9"},
                  "runtime": {"engine": "none"}})


@pytest.fixture(scope="module")
def cluster(work) -> tuple[Path, str, str]:
    data, paths = stopped_cluster(work, "shadowed", [
        "create tablespace elsewhere location '" + str(_tablespace(work)) + "'",
        "create table t (id int primary key, pad text) tablespace elsewhere",
        "insert into t select g, repeat('x', 300) from generate_series(1, 3000) g",
        "create table u (id int primary key, pad text)",
        "insert into u select g, repeat('y', 300) from generate_series(1, 3000) g",
        "checkpoint"], "select pg_relation_filepath('t') || ' ' || pg_relation_filepath('u') || ' ' || "
                       "pg_relation_filepath('u_pkey')")
    t, u, u_pkey = str(paths).split()
    return data, t, u + " " + u_pkey


def _tablespace(work: Path) -> Path:
    d = work / "shadowed-tblspc"
    d.mkdir(exist_ok=True)
    shutil.chown(d, "postgres", "postgres")
    return d


def _own_tablespace(data: Path) -> Path:
    """The copy's tablespace copied too, its link pointed there (a copy must not write the source's)."""
    (link,) = (data / "pg_tblspc").iterdir()
    own = data.parent / f"{data.name}-tblspc"
    copy_cluster(link.resolve(), own)
    link.unlink()
    link.symlink_to(own)
    return own


def _checksums(settings, engine: str, data: Path, verified: set[str] | None) -> tuple[bool, list[dict], str]:
    checks: list[dict] = []
    tblspc = str((data.parent / f"{data.name}-tblspc").resolve())
    spec = InstanceSpec(data_dir=data, port=proc.free_port(), name=f"shadow-{engine}", mounts=((tblspc, tblspc),))
    with open_runtime(settings[engine]).start(spec) as inst:
        inst.wait_ready(60)
        inst.stop("fast", timeout=60)
        try:
            shadow.pg_checksums(_config(), inst, data, verified, checks)
            return True, checks, ""
        except ValidationError as e:
            return False, checks, e.detail or ""


@pytest.mark.parametrize("engine", ["podman", "none"])
def test_with_and_without_the_shadow_agree(engine, settings, cluster, work):
    src, t, rest = cluster
    u, u_pkey = rest.split()
    data = copy_cluster(src, work / f"shadowed-{engine}")
    _own_tablespace(data)
    verified = {t, u}
    ok_all, all_checks, _ = _checksums(settings, engine, data, None)
    ok_shadow, shadow_checks, _ = _checksums(settings, engine, data, verified)
    assert ok_all and ok_shadow
    assert all_checks == [{"check": "pg_checksums", "files": "all", "ok": True}]
    rec = shadow_checks[0]
    assert rec["ok"] and rec["verified_by_server"] == 2 and rec["verified_by_server_bytes"] > 2 * 100 * PAGE, rec
    assert not (data.parent / shadow.SHADOW).exists()  # removed once read

    flip(data / u_pkey)  # an index page: both find it, in the same file
    ok_all, _, all_detail = _checksums(settings, engine, data, None)
    ok_shadow, _, shadow_detail = _checksums(settings, engine, data, verified)
    assert not ok_all and not ok_shadow
    assert Path(u_pkey).name in all_detail and Path(u_pkey).name in shadow_detail, (all_detail, shadow_detail)

    flip(data / u_pkey)  # back as it was
    flip(data / t)  # a page of a table in a tablespace the server verified: left to it, read by the full run
    ok_all, _, all_detail = _checksums(settings, engine, data, None)
    ok_shadow, _, _ = _checksums(settings, engine, data, verified)
    assert not ok_all and Path(t).name in all_detail
    assert ok_shadow


@pytest.fixture(scope="module")
def other_am(work) -> tuple[Path, str, str]:
    """A stopped cluster with a table on a table access method other than `heap` (heap's handler under
    another name, as an extension's would be) and a heap table: (folder, its file, the heap table's)."""
    data, paths = stopped_cluster(work, "other-am", [
        "create access method heap2 type table handler heap_tableam_handler",
        "create table h2 (id int, pad text) using heap2",
        "insert into h2 select g, repeat('z', 300) from generate_series(1, 2000) g",
        "create table h (id int, pad text)",
        "insert into h select g, repeat('w', 300) from generate_series(1, 2000) g",
        "checkpoint"], "select pg_relation_filepath('h2') || ' ' || pg_relation_filepath('h')")
    h2, h = str(paths).split()
    return data, h2, h


def test_a_table_of_another_access_method_is_left_to_pg_checksums(settings, other_am, work):
    """The checks read it in full, but only `heap` counts as read by the server (another access method
    need not read every block): its file stays in the shadow folder, and a bad page in it is caught there."""
    src, h2, h = other_am
    data = copy_cluster(src, work / "other-am-copy")
    spec = InstanceSpec(data_dir=data, port=proc.free_port(), name="other-am")
    with open_runtime(settings["none"]).start(spec) as inst:
        inst.wait_ready(60)
        verified: set[str] = set()
        checks: list[dict] = []
        run_checks(_config(), inst, checks, verified)
        (reads,) = [c for c in checks if c["check"] == "read_tables" and c["database"] == "postgres"]
        assert reads["ok"] and reads["pages_verified"] and reads["rows"] >= 4000, reads
        assert h in verified and h2 not in verified, (verified, h2)
        inst.stop("fast", timeout=60)
        got: list[dict] = []
        shadow.pg_checksums(_config(), inst, data, verified, got)
        (rec,) = got
        assert rec["ok"] and rec["verified_by_server"] == len(verified), rec
        assert rec["verified_by_server_bytes"] == sum((data / p).stat().st_size for p in verified), rec

        flip(data / h2)
        got = []
        with pytest.raises(ValidationError) as ei:
            shadow.pg_checksums(_config(), inst, data, verified, got)
        assert "pg_checksums found bad pages" in ei.value.message
        assert Path(h2).name in (ei.value.detail or ""), ei.value.detail
        assert not got[0]["ok"] and got[0]["verified_by_server"] == len(verified)
    assert not (data.parent / shadow.SHADOW).exists()


def test_a_restart_point_not_in_the_log_leaves_every_file_to_pg_checksums(make_lab, cli, tmp_path):
    """The source logs nothing below FATAL (``log_min_messages``, a setting of its own that the backup's
    postgresql.auto.conf carries into the throwaway): the restart point beside the checks runs but is not
    seen in the log, so nothing counts as verified by the server and pg_checksums reads every file; a
    bad index page is still caught."""
    lab = make_lab(replicas=0)
    _heap, index = static_table(lab.primary)
    sql(lab.primary, "ALTER SYSTEM SET log_min_messages = 'fatal'")
    sql(lab.primary, "SELECT pg_reload_conf()")
    mark(lab.primary, 1)
    r1, _ = backup(cli, lab)
    assert r1.exit_code == 0, r1
    mark(lab.primary, 2)
    r2 = cli(["-c", lab.config_path, "-v", "backup", "--json"])
    assert r2.exit_code == 0, r2
    assert "no restart point logged beside the checks" in r2.stderr, r2.stderr
    b2 = json.loads(r2.stdout)
    reads = [c for c in b2["validated"]["checks"] if c["check"] == "read_tables"]
    assert reads and all(c["ok"] and c["pages_verified"] for c in reads), reads  # the scans ran as ever
    record = next(c for c in b2["validated"]["checks"] if c["check"] == "pg_checksums")
    assert record == {"check": "pg_checksums", "files": "all", "ok": True}, record  # verified_by_server: none

    bad = store_damaged(lab, tmp_path, index)
    r3 = cli(["-c", lab.config_path, "-v", "backup"])
    assert r3.exit_code == 7, r3
    assert "no restart point logged beside the checks" in r3.stderr, r3.stderr
    assert f"backup {bad} failed validation: pg_checksums found bad pages" in r3.stderr, r3.stderr
    assert Path(index).name in r3.stderr
