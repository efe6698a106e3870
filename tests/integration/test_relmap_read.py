"""The relation map read from a real server as a stream (dbops.pg.relmap.write): every kind of
relation gets its table and parent, temporary and system relations are left out, and the stored form
is what the bucket's reader parses. Checked against the whole-catalog algorithm the map was first
built with (kept here as the reference)."""

from __future__ import annotations

import io
import json

import pytest

from dbops.pg import conn as pgconn
from dbops.pg import relmap as reader
from dbops.repo import relmap

pytestmark = [pytest.mark.integration]

DB = "relmap_stream"


def reference(node, dbname: str) -> list[dict]:
    """The map of one database as the first version built it: every catalog row in Python."""
    q = """SELECT c.oid, n.nspname, c.relname, c.relkind, COALESCE(pg_relation_filenode(c.oid), 0),
                  CASE WHEN c.reltablespace = 0 THEN (SELECT dattablespace FROM pg_database
                                                      WHERE datname = current_database())
                       ELSE c.reltablespace END, c.reltoastrelid
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p', 'm', 't', 'i', 'I', 'S') AND c.relpersistence IN ('p', 'u')"""
    with pgconn.session(node, dbname) as c:
        rels = pgconn.rows(c, q)
        index_of = dict(pgconn.rows(c, "SELECT indexrelid, indrelid FROM pg_index"))
        parent_of = dict(pgconn.rows(c, "SELECT inhrelid, inhparent FROM pg_inherits WHERE inhseqno = 1"))
    by_oid = {r[0]: r for r in rels}
    toast_owner = {r[6]: r[0] for r in rels if r[6]}

    def owner(oid: int, depth: int = 0) -> int:
        if depth > 3:
            return oid
        if oid in index_of:
            return owner(index_of[oid], depth + 1)
        if oid in toast_owner:
            return owner(toast_owner[oid], depth + 1)
        return oid

    out = []
    for oid, schema, name, kind, node_, spc, _toast in rels:
        table_oid = owner(oid)
        t = by_oid.get(table_oid)
        if t is None or t[1] in reader.SYSTEM_SCHEMAS or (t[1] == "pg_toast" and table_oid == oid):
            continue
        parent = by_oid.get(parent_of.get(table_oid, 0))
        out.append({"oid": oid, "schema": schema, "name": name, "kind": kind, "node": int(node_), "spc": int(spc),
                    "table": f"{t[1]}.{t[2]}", "table_oid": table_oid,
                    "parent": f"{parent[1]}.{parent[2]}" if parent and table_oid == oid else None,
                    "parent_oid": parent[0] if parent and table_oid == oid else None})
    return out


@pytest.fixture(scope="module")
def node(lab):
    p = lab.primary
    with pgconn.session(p) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    with pgconn.session(p, DB) as c:
        for stmt in (
            "CREATE TABLE orders (id int PRIMARY KEY, note text)",  # TOAST table and its index
            "CREATE INDEX orders_note ON orders (note)",
            "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY)",
            'CREATE SCHEMA "Sales.2026"',
            'CREATE TABLE "Sales.2026"."Leads" (id int, "Note" text)',
            "CREATE TABLE measures (at date, v int) PARTITION BY RANGE (at)",
            "CREATE INDEX measures_at ON measures (at)",  # partitioned index ('I') and one per partition
            "CREATE TABLE m1 PARTITION OF measures FOR VALUES FROM ('2026-01-01') TO ('2026-02-01')",
            "CREATE TABLE m2 PARTITION OF measures FOR VALUES FROM ('2026-02-01') TO ('2026-03-01') "
            "PARTITION BY RANGE (v)",
            "CREATE TABLE m2a PARTITION OF m2 FOR VALUES FROM (0) TO (10)",
            "CREATE TABLE base_t (id int)",
            "CREATE TABLE other_t (x int)",
            "CREATE TABLE child_t (extra text) INHERITS (base_t, other_t)",  # two parents: the first is named
            "CREATE MATERIALIZED VIEW mv AS SELECT id FROM orders",
            "CREATE SEQUENCE seq1",
            "CREATE VIEW v AS SELECT 1 AS one",  # no storage: not in the map
            'CREATE SCHEMA a', 'CREATE SCHEMA "a.b"',  # two tables whose unquoted names are both a.b.c
            'CREATE TABLE a."b.c" (id int PRIMARY KEY)', 'CREATE TABLE "a.b".c (id int PRIMARY KEY, note text)',
        ):
            c.execute(stmt)
    yield p
    with pgconn.session(p) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def streamed(node) -> dict:
    """The map as written, in format 1's shape (a document with every database's relations)."""
    out = io.BytesIO()
    reader.write(lambda _name: node, node, out)
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0]) == {"format": 2}
    doc: dict = {"databases": []}
    for line in lines[1:]:
        item = json.loads(line)
        if isinstance(item, dict):
            doc["databases"].append({**item["database"], "relations": []})
        else:
            assert 0 < len(item) <= reader.BATCH
            doc["databases"][-1]["relations"].extend(item)
    return doc


