"""Benchmark: the relation map a validated backup reads for `restore --before-drop`, as a function of
the number of relations. Empty tables are created in a database of the lab's primary, then the map
is read in a fresh process, twice per size: as dbops reads it (a stream into its compressed form:
dbops.pg.relmap.write into dbops.repo.relmap.encode), and held whole (every row as a Python dict,
then compressed: how it was read before), for comparison. Reports the process's peak RSS above its
baseline, seconds and the stored size.

    python bench/run.py --only bench_relmap          BENCH_RELMAP_TABLES (default "10000 100000")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dbops.lab import harness as labmod
from dbops.pg import conn as pgconn

DB = "relmap_bench"
ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import io, json, resource, sys, time
from dbops.config import Node
from dbops.pg import conn as pgconn, relmap as reader
from dbops.repo import relmap
import zstandard
node = Node(**json.loads(sys.argv[2]))
pgconn.preload()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
if sys.argv[1] == "stream":
    blob = relmap.encode(lambda out: reader.write(lambda _n: node, node, out))
else:  # held whole: every relation a dict, then one text, then compressed
    with pgconn.session(node) as c:
        dbs = pgconn.rows(c, reader._DATABASES)
    doc = {"format": 1, "databases": []}
    for name, oid, spc in dbs:
        with pgconn.session(node, name) as c:
            rows = pgconn.rows(c, reader._RELATIONS)
        doc["databases"].append({"name": name, "oid": oid, "spc": spc, "relations": [
            {"kind": k, "name": n, "node": f, "oid": o, "parent": pn and f"{ps}.{pn}", "schema": s,
             "spc": sp or spc, "table": f"{ts}.{tn}", "table_oid": to}
            for o, s, n, k, f, sp, to, ts, tn, ps, pn in rows]})
    blob = zstandard.ZstdCompressor(level=3).compress(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": round(time.monotonic() - t0, 2), "stored_bytes": len(blob),
                  "peak_rss_mib": round(peak / 1024, 1), "rss_above_base_mib": round((peak - base) / 1024, 1)}))
"""


def _tables(lab: labmod.LabInfo, upto: int) -> int:
    """Empty tables t1..t<upto> in the bench's database; returns its relation count."""
    with pgconn.session(lab.primary, DB, options="-c statement_timeout=0") as c:
        have = pgconn.scalar(c, "SELECT count(*) FROM pg_class WHERE relname LIKE 't%' AND relnamespace = "
                                "'public'::regnamespace")
        for lo in range(have + 1, upto + 1, 2000):
            hi = min(upto, lo + 1999)
            c.execute(f"DO $$ BEGIN FOR i IN {lo}..{hi} LOOP EXECUTE format('CREATE TABLE t%s (id int)', i); "
                      f"END LOOP; END $$")
        return pgconn.scalar(c, "SELECT count(*) FROM pg_class")


def _measure(lab: labmod.LabInfo, mode: str) -> dict:
    n = lab.primary
    node = {"name": n.name, "host": n.host, "port": n.port, "user": n.user, "dbname": n.dbname, "passfile": n.passfile}
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"PGPASSWORD": n.password} if n.password else {})}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, json.dumps(node)], capture_output=True, text=True,
                         env=env, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(lab: labmod.LabInfo, **_kw) -> list[dict]:
    with pgconn.session(lab.primary) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    out = []
    try:
        for size in (int(x) for x in os.environ.get("BENCH_RELMAP_TABLES", "10000 100000").split()):
            rels = _tables(lab, size)
            for mode in ("stream", "held"):
                out.append({"bench": "relmap", "tables": size, "relations": rels, "mode": mode,
                            **_measure(lab, mode)})
    finally:
        with pgconn.session(lab.primary) as c:
            c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    return out
