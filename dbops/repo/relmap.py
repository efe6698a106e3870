"""A backup's relation map in the bucket: stored beside its manifest, read back as untrusted input.

The map says which relfilenodes (tablespace / database / file) were which table when the backup was
validated, so the WAL's dropped-relations lists can be read as table names.

Stored form (zstd), format 2: JSON lines, read a line at a time, never whole::

    {"format":2}
    {"database":{"name":"app","oid":16384,"spc":1663}}
    [{"kind":"r","name":"orders","node":16385,"oid":16385,"parent":null,"schema":"public",
      "spc":1663,"table":"public.orders","table_oid":16385,"parent_oid":null}, ...]   (up to 1,000 a line)

Each list line holds relations of the database named last. A relation belongs to its table, and a
partition to its parent, by their OIDs (``table_oid``, ``parent_oid``); maps written before
``parent_oid`` was (it is on every relation since) link them by ``table`` and ``parent``, names
written unquoted, where ``"a.b".c`` and ``a."b.c"`` are one name. Format 1 (one JSON document:
``{"databases":[{"name", "oid", "spc", "relations":[...]}], "format":1}``), written before, is
still read, whole."""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable, Iterator

import zstandard

from dbops.errors import NotFoundError, UsageError, ValidationError
from dbops.pg.waldrops import FileId as RelFile
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

MAX_BYTES = 512 * 1024 * 1024  # decompressed; a map is about 150 bytes per relation
MAX_LINE = 4 * 1024 * 1024  # a line of format 2 holds at most 1,000 relations (about 0.2 MB; 0.9 MB with
                             # every name 256 characters)
MAX_FORMAT1 = 128 * 1024 * 1024  # a map of format 1 is parsed whole: about 850,000 relations
READ = 1024 * 1024
FORMAT = 2
_DAMAGE = (zstandard.ZstdError, ValueError, TypeError, KeyError, AttributeError, RecursionError)


Key = tuple[str, int | str]  # (database, OID), or (database, unquoted schema.name) in a map linked by name


@dataclass(frozen=True, slots=True)
class Relation:
    database: str
    db_oid: int
    schema: str
    name: str
    oid: int
    kind: str
    file: RelFile | None
    table: str  # schema.name of the table it belongs to (itself for a table), unquoted: shown, not linked by
    parent: str | None
    table_oid: int | None = None  # set only in maps that link by OID (every relation has "parent_oid")
    parent_oid: int | None = None

    @property
    def qualified(self) -> str:
        return f"{self.database}.{self.schema}.{self.name}"

    @property
    def is_table(self) -> bool:
        return self.kind in ("r", "p", "m") and self.belongs == self.key

    @property
    def key(self) -> Key:
        """How the map's other relations point at this one (as their table or parent)."""
        if self.table_oid is not None:
            return (self.database, self.oid)
        return (self.database, f"{self.schema}.{self.name}")

    @property
    def belongs(self) -> Key:
        """The key of the table it belongs to (its own, for a table)."""
        return (self.database, self.table_oid) if self.table_oid is not None else (self.database, self.table)

    @property
    def parent_key(self) -> Key | None:
        if self.table_oid is not None:
            return (self.database, self.parent_oid) if self.parent_oid is not None else None
        return (self.database, self.parent) if self.parent is not None else None


@dataclass(frozen=True)
class RelMap:
    backup_id: str
    databases: dict[str, tuple[int, int]]  # name -> (oid, default tablespace)
    relations: tuple[Relation, ...]

    def tables(self) -> list[Relation]:
        return [r for r in self.relations if r.is_table]

    def parts_of(self, table: Relation) -> list[Relation]:
        """The table itself, its TOAST table and every index (of both), and its partitions' files
        (each table once, however the untrusted map links them)."""
        own: list[Relation] = []
        seen: set[Key] = set()
        todo = [table.key]
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            own.extend(r for r in self.relations if r.belongs == key)
            todo.extend(r.key for r in self.tables() if r.parent_key == key)
        return own


@dataclass(frozen=True)
class StoredMap:
    """A backup's map as stored (its compressed bytes: about 16 bytes a relation), read and checked
    again on each pass, a line at a time: what a search keeps of a map is what it asks for."""
    backup_id: str
    key: str
    blob: bytes
    databases: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)  # filled as read

    def relations(self) -> Iterator[Relation]:
        """Every relation, checked as it is read; ValidationError when the map is damaged."""
        try:
            yield from _relations(self.blob, self.databases)
        except _DAMAGE as e:
            raise ValidationError(f"the relation map of backup {self.backup_id} is damaged",
                                  detail=f"{self.key}: {e}") from None

    def whole(self) -> RelMap:
        rels = tuple(self.relations())
        return RelMap(self.backup_id, dict(self.databases), rels)

    def tables_and_parts(self) -> list[tuple[Relation, int]]:
        """Every table with how many other relations are its parts (``len(parts_of(t)) - 1``: its
        indexes, TOAST, partitions and theirs), in one pass: of the rest, only a count per table."""
        tables: list[Relation] = []
        own: dict[Key, int] = {}
        kids: dict[Key, list[Key]] = {}
        for r in self.relations():
            belongs = r.belongs
            own[belongs] = own.get(belongs, 0) + 1
            if r.is_table:
                tables.append(r)
                _note_kid(kids, r)
        return [(t, sum(own.get(part, 0) for part in _with_partitions(kids, {t.key})) - 1) for t in tables]

    def about(self, names: Iterable[str]) -> RelMap:
        """The part of the map that :func:`find_table` and ``parts_of`` need for these table names
        ([DB.][SCHEMA.]TABLE): every table of that name, and every relation of theirs and of their
        partitions, found in two passes. Only partitions' names (to follow them) are kept of the rest."""
        wanted = {split_name(n)[2] for n in names}
        found: set[Key] = set()
        kids: dict[Key, list[Key]] = {}
        for r in self.relations():
            if r.is_table:
                if r.name in wanted:
                    found.add(r.key)
                _note_kid(kids, r)
        found = _with_partitions(kids, found)
        del kids
        keep = tuple(r for r in self.relations() if r.belongs in found)
        return RelMap(self.backup_id, dict(self.databases), keep)


