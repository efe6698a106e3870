"""Read a cluster's relation map: for every database, each user relation's schema-qualified name,
OID, kind, relfilenode and tablespace, and the table it belongs to (an index, a TOAST table or its
index belong to their table; a partition names its parent).

Read from the throwaway instance a backup is validated on, so it describes exactly what that backup
holds and costs the primary nothing. `dbops restore --before-drop` uses it to know which files in
the WAL's dropped-relations lists were a given table."""

from __future__ import annotations

from typing import Any

from dbops.config import Node
from dbops.pg import conn as pgconn

FORMAT = 1
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")

_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind, COALESCE(pg_relation_filenode(c.oid), 0),
       CASE WHEN c.reltablespace = 0 THEN (SELECT dattablespace FROM pg_database
                                           WHERE datname = current_database())
            ELSE c.reltablespace END,
       c.reltoastrelid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm', 't', 'i', 'I', 'S') AND c.relpersistence IN ('p', 'u')
"""
_INDEXES = "SELECT indexrelid, indrelid FROM pg_index"
_PARENTS = "SELECT inhrelid, inhparent FROM pg_inherits"
_DATABASES = ("SELECT d.datname, d.oid, d.dattablespace FROM pg_database d WHERE d.datallowconn "
              "ORDER BY d.datname")


def _qualified(schema: str, name: str) -> str:
    return f"{schema}.{name}"


def read_database(node: Node, dbname: str) -> list[dict[str, Any]]:
    """The user relations of one database, each with the table it belongs to."""
    with pgconn.session(node, dbname) as c:
        rels = pgconn.rows(c, _RELATIONS)
        index_of = dict(pgconn.rows(c, _INDEXES))
        parent_of = dict(pgconn.rows(c, _PARENTS))
    by_oid = {r[0]: r for r in rels}
    toast_owner = {r[6]: r[0] for r in rels if r[6]}

    def owner(oid: int, depth: int = 0) -> int:
        """The table an index / TOAST table / TOAST index belongs to."""
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
        if t is None or t[1] in SYSTEM_SCHEMAS or (t[1] == "pg_toast" and table_oid == oid):
            continue
        parent = by_oid.get(parent_of.get(table_oid, 0))
        out.append({"oid": oid, "schema": schema, "name": name, "kind": kind, "node": int(node_), "spc": int(spc),
                    "table": _qualified(t[1], t[2]), "table_oid": table_oid,
                    "parent": _qualified(parent[1], parent[2]) if parent and table_oid == oid else None})
    return out


def read(node_for: Any, admin: Node) -> dict[str, Any]:
    """The whole map. `node_for(dbname)` gives a Node to connect to that database; `admin` lists them."""
    with pgconn.session(admin) as c:
        dbs = pgconn.rows(c, _DATABASES)
    return {"format": FORMAT,
            "databases": [{"name": name, "oid": int(oid), "spc": int(spc),
                           "relations": read_database(node_for(name), name)} for name, oid, spc in dbs]}
