"""Tablespaces end to end against a real lab (PostgreSQL 15, SeaweedFS, podman): a validated chain
over two tablespaces (one created, one dropped between backups) that never touches the live
tablespace folders, a PITR restore on the primary's own host with --tablespace-map compared row
for row, a refused restore onto live locations, a damaged tablespace object detected and healed."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from dbops import proc
from dbops.lab.harness import free_port
from dbops.pg import conn as pgconn
from dbops.repo import manifest as mf
from dbops.storage import open_store
from dbops.storage.layout import Layout

from labkit import backup_cli, make_cli, restore, sql, stop, switch_and_archive

pytestmark = [pytest.mark.integration, pytest.mark.container]


def live_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(mtime, ctime) of the folder and everything in it: a write, a chmod or a new entry changes it."""
    out = {".": (folder.stat().st_mtime_ns, folder.stat().st_ctime_ns)}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = Path(root) / n
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_mtime_ns, st.st_ctime_ns)
    return out


class TsLab:
    def __init__(self, lab, cli):
        self.lab, self.cli = lab, cli
        self.live = lab.dir / "live"
        self.env = {"DBOPS_LOCK_DIR": str(lab.dir / "run")}

    def backup(self):
        return backup_cli(self.cli, self.lab.config_path, env=self.env)

    def manifest(self, backup_id: str) -> mf.Manifest:
        return mf.load(open_store(self.lab.config.storage), Layout(self.lab.config.storage.prefix), backup_id)

    def quiet_live_state(self) -> dict:
        sql(self.lab.primary, "CHECKPOINT")
        return live_state(self.live)

    def restore(self, *args):
        return restore(self.cli, self.lab, *args, env=self.env)


@pytest.fixture(scope="module")
def ts(lab_factory) -> TsLab:
    lab = lab_factory.create("tblspc", replicas=0)
    t = TsLab(lab, make_cli())  # module scope: the cli fixture is per test
    for name in ("one", "two"):
        (t.live / name).mkdir(parents=True, mode=0o700)
        proc.run(["chown", "postgres:postgres", str(t.live / name)])
    os.chmod(t.live, 0o755)
    return t


def rows_of(node, table: str) -> list[tuple]:
    return [tuple(r) for r in sql(node, f"SELECT * FROM {table} ORDER BY 1")]


def tables_in(node) -> dict[str, list[tuple]]:
    return {t: rows_of(node, t) for t in ("a", "b", "m")}


def test_chain_over_two_tablespaces_never_touches_the_live_folders(ts):
    p = ts.lab.primary
    sql(p, f"CREATE TABLESPACE one LOCATION '{ts.live / 'one'}'")
    sql(p, "CREATE TABLE a (id int PRIMARY KEY, note text) WITH (autovacuum_enabled = off) TABLESPACE one")
    sql(p, "INSERT INTO a SELECT g, md5(g::text) FROM generate_series(1, 3000) g")
    sql(p, "CREATE TABLE m (id int, note text) WITH (autovacuum_enabled = off)")
    sql(p, "INSERT INTO m SELECT g, 'm' || g FROM generate_series(1, 2000) g")
    sql(p, "CREATE INDEX m_note ON m (note) TABLESPACE one")
    r1, b1 = ts.backup()
    assert r1.exit_code == 0, r1
    assert "copy" in b1["timings"], b1["timings"]  # the data folder and the tablespace's copied here
    m1 = ts.manifest(b1["backup_id"])
    oid_one = sql(p, "SELECT oid FROM pg_tablespace WHERE spcname = 'one'")[0][0]
    assert [(t.oid, t.name, t.location) for t in m1.tablespaces] == [(oid_one, "one", str(ts.live / "one"))]
    assert sum(f.size for f in m1.files if f.path.startswith(f"pg_tblspc/{oid_one}/")) > 100_000

    # Between the backups: a second tablespace is created (its CREATE is replayed by the next validation).
    sql(p, f"CREATE TABLESPACE two LOCATION '{ts.live / 'two'}'")
    sql(p, "CREATE TABLE b (id int PRIMARY KEY, note text) WITH (autovacuum_enabled = off) TABLESPACE two")
    sql(p, "INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 2000) g")
    sql(p, "INSERT INTO a SELECT g, 'later' FROM generate_series(3001, 3500) g")
    before = ts.quiet_live_state()
    r2, b2 = ts.backup()
    assert r2.exit_code == 0, r2
    assert b2["validated"]["backup_id"] == b1["backup_id"] and b2["validated"]["ok"]
    assert ts.quiet_live_state() == before, "the validation instance touched a live tablespace folder"
    m2 = ts.manifest(b2["backup_id"])
    assert sorted((t.name, t.location) for t in m2.tablespaces) == [("one", str(ts.live / "one")),
                                                                    ("two", str(ts.live / "two"))]

    shown = json.loads(ts.cli(["-c", ts.lab.config_path, "backup", "show", b2["backup_id"], "--json"]).stdout)
    assert {t["name"]: t["size"] > 0 for t in shown["tablespaces"]} == {"one": True, "two": True}
    r = ts.cli(["-c", ts.lab.config_path, "check", "--skip-runtime", "--json"], env=ts.env)
    covered = {t["name"]: t["in_newest_backup"] for t in json.loads(r.stdout)["tablespaces"]}
    assert covered == {"one": True, "two": True}


