"""The full backup's base copy: the source's data folder copied on this host between
pg_backup_start and pg_backup_stop (backup.copy_method auto/direct), and pg_basebackup when the
folder is not this host's to read. Real PostgreSQL, real S3, writes running during the copy."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from dbops import proc
from dbops.errors import ExitCode, PostgresError
from dbops.pg import conn as pgconn
from dbops.pg.lsn import parse_lsn
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout
from labkit import backup_cli, own_lab, restore, restored, sql, stop

pytestmark = [pytest.mark.integration, pytest.mark.container]


@pytest.fixture(scope="module")
def clab(lab_factory):
    yield from own_lab(lab_factory, "livecopy")


class Writer:
    """Commits rows 1, 2, 3, ... one transaction each, remembering the WAL insert position after each
    commit; a second connection keeps updating rows of a larger table (pages changing while copied)."""

    def __init__(self, node) -> None:
        self.node, self.done = node, threading.Event()
        self.committed: list[tuple[int, int]] = []  # (id, WAL position after its commit)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._insert), threading.Thread(target=self._update)]

    def _insert(self) -> None:
        try:
            with pgconn.session(self.node) as c:
                i = 0
                while not self.done.is_set():
                    i += 1
                    c.execute("INSERT INTO w VALUES (%s, md5(%s::text))", (i, i))
                    self.committed.append((i, parse_lsn(pgconn.scalar(c, "SELECT pg_current_wal_insert_lsn()::text"))))
        except PostgresError as e:
            self.errors.append(e.detail or e.message)

    def _update(self) -> None:
        try:
            with pgconn.session(self.node) as c:
                while not self.done.is_set():
                    c.execute("UPDATE big SET n = n + 1 WHERE id % 97 = (random() * 96)::int")
        except PostgresError as e:
            self.errors.append(e.detail or e.message)

    def __enter__(self) -> Writer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)


def config_with(lab, folder: Path, *, backup: dict | None = None, data_dir: str | None = None) -> str:
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    for key, value in (backup or {}).items():  # a section (validation, ...) merged into the lab's own
        given = raw["backup"].get(key)
        raw["backup"][key] = {**given, **value} if isinstance(value, dict) and isinstance(given, dict) else value
    if data_dir:
        raw["nodes"][0]["data_dir"] = data_dir
    path = folder / "dbops.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_direct_copy_under_writes_restores_every_committed_row(clab, cli, tmp_path):
    p = clab.primary
    env = {"DBOPS_LOCK_DIR": str(clab.dir / "run")}
    sql(p, "CREATE TABLE w (id int PRIMARY KEY, note text)")
    sql(p, "CREATE TABLE big (id int PRIMARY KEY, n int, pad text) WITH (fillfactor = 50)")
    sql(p, "INSERT INTO big SELECT g, 0, repeat('b', 300) FROM generate_series(1, 60000) g")  # ~40 MB
    sql(p, "CREATE UNLOGGED TABLE scratchpad AS SELECT g FROM generate_series(1, 1000) g")
    with Writer(p) as w:
        r, res = backup_cli(cli, clab.config_path, "--full", env=env)
        assert r.exit_code == 0, r
    assert not w.errors, w.errors
    assert "copy" in res["timings"] and "basebackup" not in res["timings"], res["timings"]
    # The store that followed the copy gave the final store the blocks recovery did not touch (by their
    # page LSNs), and the files it did not write at all (unread, dbops.repo.known); w and big are read.
    c = res["counts"]
    assert c["lsn_reused_chunks"] + c["unchanged_chunks"] > 0 and c["unchanged_files"] > 0, c
    consistent = parse_lsn(res["consistent_lsn"])
    must = max((i for i, lsn in w.committed if lsn <= consistent), default=0)
    assert must > 0, "no row was committed before the backup's consistent point"

    # Restored to the backup's own point and started: every row committed before it, none missing.
    target, port = clab.dir / "restored-direct", proc.free_port()
    rr = restore(cli, clab, "--target-dir", target, "--to-lsn", res["consistent_lsn"], "--backup",
                 res["backup_id"], "--start", "--port", port, env=env)
    try:
        assert rr.exit_code == 0, rr
        node = restored(clab, port)
        count, top = sql(node, "SELECT count(*), max(id) FROM w")[0]
        assert count == top and top >= must, (count, top, must)
        assert sql(node, "SELECT count(*) FROM big")[0][0] == 60000
        assert sql(node, "SELECT count(*) FROM scratchpad")[0][0] == 0  # unlogged: its init fork only
    finally:
        stop(target)


def test_folder_not_on_this_host_falls_back_to_pg_basebackup_or_is_refused(clab, cli, dbops_bin, tmp_path):
    env = {**os.environ, "DBOPS_LOCK_DIR": str(clab.dir / "run")}

    def run(config: str, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
        r = subprocess.run([dbops_bin, "-v", "-c", config, *args, "--json"], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
        return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)

    elsewhere = str(tmp_path / "not-the-data-folder")
    auto = config_with(clab, tmp_path, data_dir=elsewhere)
    r, res = run(auto, "backup", "--full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "basebackup" in res["timings"] and "copy" not in res["timings"], res["timings"]
    assert res["counts"]["unchanged_files"] > 0, res["counts"]  # pg_basebackup's files recorded once it exited
    assert "taking the base backup with pg_basebackup" in r.stderr and elsewhere in r.stderr

    listed = run(auto, "backup", "list")[1]
    (tmp_path / "direct").mkdir()
    direct = config_with(clab, tmp_path / "direct", data_dir=elsewhere, backup={"copy_method": "direct"})
    r, _ = run(direct, "backup", "--full")
    assert r.returncode == ExitCode.PRECONDITION, r.stderr[-3000:]
    assert "backup.copy_method is direct" in r.stderr and "cannot be copied from this host" in r.stderr
    assert run(auto, "backup", "list")[1] == listed

    (tmp_path / "basebackup").mkdir()
    forced = config_with(clab, tmp_path / "basebackup", backup={"copy_method": "pg_basebackup"})
    r, res = run(forced, "backup", "--full")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "basebackup" in res["timings"] and "copy" not in res["timings"], res["timings"]


def test_quiet_database_restores_byte_for_byte(clab, cli, tmp_path):
    """The blocks the store recorded while it followed the copy are the copy's: a table nothing
    changes during the backup is restored with exactly the primary's bytes, file for file."""
    p = clab.primary
    env = {"DBOPS_LOCK_DIR": str(clab.dir / "run")}
    sql(p, "CREATE TABLE quiet (id int, pad text) WITH (autovacuum_enabled = off)")
    sql(p, "INSERT INTO quiet SELECT g, md5(g::text) || repeat('q', 150) FROM generate_series(1, 120000) g")
    sql(p, "CREATE INDEX quiet_id ON quiet (id)")
    sql(p, "VACUUM (FREEZE) quiet")
    sql(p, "CHECKPOINT")
    files = [sql(p, f"SELECT pg_relation_filepath('{rel}')")[0][0] for rel in ("quiet", "quiet_id")]
    r, res = backup_cli(cli, clab.config_path, "--full", env=env)
    assert r.exit_code == 0, r
    assert res["counts"]["unchanged_files"] > 0, res["counts"]  # quiet's files among them: not read again
    store, layout = open_store(clab.config.storage), Layout(clab.config.storage.prefix)
    folder = tmp_path / "files"
    restore_snapshot(store, layout, mf.load(store, layout, res["backup_id"]), str(folder), parallel=2,
                     durable=False)
    data = Path(p.data_dir)
    for rel in files:
        assert (data / rel).stat().st_size > 2**20, rel  # many blocks
        assert (folder / rel).read_bytes() == (data / rel).read_bytes(), rel


