"""The backup manifest: everything needed to restore one backup on its own.

Stored zstd-compressed JSON at ``Layout.manifest(id)``, written last and with
``if_absent``: a backup exists exactly when its manifest does.

A file's content is a list of fixed-size chunks (``chunk_size``; the last one
may be shorter). Each chunk ref names its sha256 and where its stored bytes
live: ``pack`` (id), ``offset`` and ``length`` inside that pack object, and the
``raw`` (uncompressed) length. Two conventions keep refs small:

* ``pack is None``: an all-zero chunk, never stored (restored as a hole);
* ``length == raw``: stored uncompressed; ``length < raw``: a zstd frame.

JSON form of a chunk ref: ``[sha256_hex, pack_id | null, offset, length, raw]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import zstandard

import dbops
from dbops.errors import ConflictError, NotFoundError, ValidationError
from dbops.pg.lsn import format_lsn, parse_lsn
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

FORMAT_VERSION = 1

FILE, DIR, SYMLINK = "file", "dir", "symlink"


@dataclass(frozen=True)
class ChunkRef:
    hash: str
    pack: str | None
    offset: int
    length: int
    raw: int

    @property
    def is_zero(self) -> bool:
        return self.pack is None

    @property
    def compressed(self) -> bool:
        return self.length < self.raw


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
            "files": [_file_to_json(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        fmt = d.get("format")
        if fmt != FORMAT_VERSION:
            raise ValidationError(
                f"backup {d.get('backup_id', '?')}: manifest format {fmt!r} is not supported",
                hint=f"this dbops reads format {FORMAT_VERSION}; use the dbops version that wrote it",
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
        raw = json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=False).encode()
        return zstandard.ZstdCompressor(level=9).compress(raw)

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "manifest") -> Manifest:
        try:
            d = json.loads(zstandard.ZstdDecompressor().decompress(data))
            return cls.from_dict(d)
        except ValidationError:
            raise
        except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
            raise ValidationError(f"{what} is unreadable: {type(e).__name__}: {e}") from None

    def summary_metadata(self) -> dict[str, str]:
        """Small object metadata so a catalog listing needs a HEAD, not a download."""
        return {
            "backup-id": self.backup_id,
            "consistent-time": repr(self.pg.consistent_time),
            "consistent-lsn": format_lsn(self.pg.consistent_lsn),
            "redo-lsn": format_lsn(self.pg.redo_lsn),
            "timeline": str(self.pg.timeline),
            "parent-id": self.parent_id or "",
            "logical-size": str(self.logical_size),
            "stored-bytes": str(self.stored_bytes),
        }


def _file_to_json(f: FileEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"path": f.path, "type": f.type, "mode": f.mode, "mtime_ns": f.mtime_ns}
    if f.type == FILE:
        d["size"] = f.size
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
        chunks=tuple(ChunkRef(h, p, int(o), int(n), int(r)) for h, p, o, n, r in d.get("chunks", ())),
    )


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