def test_pitr_restore_on_the_primarys_host_with_a_map_row_for_row(ts):
    p = ts.lab.primary
    sql(p, "INSERT INTO b SELECT g, 'before the target' FROM generate_series(5001, 5100) g")
    expected = tables_in(p)
    lsn = sql(p, "SELECT pg_current_wal_insert_lsn()::text")[0][0]
    sql(p, "INSERT INTO b SELECT g, 'after the target' FROM generate_series(6001, 6100) g")
    sql(p, "DELETE FROM a WHERE id < 100")
    switch_and_archive(ts.lab)
    before = ts.quiet_live_state()
    target, maps = ts.lab.dir / "restored", ts.lab.dir / "restored-ts"
    port = free_port()
    # The older, validated backup, named: it holds tablespace one only; two is created by the WAL
    # replayed after it, so --tablespace-map-all puts it in DIR/<OID> (its name is not known yet).
    # (Left to choose, a restore takes the newest backup, which holds both: see the dry run below.)
    listed = json.loads(ts.cli(["-c", ts.lab.config_path, "backup", "list", "--json"]).stdout)
    first = listed[0]["backup_id"]
    assert listed[0]["status"] == "validated" and len(listed) == 2, listed
    r = ts.restore("--to-lsn", lsn, "--target-dir", target, "--tablespace-map", f"one={maps / 'first'}",
                   "--tablespace-map-all", maps, "--backup", first, "--start", "--port", port, "--json")
    assert r.exit_code == 0, r
    try:
        d = json.loads(r.stdout)
        assert d["backup_id"] == first and d["plan"]["fallback"] is None
        where = {t["name"]: (t["folder"], t["how"]) for t in d["plan"]["tablespaces"]}
        assert where == {"one": (str(maps / "first"), "mapped")}
        oid_two = sql(p, "SELECT oid FROM pg_tablespace WHERE spcname = 'two'")[0][0]
        node = replace(p, name="restored", port=port)
        assert tables_in(node) == expected
        locs = dict(sql(node, "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace WHERE oid > 16000"))
        assert locs == {"one": str(maps / "first"), "two": str(maps / str(oid_two))}
        # the index in tablespace one answers
        with pgconn.session(node) as c:
            c.execute("SET enable_seqscan = off")
            plan = "\n".join(r[0] for r in c.execute("EXPLAIN SELECT count(*) FROM m WHERE note = 'm77'"))
            assert "m_note" in plan and c.execute("SELECT count(*) FROM m WHERE note = 'm77'").fetchone()[0] == 1
    finally:
        stop(target)
    assert ts.quiet_live_state() == before


def test_restore_without_a_map_onto_live_locations_is_refused_and_writes_nothing(ts):
    before = ts.quiet_live_state()
    target = ts.lab.dir / "refused"
    r = ts.restore("--to", "latest", "--target-dir", target)
    assert r.exit_code == 11, r
    assert "tablespace one" in r.stderr and "--tablespace-map" in r.stderr and "PostgreSQL pid" in r.stderr
    assert not target.exists()
    assert ts.quiet_live_state() == before
    # The dry run lists each tablespace and where it would go.
    r = ts.restore("--to", "latest", "--target-dir", target, "--tablespace-map-all", ts.lab.dir / "elsewhere",
                   "--dry-run")
    assert r.exit_code == 0, r
    # (the newest backup is chosen, stored, with the validated one as its fallback: it has both tablespaces)
    assert f"tblspc    one (OID " in r.stdout and f"-> {ts.lab.dir / 'elsewhere/one'} (--tablespace-map-all, absent)" \
        in r.stdout, r
    assert f"-> {ts.lab.dir / 'elsewhere/two'} (--tablespace-map-all, absent)" in r.stdout, r
    assert "(stored)" in r.stdout and "fallback  " in r.stdout, r
    assert not target.exists() and not (ts.lab.dir / "elsewhere").exists()