def _note_kid(kids: dict[Key, list[Key]], table: Relation) -> None:
    """Record a partition (or inheritance child) under its parent: the parent's key -> its keys."""
    if (parent := table.parent_key) is not None:
        kids.setdefault(parent, []).append(table.key)


def _with_partitions(kids: dict[Key, list[Key]], tables: set[Key]) -> set[Key]:
    """These tables' keys and their partitions', theirs and so on (each once, however the
    untrusted map links them: a loop or a long chain is walked, not recursed)."""
    found = set(tables)
    todo = list(found)
    while todo:
        for kid in kids.get(todo.pop(), ()):
            if kid not in found:
                found.add(kid)
                todo.append(kid)
    return found


def encode(produce: Callable[[IO[bytes]], Any]) -> bytes:
    """The stored form of a map whose text ``produce`` writes into the stream it is given: that
    text compressed as it comes, so only the compressed bytes are held (16 MB for a million
    relations, measured)."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        produce(w)
    return buf.getvalue()


def save(store: ObjectStore, layout: Layout, backup_id: str, blob: bytes) -> int:
    """Store a map made by :func:`encode`."""
    store.put(layout.relation_map(backup_id), blob, metadata={"format": str(FORMAT)})
    return len(blob)


def fetch(store: ObjectStore, layout: Layout, backup_id: str) -> StoredMap | None:
    """The backup's map as stored; None when the backup has none (taken before maps existed)."""
    key = layout.relation_map(backup_id)
    try:
        return StoredMap(backup_id, key, store.get(key))
    except NotFoundError:
        return None


def load(store: ObjectStore, layout: Layout, backup_id: str) -> RelMap | None:
    """The backup's whole map, checked; None when the backup has none."""
    m = fetch(store, layout, backup_id)
    return m.whole() if m is not None else None


def _chunks(blob: bytes) -> Iterator[bytes]:
    total = 0
    with zstandard.ZstdDecompressor().stream_reader(blob) as r:
        while chunk := r.read(READ):
            total += len(chunk)
            if total > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES} bytes decompressed")
            yield chunk


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} bytes")
        yield from lines
    if pending:
        yield pending


def _relations(blob: bytes, dbs: dict[str, tuple[int, int]]) -> Iterator[Relation]:
    chunks = _chunks(blob)
    first = next(chunks, b"")
    if first.startswith(b'{"databases"'):  # format 1: one document
        text = b""
        for chunk in itertools.chain((first,), chunks):
            text += chunk
            if len(text) > MAX_FORMAT1:
                raise ValueError(f"a map of format 1 larger than {MAX_FORMAT1} bytes")
        doc = json.loads(text)
        yield from parse("", doc, dbs).relations
        return
    lines = _lines(itertools.chain((first,), chunks))
    if json.loads(next(lines, b"null")) != {"format": 2}:
        raise ValueError("not a relation map of format 1 or 2")
    db: tuple[str, int] | None = None
    for line in lines:
        item = json.loads(line) if line else None
        if isinstance(item, dict) and set(item) == {"database"} and isinstance(item["database"], dict):
            d = item["database"]
            name, oid, spc = _text(d["name"]), _oid(d["oid"]), _oid(d["spc"])
            dbs[name] = (oid, spc)
            db = (name, oid)
        elif isinstance(item, list) and db is not None:
            for r in item:
                yield _relation(db[0], db[1], r)
        elif item is not None:
            raise ValueError("a line that is neither a database nor a list of its relations")


def _oid(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 32:
        raise ValueError(f"not an OID: {v!r}")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 256 or "\x00" in v:
        raise ValueError(f"not a name: {v!r}")
    return v


def _relation(db_name: str, db_oid: int, r: Any) -> Relation:
    if not isinstance(r, dict):
        raise ValueError("a relation that is not an object")
    node = _oid(r["node"])
    kind = _text(r["kind"])
    if kind not in ("r", "p", "m", "t", "i", "I", "S"):
        raise ValueError(f"unknown relation kind {kind!r}")
    parent = r.get("parent")
    by_oid = "parent_oid" in r  # linked by OID (see the module's docstring), else by name
    parent_oid = r["parent_oid"] if by_oid else None
    return Relation(db_name, db_oid, _text(r["schema"]), _text(r["name"]), _oid(r["oid"]), kind,
                    RelFile(_oid(r["spc"]), db_oid, node) if node else None, _text(r["table"]),
                    _text(parent) if parent is not None else None,
                    _oid(r["table_oid"]) if by_oid else None, _oid(parent_oid) if parent_oid is not None else None)


def parse(backup_id: str, doc: Any, dbs: dict[str, tuple[int, int]] | None = None) -> RelMap:
    """A map of format 1 (one JSON document)."""
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("databases"), list):
        raise ValueError("not a relation map of format 1")
    dbs = {} if dbs is None else dbs
    rels: list[Relation] = []
    for d in doc["databases"]:
        name, oid, spc = _text(d["name"]), _oid(d["oid"]), _oid(d["spc"])
        dbs[name] = (oid, spc)
        rels.extend(_relation(name, oid, r) for r in d["relations"])
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
                    if p.kind in ("r", "m") and p.belongs != t.key:
                        heap.add(p.file)  # a partition's own data counts as the table's
    return tables, heap, allf
