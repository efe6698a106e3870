"""A backup's relation map in the bucket: stored beside its manifest, read back as untrusted input.

The map says which relfilenodes (tablespace / database / file) were which table when the backup was
validated, so the WAL's dropped-relations lists can be read as table names."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable

import zstandard

from dbops.errors import NotFoundError, UsageError, ValidationError
from dbops.pg.waldrops import FileId as RelFile
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

MAX_BYTES = 512 * 1024 * 1024  # decompressed; a map is about 150 bytes per relation


@dataclass(frozen=True)
class Relation:
    database: str
    db_oid: int
    schema: str
    name: str
    oid: int
    kind: str
    file: RelFile | None
    table: str  # schema.name of the table it belongs to (itself for a table)
    parent: str | None

    @property
    def qualified(self) -> str:
        return f"{self.database}.{self.schema}.{self.name}"


@dataclass(frozen=True)
class RelMap:
    backup_id: str
    databases: dict[str, tuple[int, int]]  # name -> (oid, default tablespace)
    relations: tuple[Relation, ...]

    def tables(self) -> list[Relation]:
        return [r for r in self.relations if r.kind in ("r", "p", "m") and f"{r.schema}.{r.name}" == r.table]

    def parts_of(self, table: Relation) -> list[Relation]:
        """The table itself, its TOAST table and every index (of both), and its partitions' files."""
        own = [r for r in self.relations if r.database == table.database and r.table == f"{table.schema}.{table.name}"]
        parts = [r for r in self.tables() if r.database == table.database and r.parent == f"{table.schema}.{table.name}"]
        for p in parts:
            own.extend(self.parts_of(p))
        return own

    def by_file(self) -> dict[RelFile, Relation]:
        return {r.file: r for r in self.relations if r.file is not None}


FORMAT = 1


def encode(produce: Callable[[IO[bytes]], Any]) -> bytes:
    """The stored form of a map whose JSON text ``produce`` writes into the stream it is given: that
    text compressed as it comes, so only the compressed bytes are held (a few MB for a million
    relations)."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        produce(w)
    return buf.getvalue()


def save(store: ObjectStore, layout: Layout, backup_id: str, blob: bytes) -> int:
    """Store a map made by :func:`encode`."""
    store.put(layout.relation_map(backup_id), blob, metadata={"format": str(FORMAT)})
    return len(blob)


def load(store: ObjectStore, layout: Layout, backup_id: str) -> RelMap | None:
    """The backup's map, checked; None when the backup has none (taken before maps existed)."""
    key = layout.relation_map(backup_id)
    try:
        blob = store.get(key)
    except NotFoundError:
        return None
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_BYTES)
        return parse(backup_id, json.loads(raw))
    except (zstandard.ZstdError, ValueError, TypeError, KeyError) as e:
        raise ValidationError(f"the relation map of backup {backup_id} is damaged", detail=f"{key}: {e}") from None


def _oid(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 32:
        raise ValueError(f"not an OID: {v!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 256 or "\x00" in v:
        raise ValueError(f"not a name: {v!r}")
    return v


def parse(backup_id: str, doc: Any) -> RelMap:
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("databases"), list):
        raise ValueError("not a relation map of format 1")
    dbs: dict[str, tuple[int, int]] = {}
    rels: list[Relation] = []
    for d in doc["databases"]:
        name, oid, spc = _text(d["name"]), _oid(d["oid"]), _oid(d["spc"])
        dbs[name] = (oid, spc)
        for r in d["relations"]:
            node = _oid(r["node"])
            kind = _text(r["kind"])
            if kind not in ("r", "p", "m", "t", "i", "I", "S"):
                raise ValueError(f"unknown relation kind {kind!r}")
            parent = r.get("parent")
            rels.append(Relation(name, oid, _text(r["schema"]), _text(r["name"]), _oid(r["oid"]), kind,
                                 RelFile(_oid(r["spc"]), oid, node) if node else None, _text(r["table"]),
                                 _text(parent) if parent is not None else None))
    return RelMap(backup_id, dbs, tuple(rels))


def split_name(text: str) -> tuple[str | None, str | None, str]:
    """[DB.][SCHEMA.]TABLE, each part optionally double-quoted: (db, schema, table)."""
    parts: list[str] = []
    cur, quoted, i = "", False, 0
    s = text.strip()
    while i < len(s):
        ch = s[i]
        if ch == '"':
            if quoted and i + 1 < len(s) and s[i + 1] == '"':
                cur += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch == "." and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    if quoted or not all(parts) or len(parts) > 3:
        raise UsageError(f"{text!r} is not a table name", hint="write [DATABASE.][SCHEMA.]TABLE, e.g. "
                                                              "app.public.orders, public.orders or orders")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, None, parts[0]


def find_table(m: RelMap, text: str) -> list[Relation]:
    """Tables in this map that the name can mean. A two-part name is SCHEMA.TABLE, else DB.TABLE."""
    db, schema, table = split_name(text)
    tables = m.tables()

    def match(d: str | None, s: str | None) -> list[Relation]:
        return [r for r in tables if r.name == table and (d is None or r.database == d)
                and (s is None or r.schema == s)]

    found = match(db, schema)
    if not found and db is None and schema is not None:
        found = match(schema, None)  # DB.TABLE
    return found


def files_of(maps: Iterable[RelMap], text: str) -> tuple[list[Relation], set[RelFile], set[RelFile]]:
    """Every backup's idea of the table: (the tables, the tables' own files, every file of theirs)."""
    tables: list[Relation] = []
    heap: set[RelFile] = set()
    allf: set[RelFile] = set()
    for m in maps:
        for t in find_table(m, text):
            tables.append(t)
            if t.file:
                heap.add(t.file)
            for p in m.parts_of(t):
                if p.file:
                    allf.add(p.file)
                    if p.kind in ("r", "m") and p.table != f"{t.schema}.{t.name}":
                        heap.add(p.file)  # a partition's own data counts as the table's
    return tables, heap, allf
