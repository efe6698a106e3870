"""Reading pg_waldump's drop facts, table names, and relation maps from the bucket (untrusted)."""

from __future__ import annotations

import pytest

from dbops.errors import UsageError
from dbops.pg.waldrops import FileId, parse_lines, parse_path
from dbops.repo import relmap

LINES = """\
rmgr: Storage     len (rec/tot):     42/    42, tx:        728, lsn: 0/01527580, prev 0/01527550, desc: CREATE base/5/16395
rmgr: Storage     len (rec/tot):     42/    42, tx:        728, lsn: 0/01527590, prev 0/01527580, desc: CREATE base/5/16395_fsm
rmgr: Transaction len (rec/tot):    114/   114, tx:        728, lsn: 0/015276F0, prev 0/015276B0, desc: COMMIT 2026-11-29 20:04:03.107213 UTC; rels: base/5/16392; inval msgs: catcache 55 relcache 16392
rmgr: Transaction len (rec/tot):   1245/  1245, tx:        729, lsn: 0/01528058, prev 0/01528020, desc: COMMIT 2026-11-29 20:04:03 UTC; subxacts: 730 731; rels: base/5/16384 pg_tblspc/16400/PG_15_202209061/5/16401; dropped stats: 2/5/16384
rmgr: Database    len (rec/tot):     38/    38, tx:        732, lsn: 0/01947BE8, prev 0/01947B70, desc: DROP dir 1663/16396 16400/16396
rmgr: Transaction len (rec/tot):     98/    98, tx:          0, lsn: 0/01947C10, prev 0/01947BE8, desc: COMMIT_PREPARED 733: 2026-11-29 20:04:04.5 UTC; rels: base/5/17000
rmgr: Transaction len (rec/tot):     98/    98, tx:        734, lsn: 0/01947D10, prev 0/01947C10, desc: ABORT 2026-11-29 20:04:05 UTC; rels: base/5/18000
garbage line
"""


def test_parse_lines_reads_creates_drops_and_commits():
    f = parse_lines("000000010000000000000001", 1, LINES)
    assert f.creates == [(0x01527580, 728, FileId(1663, 5, 16395))]  # the main fork only
    assert f.db_drops == [(0x01947BE8, 732, [(1663, 16396), (16400, 16396)])]
    assert [(c.xid, c.dropped, c.subxacts) for c in f.commits] == [
        (728, [FileId(1663, 5, 16392)], []),
        (729, [FileId(1663, 5, 16384), FileId(16400, 5, 16401)], [730, 731]),
        (733, [FileId(1663, 5, 17000)], []),
    ]  # an abort drops only what it created: never a finding
    assert f.commits[2].time % 1 == pytest.approx(0.5)


@pytest.mark.parametrize("text", ["base/5", "base/../5/1", "/etc/passwd", "base/5/16384x", "pg_tblspc/1/2/3"])
def test_odd_paths_are_ignored(text):
    assert parse_path(text) is None


def test_table_names():
    assert relmap.split_name("orders") == (None, None, "orders")
    assert relmap.split_name("public.orders") == (None, "public", "orders")
    assert relmap.split_name('app."Sales.2026".Orders') == ("app", "Sales.2026", "Orders")
    for bad in ("", "a..b", "a.b.c.d", '"open'):
        with pytest.raises(UsageError):
            relmap.split_name(bad)


def doc(**over):
    rel = {"oid": 16384, "schema": "public", "name": "orders", "kind": "r", "node": 16384, "spc": 1663,
           "table": "public.orders", "table_oid": 16384, "parent": None}
    rel.update(over)
    return {"format": 1, "databases": [{"name": "app", "oid": 5, "spc": 1663, "relations": [
        rel,
        {"oid": 16390, "schema": "public", "name": "orders_pkey", "kind": "i", "node": 16390, "spc": 1663,
         "table": "public.orders", "table_oid": 16384, "parent": None},
        {"oid": 16400, "schema": "public", "name": "m1", "kind": "r", "node": 16400, "spc": 1663,
         "table": "public.m1", "table_oid": 16400, "parent": "public.measures"},
        {"oid": 16399, "schema": "public", "name": "measures", "kind": "p", "node": 0, "spc": 1663,
         "table": "public.measures", "table_oid": 16399, "parent": None},
    ]}]}


def test_a_map_resolves_a_table_its_parts_and_its_partitions():
    m = relmap.parse("b1", doc())
    tables, heap, files = relmap.files_of([m], "app.orders")
    assert [t.qualified for t in tables] == ["app.public.orders"]
    assert heap == {FileId(1663, 5, 16384)} and files == {FileId(1663, 5, 16384), FileId(1663, 5, 16390)}
    tables, heap, _ = relmap.files_of([m], "measures")
    assert heap == {FileId(1663, 5, 16400)}  # a partitioned table's data is its partitions'


@pytest.mark.parametrize("over", [{"node": -1}, {"node": 2 ** 32}, {"kind": "x"}, {"name": ""},
                                  {"schema": "a\x00b"}, {"oid": "16384"}, {"node": True}])
def test_a_damaged_map_from_the_bucket_is_refused(over):
    with pytest.raises((ValueError, TypeError, KeyError)):
        relmap.parse("b1", doc(**over))