def test_the_streamed_map_is_the_whole_catalog_algorithms(node):
    # A temporary table (and its TOAST table and index) of a live session is left out.
    with pgconn.session(node, DB) as other:
        other.execute("CREATE TEMP TABLE tmp_t (id int PRIMARY KEY, note text)")
        doc = streamed(node)
        want = reference(node, DB)
    db = next(d for d in doc["databases"] if d["name"] == DB)
    got = sorted(db["relations"], key=lambda r: r["oid"])
    assert got == sorted(want, key=lambda r: r["oid"])
    by_name = {r["name"]: r for r in got}
    assert "tmp_t" not in by_name and "v" not in by_name
    assert not any(r["table"].startswith("pg_catalog.") for r in got)
    toast = [r for r in got if r["schema"] == "pg_toast" and r["table"] == "public.orders"]
    assert {r["kind"] for r in toast} == {"t", "i"}  # orders' TOAST table and its index
    assert by_name["orders_note"]["table"] == "public.orders" and by_name["orders_note"]["kind"] == "i"
    assert by_name["m1"]["parent"] == "public.measures" and by_name["m2a"]["parent"] == "public.m2"
    assert by_name["measures_at"]["kind"] == "I" and by_name["measures"]["node"] == 0
    assert by_name["child_t"]["parent"] == "public.base_t"
    assert by_name["Leads"]["table"] == "Sales.2026.Leads"
    assert by_name["scratch"]["kind"] == "r" and by_name["seq1"]["kind"] == "S" and by_name["mv"]["kind"] == "m"
    assert len(got) >= 20


def test_the_stored_form_reads_back(node, monkeypatch):
    monkeypatch.setattr(reader, "BATCH", 7)  # several lines per database
    m = relmap.StoredMap("b1", "k", relmap.encode(lambda out: reader.write(lambda _name: node, node, out)))
    whole = m.whole()
    assert {r.qualified for r in whole.relations} >= {f"{DB}.public.orders", f"{DB}.public.m2a"}
    for name in (f"{DB}.public.orders", f"{DB}.public.measures", "m2"):
        assert relmap.files_of([m.about([name])], name) == relmap.files_of([whole], name)
    tables, heap, files = relmap.files_of([whole], f"{DB}.public.orders")
    assert [t.qualified for t in tables] == [f"{DB}.public.orders"]
    assert len(heap) == 1 and len(files) == 5  # heap, pkey, note index, TOAST table, TOAST index
    tables, heap, _ = relmap.files_of([whole], f"{DB}.public.measures")
    assert len(heap) == 2  # m1 and m2a hold its data
    # Linked by OID: a."b.c" and "a.b".c, both "a.b.c" unquoted, each keeps its own files.
    for name, parts in ((f'{DB}.a."b.c"', 2), (f'{DB}."a.b".c', 4)):  # + pkey; + pkey, TOAST and its index
        tables, heap, files = relmap.files_of([m.about([name])], name)
        assert len(tables) == 1 and len(heap) == 1 and len(files) == parts
        assert (tables, heap, files) == relmap.files_of([whole], name)
    assert sorted(n for t, n in m.tables_and_parts() if t.qualified == f"{DB}.a.b.c") == [1, 3]