def test_scratch_cache_drop_still_proves_the_previous_backup_and_says_so(clab, cli, tmp_path):
    """``backup.scratch_cache: drop``: the validation's download writes its copy back and drops its pages
    as it goes (past its first 2 GiB: here only the writeback starts early); the copy restored that way
    still starts, replays to the present and passes its checks, an assertion on its rows among them. By default (auto)
    a copy this small is kept. The backup's JSON says which."""
    env = {"DBOPS_LOCK_DIR": str(clab.dir / "run")}
    p = clab.primary
    sql(p, "CREATE TABLE sc (id int)")
    sql(p, "INSERT INTO sc SELECT generate_series(1, 5000)")
    r, first = backup_cli(cli, clab.config_path, env=env)  # full or incremental: the tests above left backups
    assert r.exit_code == 0, r
    sql(p, "INSERT INTO sc SELECT generate_series(5001, 6000)")
    dropping = config_with(clab, tmp_path, backup={"scratch_cache": "drop", "validation": {"assertions": [
        {"name": "every row, caught up to now", "sql": "SELECT count(*) = 6000 FROM sc"}]}})
    r, res = backup_cli(cli, dropping, env=env)
    assert r.exit_code == 0, r
    v = res["validated"]
    assert v["backup_id"] == first["backup_id"] and v["ok"] and v["scratch_cache"] == "dropped", v
    assert {(c["check"], c["ok"]) for c in v["checks"]} >= {("read_tables", True), ("assertion", True)}, v["checks"]
    r, again = backup_cli(cli, clab.config_path, env=env)
    assert r.exit_code == 0, r
    assert again["validated"]["backup_id"] == res["backup_id"] and again["validated"]["scratch_cache"] == "kept"
