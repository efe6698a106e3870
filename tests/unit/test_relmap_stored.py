"""A relation map as stored in the bucket (untrusted): format 2 read a line at a time, format 1 (the
previous one) still read, damage refused, and the part of a map a search keeps."""

from __future__ import annotations

import json

import pytest
import zstandard

from dbops.errors import ValidationError
from dbops.pg.waldrops import FileId
from dbops.repo import relmap


def rel(oid, name, kind="r", table=None, parent=None, node=None, schema="public"):
    return {"kind": kind, "name": name, "node": oid if node is None else node, "oid": oid, "parent": parent,
            "schema": schema, "spc": 1663, "table": table or f"{schema}.{name}", "table_oid": oid}


APP = [rel(16384, "orders"), rel(16390, "orders_pkey", "i", "public.orders"),
       rel(16391, "pg_toast_16384", "t", "public.orders", schema="pg_toast"),
       rel(16399, "measures", "p", node=0), rel(16400, "m1", parent="public.measures"),
       rel(16401, "m2", "p", parent="public.measures", node=0), rel(16402, "m2a", parent="public.m2"),
       rel(16403, "m2a_idx", "i", "public.m2a"), rel(16500, "invoices")]
SHOP = [rel(16384, "orders"), rel(17000, "items")]


def v2(dbs=(("app", 5, APP), ("shop", 6, SHOP)), per_line=2) -> bytes:
    lines = [b'{"format":2}']
    for name, oid, rels in dbs:
        lines.append(json.dumps({"database": {"name": name, "oid": oid, "spc": 1663}}).encode())
        for i in range(0, len(rels), per_line):
            lines.append(json.dumps(rels[i:i + per_line]).encode())
    return zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")


def v1() -> bytes:
    doc = {"format": 1, "databases": [{"name": "app", "oid": 5, "spc": 1663, "relations": APP},
                                      {"name": "shop", "oid": 6, "spc": 1663, "relations": SHOP}]}
    return zstandard.ZstdCompressor().compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())


def stored(blob: bytes) -> relmap.StoredMap:
    return relmap.StoredMap("b1", "backups/b1/relmap.json.zst", blob)


def test_format_2_reads_what_format_1_read():
    new, old = stored(v2()).whole(), stored(v1()).whole()
    assert new.relations == old.relations and len(new.relations) == len(APP) + len(SHOP)
    assert new.databases == old.databases == {"app": (5, 1663), "shop": (6, 1663)}
    assert new.relations[0] == relmap.Relation("app", 5, "public", "orders", 16384, "r", FileId(1663, 5, 16384),
                                               "public.orders", None)


def test_the_writers_encoding_reads_back():
    def produce(out):
        out.write(b'{"format":2}\n{"database":{"name":"app","oid":5,"spc":1663}}\n')
        out.write(json.dumps(APP).encode() + b"\n")

    assert stored(relmap.encode(produce)).whole().relations == stored(v2()).whole().relations[:len(APP)]


@pytest.mark.parametrize("name", ["orders", "app.orders", "public.measures", "shop.public.orders", "m2", "nothing"])
def test_the_part_a_search_keeps_answers_as_the_whole_map(name):
    m = stored(v2(per_line=3))
    whole, part = m.whole(), m.about([name])
    assert relmap.files_of([part], name) == relmap.files_of([whole], name)
    assert [t.qualified for t in relmap.find_table(part, name)] == [t.qualified for t in relmap.find_table(whole, name)]
    assert len(part.relations) < len(whole.relations)


def test_a_partitioned_tables_part_holds_its_partitions_files():
    tables, heap, files = relmap.files_of([stored(v2()).about(["app.measures"])], "app.measures")
    assert heap == {FileId(1663, 5, 16400), FileId(1663, 5, 16402)}  # m1 and m2a hold its data
    assert FileId(1663, 5, 16403) in files and FileId(1663, 5, 16500) not in files


@pytest.mark.parametrize("blob", [
    b'{"format":3}\n',
    b'{"format":2}\n[{"kind":"r"}]\n',  # relations before any database
    b'{"format":2}\n{"database":{"name":"a","oid":-1,"spc":1663}}\n',
    b'{"format":2}\n{"database":{"name":"a","oid":5,"spc":1663}}\n[{"kind":"x","name":"t","node":1,"oid":1,'
    b'"schema":"s","spc":1,"table":"s.t"}]\n',
    b'{"format":2}\n{"database":{"name":"a","oid":5,"spc":1663}}\n"text"\n',
    b'{"format":2}\n{"database":{"name":"a","oid":5,"spc":1663}}\n[1]\n',
    b'{"format":2}\n' + b"[" * 100 + b"\n",
    b'{"databases":[{"name":"a"}],"format":1}',
    b"not json",
])
def test_a_damaged_map_is_refused_as_damaged(blob):
    with pytest.raises(ValidationError, match="relation map of backup b1 is damaged"):
        stored(zstandard.ZstdCompressor().compress(blob)).whole()


def test_not_zstd_and_too_long_a_line_are_refused(monkeypatch):
    with pytest.raises(ValidationError, match="damaged"):
        stored(b"\x28\xb5\x2f\xfd garbage").whole()
    monkeypatch.setattr(relmap, "MAX_LINE", 1000)
    monkeypatch.setattr(relmap, "READ", 100)
    with pytest.raises(ValidationError, match="damaged") as e:
        stored(v2(per_line=50)).whole()
    assert "longer than 1000" in e.value.detail
    monkeypatch.setattr(relmap, "MAX_BYTES", 500)
    with pytest.raises(ValidationError, match="damaged") as e:
        stored(v1()).whole()
    assert "larger than 500" in e.value.detail


