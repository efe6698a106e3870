"""The checks' listing of the tables to read, against a real server: a materialized view created WITH
NO DATA (which cannot be read: every validation failed on it) is left out once populated it is read;
each table's locks (itself and its indexes) are counted."""

from __future__ import annotations

import pytest

from dbops.ops.backup import checks
from dbops.pg import conn as pgconn

pytestmark = [pytest.mark.integration]

DB = "checks_listing"


def test_unpopulated_matview_left_out_and_locks_counted(lab):
    p = lab.primary
    with pgconn.session(p) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    try:
        with pgconn.session(p, DB) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("CREATE INDEX t_v ON t (v)")
            c.execute("CREATE MATERIALIZED VIEW later AS SELECT id FROM t WITH NO DATA")
            with pytest.raises(Exception) as e:
                c.execute("SELECT count(*) FROM later")
            assert "has not been populated" in e.value.detail
            listed = {name: locks for page in checks._table_pages(c) for name, _path, _pages, locks in page}
            assert "public.t" in listed and listed["public.t"] == 3  # the table and its two indexes
            assert "public.later" not in listed
            for page in checks._table_pages(c):  # what is listed can be read, 200 to a statement
                for part in checks._batches([(n, pth, lk) for n, pth, _pg, lk in page]):
                    c.execute(" UNION ALL ".join(f"SELECT count(*) FROM {n}" for n, _, _ in part)).fetchall()
            c.execute("REFRESH MATERIALIZED VIEW later")
            assert "public.later" in {n for page in checks._table_pages(c) for n, *_ in page}
    finally:
        with pgconn.session(p) as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