def test_drop_tablespace_between_backups_then_a_damaged_tablespace_object_heals(ts):
    p = ts.lab.primary
    sql(p, "DROP TABLE a")
    sql(p, "DROP INDEX m_note")
    sql(p, "DROP TABLESPACE one")
    sql(p, "INSERT INTO b SELECT g, 'after the drop' FROM generate_series(7001, 7100) g")
    before = ts.quiet_live_state()
    r3, b3 = ts.backup()  # validates the backup with both tablespaces, replaying the DROP
    assert r3.exit_code == 0, r3
    assert b3["validated"]["ok"]
    assert ts.quiet_live_state() == before
    m3 = ts.manifest(b3["backup_id"])
    assert [t.name for t in m3.tablespaces] == ["two"]
    oid_two = m3.tablespaces[0].oid
    assert not any(f.path.startswith("pg_tblspc/") and not f.path.startswith(f"pg_tblspc/{oid_two}")
                   for f in m3.files)

    # Damage the stored frame of a file inside tablespace two.
    store, layout = open_store(ts.lab.config.storage), Layout(ts.lab.config.storage.prefix)
    f = next(f for f in m3.files if f.path.startswith(f"pg_tblspc/{oid_two}/") and f.size > 8192
             and any(c.pack for c in f.chunks))
    c = next(c for c in f.chunks if c.pack)
    key = layout.pack(c.pack)
    data = bytearray(store.get(key))
    data[c.offset + c.length // 2] ^= 0xFF
    store.put(key, bytes(data))
    sql(p, "INSERT INTO b SELECT g, 'after the damage' FROM generate_series(8001, 8100) g")
    r4, _ = ts.backup()
    assert r4.exit_code == 7, r4
    assert b3["backup_id"] in r4.stderr and "healed" in r4.stderr and f.path in r4.stderr
    rows = json.loads(ts.cli(["-c", ts.lab.config_path, "backup", "list", "--json"]).stdout)
    assert rows[-2]["backup_id"] == b3["backup_id"] and rows[-2]["status"] == "failed"
    healed = ts.manifest(rows[-1]["backup_id"])
    assert healed.meta["kind"] == "full" and [t.name for t in healed.tablespaces] == ["two"]
    assert c.pack not in healed.packs()


def test_failover_then_a_backup_across_the_timeline_with_a_tablespace(lab_factory):
    lab = lab_factory.create("tblspc-failover", replicas=0)
    t = TsLab(lab, make_cli())  # module scope: the cli fixture is per test
    (t.live / "ts").mkdir(parents=True, mode=0o700)
    proc.run(["chown", "postgres:postgres", str(t.live / "ts")])
    os.chmod(t.live, 0o755)
    p = lab.primary
    sql(p, f"CREATE TABLESPACE ts LOCATION '{t.live / 'ts'}'")
    sql(p, "CREATE TABLE orders (id int PRIMARY KEY, note text) TABLESPACE ts")
    sql(p, "INSERT INTO orders SELECT g, 'timeline 1' FROM generate_series(1, 1000) g")
    r1, b1 = t.backup()
    assert r1.exit_code == 0, r1
    # A replica on the same host keeps the tablespace in its own folder (the lab maps it).
    lab = t.lab = lab_factory.create("tblspc-failover", replicas=1)
    replica_loc = sql(lab.replicas[0], "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts'")
    assert replica_loc[0][0] != str(t.live / "ts")
    r = t.cli(["-c", lab.config_path, "failover", "--to", "pg2", "--yes"], env=t.env)
    assert r.exit_code == 0, r
    new = lab.replicas[0]
    assert sql(new, "SELECT pg_is_in_recovery()")[0][0] is False
    sql(new, "INSERT INTO orders SELECT g, 'timeline 2' FROM generate_series(1001, 1500) g")
    r2, b2 = t.backup()
    assert r2.exit_code == 0, r2
    assert b2["validated"]["backup_id"] == b1["backup_id"] and b2["validated"]["ok"] and b2["timeline"] == 2
    m2 = t.manifest(b2["backup_id"])
    assert [(x.name, x.location) for x in m2.tablespaces] == [("ts", replica_loc[0][0])]


def test_local_runtime_replays_create_tablespace_in_a_private_mount_namespace(lab_factory):
    """runtime.engine none: the throwaway server is a local process; the CREATE TABLESPACE it replays
    gets a scratch folder bind-mounted over the live location in a private mount namespace."""
    import dataclasses

    from dbops.ops.backup.run import run_backup

    lab = lab_factory.create("tblspc-local", replicas=0)
    cfg = dataclasses.replace(lab.config, runtime=dataclasses.replace(lab.config.runtime, engine="none"))
    live = lab.dir / "live" / "loc"
    live.mkdir(parents=True, mode=0o700)
    proc.run(["chown", "postgres:postgres", str(live)])
    os.chmod(lab.dir / "live", 0o755)
    os.environ["DBOPS_LOCK_DIR"] = str(lab.dir / "run")
    try:
        b1 = run_backup(cfg)
        sql(lab.primary, f"CREATE TABLESPACE loc LOCATION '{live}'")
        sql(lab.primary, "CREATE TABLE t (id int PRIMARY KEY) WITH (autovacuum_enabled = off) TABLESPACE loc")
        sql(lab.primary, "INSERT INTO t SELECT generate_series(1, 500)")
        sql(lab.primary, "CHECKPOINT")
        before = live_state(live)
        b2 = run_backup(cfg)  # validates b1, replaying the CREATE
        assert b2.validated is not None and b2.validated.ok and b2.parent_id == b1.backup_id
        assert live_state(live) == before
        assert [(t.name, t.location) for t in b2.manifest.tablespaces] == [("loc", str(live))]
        b3 = run_backup(cfg)  # validates b2: the tablespace restored from storage into scratch
        assert b3.validated is not None and b3.validated.ok
        assert live_state(live) == before
    finally:
        os.environ.pop("DBOPS_LOCK_DIR", None)
