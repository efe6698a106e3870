"""The backup manifest: everything needed to restore one backup on its own.

Stored zstd-compressed JSON at ``Layout.manifest(id)``, written last and with
``if_absent``: a backup exists exactly when its manifest does.

A file's content is a list of fixed-size chunks (``chunk_size``; the last one
may be shorter), each identified by the sha256 of its raw content. New chunks are
stored together in frames (several chunks compressed as one zstd frame), so a
chunk ref names its frame: ``pack`` (id), ``offset`` and ``length`` of the frame
inside that pack object, ``frame_raw`` (the frame's uncompressed length), and the
chunk's place in the decompressed frame: ``at`` and ``raw`` (its length).

* ``pack is None``: an all-zero chunk, never stored (restored as a hole);
* ``length == frame_raw``: the frame is stored uncompressed; shorter: a zstd frame.

Format 2 (written): ``MAGIC``, then a 4-byte length and the zstd-compressed JSON
document (files without chunks, plus the ``packs`` id table), then the zstd-compressed
binary chunk table of every file's chunks in file order, column by column:
sha256 digests (32 bytes), pack numbers (u32, ``NO_PACK`` for zero chunks), frame
offsets (u64), frame lengths, frame raw lengths, offsets in the frame (u32 each);
chunk counts and raw lengths follow from file sizes and ``chunk_size``.
Format 1 (read only): zstd-compressed JSON, chunk refs as
``[sha256_hex, pack_id | null, offset, length, raw]`` (one chunk per frame).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import zstandard

import dbops
from dbops.errors import ConflictError, NotFoundError, ValidationError
from dbops.pg.lsn import format_lsn, parse_lsn
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MAGIC = b"DBOPSMF2"
NO_PACK = 0xFFFFFFFF

FILE, DIR, SYMLINK = "file", "dir", "symlink"


class ChunkRef(NamedTuple):
    """One chunk of a file and the stored frame holding it (a tuple: hundreds of thousands per manifest)."""

    hash: str  # sha256 hex of the raw chunk
    pack: str | None  # None: all zeros, not stored
    offset: int  # the frame's offset in the pack
    length: int  # the frame's stored length
    raw: int  # the chunk's length
    at: int = 0  # the chunk's offset in the decompressed frame
    frame_raw: int = 0  # the frame's uncompressed length

    @property
    def is_zero(self) -> bool:
        return self.pack is None

    @property
    def compressed(self) -> bool:
        return self.length < self.frame_raw


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the data folder, "/"-separated; "." is the folder itself
    type: str  # file | dir | symlink
    mode: int  # permission bits (stat.S_IMODE)
    mtime_ns: int
    size: int = 0
    target: str | None = None  # symlinks only
    chunks: tuple[ChunkRef, ...] = ()


@dataclass(frozen=True)
class PgState:
    """What PostgreSQL's control data says about the snapshot."""

    pg_version: str  # PG_VERSION, e.g. "15"
    system_identifier: str
    timeline: int
    redo_lsn: int  # checkpoint REDO: WAL from here on is needed to start
    consistent_lsn: int  # the snapshot is consistent once WAL up to here is replayed
    consistent_time: float  # epoch seconds the snapshot's contents correspond to
    wal_segment_size: int = 16 * 1024 * 1024
    data_checksums: bool = False