def test_parts_counted_in_one_pass_are_the_whole_maps():
    m = stored(v2())
    whole = m.whole()
    counted = {t.qualified: n for t, n in m.tables_and_parts()}
    assert counted == {t.qualified: len(whole.parts_of(t)) - 1 for t in whole.tables()}
    assert counted["app.public.measures"] == 4 and counted["app.public.orders"] == 2  # m1, m2, m2a, m2a_idx


def test_other_tables_dropped_with_it_are_named_after_the_scan():
    from dbops.ops.wal import dropfind

    m = stored(v2())
    t = dropfind._Target("orders", "app.public.orders", set(), set(), {5}, ["b1"])
    f = dropfind.Finding("app.public.orders", 0, 700, 1, 0.0, 1, dropfind.DROP)
    t.others.append((f, [FileId(1663, 5, 16500), FileId(1663, 5, 16403), FileId(1663, 5, 99999)]))
    dropfind._name_others([m], [t])
    assert f.also_dropped == ["app.public.invoices", "app.public.m2a",
                              "1 relation file(s) no backup knows (created since)"]


@pytest.mark.parametrize("blob", [
    b'{"format":2}\n' + b"[" * 200_000 + b"\n",  # nesting deeper than the parser's recursion
    b'{"databases":' + b"[" * 200_000,
])
def test_deep_nesting_is_damage_not_a_crash(blob):
    with pytest.raises(ValidationError, match="damaged"):
        stored(zstandard.ZstdCompressor().compress(blob)).whole()


def test_a_table_its_own_parent_or_a_long_chain_does_not_recurse():
    loop = [rel(1, "a", parent="public.a")]
    chain = [rel(i, f"t{i}", parent=f"public.t{i - 1}" if i > 1 else None) for i in range(1, 3001)]
    m = stored(v2(dbs=(("app", 5, loop + chain),), per_line=500))
    whole = m.whole()
    assert relmap.files_of([m.about(["a"])], "a")[1] == {FileId(1663, 5, 1)}
    counted = dict((t.name, n) for t, n in m.tables_and_parts())
    assert counted["a"] == 0 and counted["t1"] == 2999
    assert len(whole.parts_of(next(t for t in whole.tables() if t.name == "t2990"))) == 11


def test_format_1_is_capped_before_it_is_parsed(monkeypatch):
    monkeypatch.setattr(relmap, "MAX_FORMAT1", 100)
    with pytest.raises(ValidationError, match="damaged") as e:
        stored(v1()).whole()
    assert "format 1 larger than 100" in e.value.detail


def by_oid(rels):
    """The same relations as the writer stores them now: linked by table_oid and parent_oid."""
    oid_of = {f"{r['schema']}.{r['name']}": r["oid"] for r in rels}
    return [{**r, "table_oid": oid_of[r["table"]], "parent_oid": oid_of[r["parent"]] if r["parent"] else None}
            for r in rels]


@pytest.mark.parametrize("name", ["orders", "app.orders", "public.measures", "shop.public.orders", "m2", "m2a"])
def test_a_map_linked_by_oid_answers_as_one_linked_by_name(name):
    named = stored(v2())
    linked = stored(v2(dbs=(("app", 5, by_oid(APP)), ("shop", 6, by_oid(SHOP)))))

    def found(m):
        tables, heap, files = relmap.files_of([m], name)
        return [t.qualified for t in tables], heap, files

    assert found(linked.about([name])) == found(linked.whole()) == found(named.whole())
    assert ({t.qualified: n for t, n in linked.tables_and_parts()}
            == {t.qualified: n for t, n in named.tables_and_parts()})
    assert all(r.table_oid is not None for r in linked.relations())
    assert all(r.table_oid is None for r in named.relations())


def test_linked_by_oid_two_tables_of_one_unquoted_name_keep_their_own_parts():
    """a."b.c" and "a.b".c are both a.b.c unquoted: by name their parts mixed; by OID they do not."""
    rels = [rel(20, "b.c", schema="a"), rel(21, "b.c_pkey", "i", table="a.b.c", schema="a"),
            rel(30, "c", schema="a.b"), rel(31, "c_pkey", "i", table="a.b.c", schema="a.b"),
            rel(32, "c_idx", "i", table="a.b.c", schema="a.b")]
    linked = [{**r, "parent_oid": None, "table_oid": {21: 20, 31: 30, 32: 30}.get(r["oid"], r["oid"])} for r in rels]
    m = stored(v2(dbs=(("app", 5, linked),)))
    for name, own in (('a."b.c"', {20, 21}), ('"a.b".c', {30, 31, 32})):
        tables, heap, files = relmap.files_of([m.about([name])], name)
        assert [t.oid for t in tables] == [min(own)] and {f.node for f in files} == own
    assert sorted(n for _t, n in m.tables_and_parts()) == [1, 2]
    named = stored(v2(dbs=(("app", 5, rels),)))
    assert {f.node for f in relmap.files_of([named.whole()], 'a."b.c"')[2]} == {20, 21, 30, 31, 32}  # the old mix-up


def test_an_oid_linked_loop_or_a_bad_oid_is_handled_as_in_a_named_map():
    loop = [{**rel(1, "a"), "parent_oid": 2}, {**rel(2, "b"), "parent_oid": 1}]
    m = stored(v2(dbs=(("app", 5, loop),)))
    assert sorted(n for _t, n in m.tables_and_parts()) == [1, 1]
    assert relmap.files_of([m.about(["a"])], "a")[1] == {FileId(1663, 5, 1), FileId(1663, 5, 2)}
    for bad in ({**rel(1, "a"), "parent_oid": "x"}, {**rel(1, "a"), "parent_oid": None, "table_oid": -1}):
        with pytest.raises(ValidationError, match="damaged"):
            stored(v2(dbs=(("app", 5, [bad]),))).whole()
