"""A backup manifest's header fields as stored (see :mod:`dbops.repo.manifest`), and the small object
metadata a catalog listing reads instead of the manifest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbops.errors import ValidationError
from dbops.pg.lsn import format_lsn, parse_lsn
from dbops.repo import mformat
from dbops.repo.model import FILE, PgState
from dbops.repo.tblspc import Tablespace

if TYPE_CHECKING:
    from dbops.repo.manifest import Manifest

FORMAT_VERSION = 5
READABLE_FORMATS = (1, 2, 3, 4, 5)


def header_dict(m: Manifest) -> dict[str, Any]:
    """The header fields as stored (formats 1 to 5; format 1 also lists its files)."""
    d = {
        "format": m.format,
        "backup_id": m.backup_id,
        "parent_id": m.parent_id,
        "created": m.created,
        "dbops_version": m.dbops_version,
        "pg": {
            "version": m.pg.pg_version,
            "system_identifier": m.pg.system_identifier,
            "timeline": m.pg.timeline,
            "redo_lsn": format_lsn(m.pg.redo_lsn),
            "consistent_lsn": format_lsn(m.pg.consistent_lsn),
            "consistent_time": m.pg.consistent_time,
            "wal_segment_size": m.pg.wal_segment_size,
            "data_checksums": m.pg.data_checksums,
        },
        "chunk_size": m.chunk_size,
        "compression": m.compression,
        "logical_size": m.logical_size,
        "stored_bytes": m.stored_bytes,
        "counts": m.counts,
        "timings": m.timings,
        "meta": m.meta,
        "tablespaces": [t.to_dict() for t in m.tablespaces],
    }
    if m.format == 1:  # only for tests that make an old manifest
        d["files"] = [{**mformat.entry_meta(f), **({"chunks": [[c.hash, c.pack, c.offset, c.length, c.raw]
                                                               for c in f.chunks]} if f.type == FILE else {})}
                      for f in m.entries()]
    return d


def header_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a :class:`Manifest` from a stored header; ValidationError for a
    format this dbops does not read."""
    fmt = d.get("format")
    if fmt not in READABLE_FORMATS:
        raise ValidationError(
            f"backup {d.get('backup_id', '?')}: manifest format {fmt!r} is not supported",
            hint=f"this dbops reads formats {READABLE_FORMATS}; use the dbops version that wrote it",
        )
    pg = d["pg"]
    return dict(
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
        tablespaces=[Tablespace.from_dict(t) for t in d.get("tablespaces") or ()],
    )


def summary_metadata(m: Manifest) -> dict[str, str]:
    """Small object metadata so a catalog listing needs a HEAD, not a download."""
    return {
        "kind": str(m.meta.get("kind") or ""),
        "created": repr(m.created),
        "referenced-bytes": str(m.referenced_bytes()),
        "backup-id": m.backup_id,
        "consistent-time": repr(m.pg.consistent_time),
        "consistent-lsn": format_lsn(m.pg.consistent_lsn),
        "redo-lsn": format_lsn(m.pg.redo_lsn),
        "timeline": str(m.pg.timeline),
        "parent-id": m.parent_id or "",
        "logical-size": str(m.logical_size),
        "stored-bytes": str(m.stored_bytes),
    }
