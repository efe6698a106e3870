"""`dbops restore --before-drop` and `dbops wal find --dropped`, against a real lab: tables dropped,
truncated, dropped with their schema, in a second database, dropped twice, and after a failover;
every restore is started and read."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from test_restore import backup, free_port, restore, stop, switch_and_archive

from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.container]

BIG = "(SELECT string_agg(md5(random()::text || g::text), '') FROM generate_series(1, 120) g)"  # TOASTed


def sql(node, statement: str, params: tuple | None = None, db: str | None = None):
    with pgconn.session(node, db, options="-c statement_timeout=30000") as c:
        cur = c.execute(statement, params)
        return cur.fetchall() if cur.description else None


def events(node) -> list[str]:
    return [r[0] for r in sql(node, "SELECT note FROM events ORDER BY id")]


@dataclass
class Drops:
    lab: object
    b1: str
    b2: str
    orders: list[tuple]  # (id, md5 of the TOASTed note) before the drop
    dirs: Path


def wait_replayed(primary, standby, timeout: float = 30) -> None:
    lsn = sql(primary, "SELECT pg_current_wal_lsn()")[0][0]
    deadline = time.monotonic() + timeout
    while sql(standby, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))[0][0] is not True:
        assert time.monotonic() < deadline, "the standby did not catch up"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def drops(lab_factory) -> Drops:
    lab = lab_factory.create("before-drop", replicas=1)
    p = lab.primary
    sql(p, "CREATE TABLE events (id serial PRIMARY KEY, note text)")
    sql(p, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    sql(p, f"INSERT INTO orders SELECT i, {BIG} FROM generate_series(1, 20) i")
    sql(p, "CREATE TABLE invoices (id int, note text)")
    sql(p, "INSERT INTO invoices SELECT i, 'invoice ' || i FROM generate_series(1, 5) i")
    sql(p, "CREATE SCHEMA sales")
    sql(p, "CREATE TABLE sales.leads (id int)")
    sql(p, "INSERT INTO sales.leads VALUES (1), (2)")
    sql(p, "CREATE TABLE churn (id int, note text)")
    sql(p, "INSERT INTO churn VALUES (1, 'first life')")
    sql(p, "CREATE TABLE late (id int, note text)")
    sql(p, "INSERT INTO late VALUES (1, 'on timeline 1')")
    sql(p, "CREATE DATABASE shop")
    sql(p, "CREATE TABLE items (id int)", db="shop")
    sql(p, "INSERT INTO items VALUES (7)", db="shop")
    orders = sql(p, "SELECT id, md5(note) FROM orders ORDER BY id")
    assert sql(p, "SELECT reltoastrelid <> 0 FROM pg_class WHERE relname = 'orders'")[0][0]
    switch_and_archive(lab)
    b1 = backup(lab)

    sql(p, "INSERT INTO events (note) VALUES ('e1')")
    sql(p, "DROP TABLE churn")
    sql(p, "CREATE TABLE churn (id int, note text)")
    sql(p, "INSERT INTO churn VALUES (2, 'second life'), (3, 'second life')")
    sql(p, "INSERT INTO events (note) VALUES ('e2')")
    sql(p, "TRUNCATE invoices")
    sql(p, "INSERT INTO events (note) VALUES ('e3')")
    sql(p, "DROP SCHEMA sales CASCADE")
    sql(p, "DROP TABLE items", db="shop")
    sql(p, "INSERT INTO events (note) VALUES ('e4')")
    sql(p, "VACUUM FULL orders")  # a rewrite swaps files too: followed, never a finding
    sql(p, "DROP TABLE orders")
    sql(p, "INSERT INTO events (note) VALUES ('e5 after the drop')")
    switch_and_archive(lab)
    b2 = backup(lab)  # knows the second churn
    sql(p, "DROP TABLE churn")
    sql(p, "INSERT INTO events (note) VALUES ('e6')")
    switch_and_archive(lab)

    new = lab.replicas[0]  # a failover: the next drop happens on timeline 2
    wait_replayed(p, new)
    stop(Path(p.data_dir))
    assert sql(new, "SELECT pg_promote(true, 60)")[0][0] is True
    sql(new, "INSERT INTO late VALUES (2, 'on timeline 2')")
    sql(new, "DROP TABLE late")
    sql(new, "INSERT INTO events (note) VALUES ('e7 after the drop on timeline 2')")
    switch_and_archive(lab, new)
    dirs = lab.dir / "restores"
    dirs.mkdir(exist_ok=True)
    return Drops(lab, b1, b2, orders, dirs)


def find(cli, lab, *tables: str):
    args = ["-c", lab.config_path, "wal", "find", "--json"]
    for t in tables:
        args += ["--dropped", t]
    return cli(args)


def started(lab, port: int):
    return replace(lab.primary, name="restored", port=port)


# --------------------------------------------------------------------------- finding


def test_wal_find_names_each_kind_of_drop(drops, cli):
    r = find(cli, drops.lab, "orders", "invoices", "sales.leads", "shop.items", "churn", "late")
    assert r.exit_code == 0, r
    by = {s["table"]: s for s in json.loads(r.stdout)["searches"]}
    assert set(by) == {"postgres.public.orders", "postgres.public.invoices", "postgres.sales.leads",
                       "shop.public.items", "postgres.public.churn", "postgres.public.late"}
    kinds = {t: [f["kind"] for f in s["findings"]] for t, s in by.items()}
    assert kinds == {"postgres.public.orders": ["drop"], "postgres.public.invoices": ["truncate"],
                     "postgres.sales.leads": ["drop"], "shop.public.items": ["drop"],
                     "postgres.public.churn": ["drop", "drop"], "postgres.public.late": ["drop"]}
    assert by["postgres.public.late"]["findings"][0]["timeline"] == 2
    assert by["postgres.public.churn"]["backups"] == [drops.b1, drops.b2]
    orders = by["postgres.public.orders"]
    assert orders["findings"][0]["also_dropped"] == []  # its index and TOAST are its own
    assert orders["searched"]["segments"] >= 2 and orders["searched"]["first_segment"].startswith("00000001")
    commits = [f["commit_lsn"] for s in by.values() for f in s["findings"]]
    assert len(set(commits)) == len(commits)

    text = cli(["-c", drops.lab.config_path, "wal", "find", "--dropped", "churn"])
    assert text.exit_code == 0 and "2 drop(s) or truncate(s) found" in text.stdout, text


# --------------------------------------------------------------------------- restoring


def restore_before(cli, drops, name: str, *extra: str):
    port, target = free_port(), drops.dirs / name.replace(".", "-") / "x".join(extra).replace("-", "")
    r = restore(cli, drops.lab, "--before-drop", name, *extra, "--target-dir", target, "--start", "--port", port,
                "--json")
    assert r.exit_code == 0, r
    return json.loads(r.stdout), started(drops.lab, port), target


def test_before_drop_brings_back_every_row_with_toast_and_index_and_nothing_later(drops, cli):
    d, node, target = restore_before(cli, drops, "orders")
    try:
        f = d["before_drop"]["stop_before"]
        assert f["kind"] == "drop" and f["table"] == "postgres.public.orders"
        assert d["backup_id"] == drops.b1  # b2 is consistent after the drop
        assert sql(node, "SELECT id, md5(note) FROM orders ORDER BY id") == drops.orders
        assert sql(node, "SELECT count(*) FROM pg_indexes WHERE tablename = 'orders'")[0][0] == 1
        assert events(node) == ["e1", "e2", "e3", "e4"]  # every write before, none after
    finally:
        stop(target)


def test_before_truncate_brings_back_the_rows(drops, cli):
    d, node, target = restore_before(cli, drops, "public.invoices")
    try:
        assert d["before_drop"]["stop_before"]["kind"] == "truncate"
        assert sql(node, "SELECT count(*) FROM invoices")[0][0] == 5
        assert events(node) == ["e1", "e2"]
    finally:
        stop(target)


def test_occurrence_picks_the_drop_latest_by_default(drops, cli):
    d, node, target = restore_before(cli, drops, "churn")
    try:
        assert d["before_drop"]["stop_before"]["occurrence"] == 2
        # b1 (validated) and b2 (stored) both fit: the newest is restored, the validated one is its fallback
        assert d["backup_id"] == drops.b2 and d["plan"]["fallback"]["backup_id"] == drops.b1
        assert [r[0] for r in sql(node, "SELECT note FROM churn ORDER BY id")] == ["second life", "second life"]
        assert events(node)[-1] == "e5 after the drop"
    finally:
        stop(target)
    d, node, target = restore_before(cli, drops, "churn", "--occurrence", "1")
    try:
        assert d["before_drop"]["stop_before"]["occurrence"] == 1 and d["backup_id"] == drops.b1
        assert sql(node, "SELECT note FROM churn")[0][0] == "first life"
        assert events(node) == ["e1"]
    finally:
        stop(target)


def test_drop_after_a_failover_is_undone_on_the_new_timeline(drops, cli):
    d, node, target = restore_before(cli, drops, "late")
    try:
        assert d["before_drop"]["stop_before"]["timeline"] == 2
        assert [r[0] for r in sql(node, "SELECT note FROM late ORDER BY id")] == ["on timeline 1", "on timeline 2"]
        assert "e7 after the drop on timeline 2" not in events(node)
    finally:
        stop(target)


@pytest.mark.parametrize("name,kind", [("sales.leads", "drop"), ("shop.items", "drop")])
def test_dry_run_shows_the_transaction_for_a_schema_drop_and_a_second_database(drops, cli, name, kind):
    r = restore(cli, drops.lab, "--before-drop", name, "--target-dir", drops.dirs / "dry", "--dry-run", "--json")
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    f = d["before_drop"]["stop_before"]
    assert f["kind"] == kind and d["target"]["kind"] == "xid" and d["target"]["value"] == str(f["xid"])
    assert d["target"]["inclusive"] is False and d["backup"]["backup_id"] == drops.b1
    assert not (drops.dirs / "dry").exists()


# --------------------------------------------------------------------------- errors


def test_unknown_table_exit_9_names_the_newest_backup(drops, cli):
    r = find(cli, drops.lab, "no_such_table")
    assert r.exit_code == 9 and "no backup knows a table no_such_table" in r.stderr, r
    assert f"the newest {drops.b2}" in r.stderr
    shown = cli(["-c", drops.lab.config_path, "backup", "show", drops.b1, "--relations", "--json"])
    assert shown.exit_code == 0, shown
    known = {t["table"] for t in json.loads(shown.stdout)["relations"]}
    assert {"postgres.public.orders", "shop.public.items", "postgres.sales.leads"} <= known
    assert not any(".pg_catalog." in t for t in known)


def test_no_drop_found_exit_9_states_the_range(drops, cli):
    r = restore(cli, drops.lab, "--before-drop", "events", "--target-dir", drops.dirs / "none")
    assert r.exit_code == 9 and "no DROP or TRUNCATE of postgres.public.events" in r.stderr, r
    assert "searched" in r.stderr and ".." in r.stderr
    assert not (drops.dirs / "none").exists()


def test_bad_name_and_stray_occurrence_exit_2(drops, cli):
    assert find(cli, drops.lab, "a.b.c.d").exit_code == 2
    r = restore(cli, drops.lab, "--to", "latest", "--occurrence", "1", "--target-dir", drops.dirs / "x")
    assert r.exit_code == 2 and "--occurrence goes with --before-drop" in r.stderr


def test_missing_segment_exit_7_names_it(drops, cli):
    lab = drops.lab
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    find_all = json.loads(find(cli, lab, "orders").stdout)["searches"][0]["searched"]
    first = find_all["first_segment"]
    name = first[:16] + f"{int(first[16:], 16) + 1:08X}"
    key = layout.wal_key(name)
    saved = store.get(key)
    meta = store.head(key).metadata
    store.delete(key)
    try:
        r = find(cli, lab, "orders")
        assert r.exit_code == 7 and name in r.stderr, r
    finally:
        store.put(key, saved, metadata=meta)