@dataclass
class Manifest:
    backup_id: str
    pg: PgState
    chunk_size: int
    compression: dict[str, Any]  # {"algorithm": "zstd", "level": 3}
    files: list[FileEntry]
    parent_id: str | None = None
    created: float = field(default_factory=time.time)
    dbops_version: str = dbops.__version__
    logical_size: int = 0  # bytes of regular-file content
    stored_bytes: int = 0  # bytes of pack objects this backup added
    counts: dict[str, int] = field(default_factory=dict)  # chunks, new_chunks, reused_chunks, zero_chunks, packs
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, filled by the workflow
    format: int = FORMAT_VERSION

    # ------------------------------------------------------------------ derived

    def packs(self) -> set[str]:
        """Every pack id this backup's files point into."""
        return {c.pack for f in self.files for c in f.chunks if c.pack is not None}

    def check(self) -> None:
        """Structural consistency: every file's chunks cover exactly its size."""
        for f in self.files:
            if f.type != FILE:
                continue
            expected = -(-f.size // self.chunk_size) if f.size else 0
            total = sum(c.raw for c in f.chunks)
            if len(f.chunks) != expected or total != f.size or any(
                c.raw != self.chunk_size for c in f.chunks[:-1]
            ):
                raise ValidationError(
                    f"backup {self.backup_id}: manifest entry for {f.path} is inconsistent",
                    detail=f"size {f.size}, {len(f.chunks)} chunks covering {total} bytes "
                    f"(chunk size {self.chunk_size})",
                )

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "backup_id": self.backup_id,
            "parent_id": self.parent_id,
            "created": self.created,
            "dbops_version": self.dbops_version,
            "pg": {
                "version": self.pg.pg_version,
                "system_identifier": self.pg.system_identifier,
                "timeline": self.pg.timeline,
                "redo_lsn": format_lsn(self.pg.redo_lsn),
                "consistent_lsn": format_lsn(self.pg.consistent_lsn),
                "consistent_time": self.pg.consistent_time,
                "wal_segment_size": self.pg.wal_segment_size,
                "data_checksums": self.pg.data_checksums,
            },
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "logical_size": self.logical_size,
            "stored_bytes": self.stored_bytes,
            "counts": self.counts,
            "timings": self.timings,
            "meta": self.meta,
            "files": [_file_to_json(f, with_chunks=self.format == 1) for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        fmt = d.get("format")
        if fmt not in READABLE_FORMATS:
            raise ValidationError(
                f"backup {d.get('backup_id', '?')}: manifest format {fmt!r} is not supported",
                hint=f"this dbops reads formats {READABLE_FORMATS}; use the dbops version that wrote it",
            )
        pg = d["pg"]
        return cls(
            format=fmt,
            backup_id=d["backup_id"],
            parent_id=d.get("parent_id"),
            created=float(d["created"]),
            dbops_version=d.get("dbops_version", ""),
            pg=PgState(
                pg_version=str(pg["version"]),
                system_identifier=str(pg["system_identifier"]),
                timeline=int(pg["timeline"]),
                redo_lsn=parse_lsn(pg["redo_lsn"]),
                consistent_lsn=parse_lsn(pg["consistent_lsn"]),
                consistent_time=float(pg["consistent_time"]),
                wal_segment_size=int(pg.get("wal_segment_size", 16 * 1024 * 1024)),
                data_checksums=bool(pg.get("data_checksums", False)),
            ),
            chunk_size=int(d["chunk_size"]),
            compression=dict(d.get("compression") or {}),
            logical_size=int(d.get("logical_size", 0)),
            stored_bytes=int(d.get("stored_bytes", 0)),
            counts=dict(d.get("counts") or {}),
            timings=dict(d.get("timings") or {}),
            meta=dict(d.get("meta") or {}),
            files=[_file_from_json(f) for f in d["files"]],
        )

    def to_bytes(self) -> bytes:
        """Format 2 (see the module docstring); a manifest read from format 1 is written as 2."""
        self.format = FORMAT_VERSION
        doc = self.to_dict()
        doc["packs"], table = _encode_table(self.files)
        head = zstandard.ZstdCompressor(level=9).compress(json.dumps(doc, separators=(",", ":")).encode())
        return MAGIC + struct.pack("<I", len(head)) + head + zstandard.ZstdCompressor(level=3).compress(table)

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "manifest") -> Manifest:
        try:
            dz = zstandard.ZstdDecompressor()
            if not data.startswith(MAGIC):
                return cls.from_dict(json.loads(dz.decompress(data)))  # format 1
            at = len(MAGIC) + 4
            (n,) = struct.unpack_from("<I", data, len(MAGIC))
            d = json.loads(dz.decompress(data[at:at + n]))
            m = cls.from_dict(d)
            m.files = _decode_table(m.files, m.chunk_size, d["packs"], dz.decompress(data[at + n:]))
            return m
        except ValidationError:
            raise
        except (zstandard.ZstdError, ValueError, KeyError, TypeError, struct.error) as e:
            raise ValidationError(f"{what} is unreadable: {type(e).__name__}: {e}") from None

    def referenced_bytes(self) -> int:
        """Bytes in storage this backup reads: every stored frame it points into, once."""
        seen: dict[tuple[str, int], int] = {}  # several chunks may share one frame
        for f in self.files:
            for c in f.chunks:
                if c.pack is not None:
                    seen[(c.pack, c.offset)] = c.length
        return sum(seen.values())

    def summary_metadata(self) -> dict[str, str]:
        """Small object metadata so a catalog listing needs a HEAD, not a download."""
        return {
            "kind": str(self.meta.get("kind") or ""),
            "created": repr(self.created),
            "referenced-bytes": str(self.referenced_bytes()),
            "backup-id": self.backup_id,
            "consistent-time": repr(self.pg.consistent_time),
            "consistent-lsn": format_lsn(self.pg.consistent_lsn),
            "redo-lsn": format_lsn(self.pg.redo_lsn),
            "timeline": str(self.pg.timeline),
            "parent-id": self.parent_id or "",
            "logical-size": str(self.logical_size),
            "stored-bytes": str(self.stored_bytes),
        }


def _file_to_json(f: FileEntry, *, with_chunks: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"path": f.path, "type": f.type, "mode": f.mode, "mtime_ns": f.mtime_ns}
    if f.type == FILE:
        d["size"] = f.size
        if with_chunks:
            d["chunks"] = [[c.hash, c.pack, c.offset, c.length, c.raw] for c in f.chunks]
    elif f.type == SYMLINK:
        d["target"] = f.target
    return d


def _file_from_json(d: dict[str, Any]) -> FileEntry:
    return FileEntry(
        path=d["path"],
        type=d["type"],
        mode=int(d["mode"]),
        mtime_ns=int(d["mtime_ns"]),
        size=int(d.get("size", 0)),
        target=d.get("target"),
        chunks=tuple(ChunkRef(h, p, int(o), int(n), int(r), 0, int(r) if p else 0)  # format 1: a frame per chunk
                     for h, p, o, n, r in d.get("chunks", ())),
    )


_COLUMNS = ("I", "Q", "I", "I", "I")  # pack number, frame offset, frame length, frame raw length, offset in frame


def _encode_table(files: list[FileEntry]) -> tuple[list[str], bytes]:
    """(pack id table, binary chunk table) of every file's chunks, in file order."""
    chunks = [c for f in files if f.type == FILE for c in f.chunks]
    numbers: dict[str | None, int] = {None: NO_PACK}
    for c in chunks:
        if c.pack not in numbers:
            numbers[c.pack] = len(numbers) - 1
    cols = [array(t) for t in _COLUMNS]
    cols[0].extend(map(numbers.__getitem__, (c.pack for c in chunks)))
    cols[1].extend(c.offset for c in chunks)
    cols[2].extend(c.length for c in chunks)
    cols[3].extend(c.frame_raw for c in chunks)
    cols[4].extend(c.at for c in chunks)
    if sys.byteorder == "big":
        for col in cols:
            col.byteswap()
    digests = bytes.fromhex("".join(c.hash for c in chunks))
    return [p for p in numbers if p is not None], b"".join([digests, *(col.tobytes() for col in cols)])


def _decode_table(files: list[FileEntry], chunk_size: int, packs: list[str], table: bytes) -> list[FileEntry]:
    """The files with their chunks from a binary chunk table (inverse of :func:`_encode_table`)."""
    counts = [-(-f.size // chunk_size) if f.type == FILE else 0 for f in files]
    n = sum(counts)
    width = 32 + sum(array(t).itemsize for t in _COLUMNS)
    if len(table) != n * width:
        raise ValueError(f"chunk table has {len(table)} bytes, {n} chunks need {n * width}")
    hx = table[:32 * n].hex()
    hashes = [hx[i:i + 64] for i in range(0, 64 * n, 64)]
    pos, cols = 32 * n, []
    for t in _COLUMNS:
        col = array(t)
        col.frombytes(table[pos:pos + n * col.itemsize])
        if sys.byteorder == "big":
            col.byteswap()
        cols.append(col)
        pos += n * col.itemsize
    names: dict[int, str | None] = dict(enumerate(packs))
    names[NO_PACK] = None
    pack_of = list(map(names.__getitem__, cols[0]))
    raws: list[int] = []
    for f, k in zip(files, counts, strict=True):
        if k:
            raws.extend([chunk_size] * (k - 1))
            raws.append(f.size - (k - 1) * chunk_size)
    refs = list(map(ChunkRef, hashes, pack_of, cols[1], cols[2], raws, cols[4], cols[3]))
    out, i = [], 0
    for f, k in zip(files, counts, strict=True):
        out.append(FileEntry(f.path, f.type, f.mode, f.mtime_ns, f.size, f.target, tuple(refs[i:i + k])) if k else f)
        i += k
    return out


# ---------------------------------------------------------------------- storage


def save(store: ObjectStore, layout: Layout, manifest: Manifest) -> None:
    """Write the manifest (the act that makes the backup exist). Never replaces one."""
    key = layout.manifest(manifest.backup_id)
    if not store.put(key, manifest.to_bytes(), metadata=manifest.summary_metadata(), if_absent=True):
        raise ConflictError(
            f"backup {manifest.backup_id} already exists ({key})",
            hint="backup ids are unique per run; this is a bug or a clock far in the past",
        )


def load(store: ObjectStore, layout: Layout, backup_id: str) -> Manifest:
    """Read one backup's manifest; NotFoundError when the backup does not exist."""
    key = layout.manifest(backup_id)
    try:
        data = store.get(key)
    except NotFoundError:
        raise NotFoundError(
            f"backup {backup_id} does not exist",
            detail=f"no manifest at {key}",
            hint="`dbops backup list` shows the backups there are",
        ) from None
    m = Manifest.from_bytes(data, what=f"manifest of backup {backup_id} ({key})")
    if m.backup_id != backup_id:
        raise ValidationError(f"manifest at {key} names backup {m.backup_id}, not {backup_id}")
    return m
