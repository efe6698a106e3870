"""Read a cluster's relation map: for every database, each user relation's schema-qualified name,
OID, kind, relfilenode and tablespace, and the table it belongs to (an index, a TOAST table or its
index belong to their table; a partition names its parent).

Read from the throwaway instance a backup is validated on, so it describes exactly what that backup
holds and costs the primary nothing. `dbops restore --before-drop` uses it to know which files in
the WAL's dropped-relations lists were a given table.

The map is written as it is read: the server works out each relation's table and parent, its rows
come through a server-side cursor a batch at a time, and each row goes straight into the JSON text
(format 1) given to ``out``. So memory does not grow with the number of relations (a cluster with
a million tables held them all as Python objects before: some 600 MiB)."""

from __future__ import annotations

import json
from typing import IO, Any, Callable

from dbops.config import Node
from dbops.pg import conn as pgconn

FORMAT = 1
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
BATCH = 5000  # rows fetched per round trip from the server-side cursor

# Every persistent or unlogged relation with its table: an index's table (pg_index), which may be a
# TOAST table, whose table is the one naming it in reltoastrelid; a table's first parent
# (pg_inherits) when it is a partition or child. Relations whose table is a system catalog, and TOAST
# tables with no table among these relations, are left out.
_RELATIONS = """
WITH rels AS (
  SELECT oid, relnamespace, relname, relkind, reltablespace, reltoastrelid FROM pg_class
  WHERE relkind IN ('r', 'p', 'm', 't', 'i', 'I', 'S') AND relpersistence IN ('p', 'u')
)
SELECT r.oid, n.nspname, r.relname, r.relkind::text, COALESCE(pg_relation_filenode(r.oid), 0),
       r.reltablespace, t.oid, tn.nspname, t.relname, pn.nspname, p.relname
FROM rels r
JOIN pg_namespace n ON n.oid = r.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = r.oid
LEFT JOIN rels tw ON tw.reltoastrelid <> 0 AND tw.reltoastrelid = COALESCE(i.indrelid, r.oid)
JOIN rels t ON t.oid = COALESCE(tw.oid, i.indrelid, r.oid)
JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_inherits h ON t.oid = r.oid AND h.inhrelid = t.oid AND h.inhseqno = 1
LEFT JOIN rels p ON p.oid = h.inhparent
LEFT JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE tn.nspname NOT IN ('pg_catalog', 'information_schema') AND NOT (tn.nspname = 'pg_toast' AND t.oid = r.oid)
"""
_DATABASES = ("SELECT d.datname, d.oid, d.dattablespace FROM pg_database d WHERE d.datallowconn "
              "ORDER BY d.datname")


def _qualified(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def write_database(node: Node, dbname: str, db_spc: int, put: Callable[[bytes], Any]) -> int:
    """The user relations of one database, each with the table it belongs to, as JSON objects
    separated by commas (the inside of a list); returns how many. A batch of rows at a time is
    fetched and encoded (one encoder call per batch: a call per row took 40 % longer)."""
    n = 0
    with pgconn.session(node, dbname) as c:
        with c.raw.transaction():  # a server-side cursor lives in a transaction
            # The whole result is read: plan for all of it, not for its first rows (a cursor's default).
            c.raw.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            cur = c.raw.cursor("dbops_relmap")
            cur.execute(_RELATIONS)
            while rows := cur.fetchmany(BATCH):
                # Keys in sorted order: the text json.dumps(..., sort_keys=True) gave for format 1.
                batch = [{"kind": kind, "name": name, "node": int(node_), "oid": int(oid),
                          "parent": _qualified(p_schema, p_name) if p_name is not None else None,
                          "schema": schema, "spc": int(spc) or db_spc, "table": _qualified(t_schema, t_name),
                          "table_oid": int(table_oid)}
                         for oid, schema, name, kind, node_, spc, table_oid, t_schema, t_name, p_schema, p_name
                         in rows]
                put((b"," if n else b"") + json.dumps(batch, separators=(",", ":"))[1:-1].encode())
                n += len(batch)
            cur.close()
    return n


def write(node_for: Any, admin: Node, out: IO[bytes]) -> int:
    """The whole map, as the JSON text of format 1, into ``out``; returns the number of relations.
    `node_for(dbname)` gives a Node to connect to that database; `admin` lists them."""
    with pgconn.session(admin) as c:
        dbs = pgconn.rows(c, _DATABASES)
    out.write(b'{"databases":[')
    total = 0
    for i, (name, oid, spc) in enumerate(dbs):
        head = json.dumps({"name": name, "oid": int(oid)}, separators=(",", ":"))[:-1]
        out.write((b"," if i else b"") + head.encode() + b',"relations":[')
        total += write_database(node_for(name), name, int(spc), out.write)
        out.write(b'],"spc":' + str(int(spc)).encode() + b"}")
    out.write(b'],"format":' + str(FORMAT).encode() + b"}")
    return total
