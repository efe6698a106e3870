"""Facts read straight from a data folder and its WAL files (no subprocess, no server).

Cheap enough for the archive_command fast path: the system identifier is the first
field of ``global/pg_control``, and every WAL segment starts with a long page header
that carries the system identifier, the segment size and the page address.
Both are written in the machine's native byte order.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dbops.errors import PreconditionError, ValidationError
from dbops.pg.lsn import PARTIAL_RE, SEGMENT_RE, parse_segment_name

XLP_LONG_HEADER = 0x0002
# XLogLongPageHeaderData: magic, info, tli, pageaddr, rem_len, (pad), sysid, seg_size, xlog_blcksz
_LONG_HEADER = struct.Struct("=HHIQI4xQII")
_SYSID = struct.Struct("=Q")


@dataclass(frozen=True)
class SegmentHeader:
    magic: int
    info: int
    timeline: int
    pageaddr: int
    system_identifier: int
    segment_size: int
    block_size: int


@dataclass(frozen=True)
class ClusterIdentity:
    """Who a data folder (or an archive) belongs to."""

    system_identifier: int
    pg_major: int
    wal_segment_size: int


def data_dir_of(wal_path: str | os.PathLike) -> Path:
    """The data folder a pg_wal file belongs to (archive/restore_command run with cwd = data folder)."""
    p = Path(os.path.abspath(wal_path))
    for cand in (p.parent.parent, Path.cwd()):
        if (cand / "global" / "pg_control").is_file():
            return cand
    raise PreconditionError(
        f"cannot find the data folder of {wal_path}",
        detail=f"neither {p.parent.parent} nor the current folder {Path.cwd()} holds global/pg_control",
        hint="archive_command and restore_command run in the data folder; pass %p as PostgreSQL gives it",
    )


def read_system_identifier(data_dir: str | os.PathLike) -> int:
    path = Path(data_dir) / "global" / "pg_control"
    try:
        with open(path, "rb") as f:
            raw = f.read(_SYSID.size)
    except OSError as e:
        raise PreconditionError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) < _SYSID.size:
        raise ValidationError(f"{path} is truncated")
    return _SYSID.unpack(raw)[0]


def read_pg_major(data_dir: str | os.PathLike) -> int:
    path = Path(data_dir) / "PG_VERSION"
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise PreconditionError(f"cannot read {path}: {e.strerror}") from None
    try:
        return int(text.split(".")[0])
    except ValueError:
        raise ValidationError(f"{path} holds {text!r}, not a PostgreSQL version") from None


def parse_header(raw: bytes, what: str = "WAL file") -> SegmentHeader:
    if len(raw) < _LONG_HEADER.size:
        raise ValidationError(f"{what} is too short to hold a WAL page header ({len(raw)} bytes)")
    magic, info, tli, pageaddr, _rem, sysid, seg_size, blcksz = _LONG_HEADER.unpack_from(raw)
    if not info & XLP_LONG_HEADER:
        raise ValidationError(f"{what} does not start with a long WAL page header (xlp_info {info:#06x})",
                              hint="the file is not a WAL segment, or it is damaged")
    return SegmentHeader(magic, info, tli, pageaddr, sysid, seg_size, blcksz)


def read_header(path: str | os.PathLike) -> SegmentHeader:
    with open(path, "rb") as f:
        return parse_header(f.read(_LONG_HEADER.size), str(path))


def check_segment(name: str, data: bytes) -> SegmentHeader:
    """Sanity of a segment (or .partial) before it is archived: header, size, page address."""
    hdr = parse_header(data, name)
    seg = name[:24]
    if hdr.segment_size <= 0 or hdr.segment_size & (hdr.segment_size - 1):
        raise ValidationError(f"{name}: implausible segment size {hdr.segment_size} in its header")
    if SEGMENT_RE.match(name) and len(data) != hdr.segment_size:
        raise ValidationError(f"{name} is {len(data)} bytes, but its header says segments are {hdr.segment_size}",
                              hint="a truncated segment is never archived; is the file being copied?")
    _tli, segno = parse_segment_name(seg, hdr.segment_size)
    if hdr.pageaddr != segno * hdr.segment_size:
        raise ValidationError(f"{name}: its first page is for address {hdr.pageaddr:X}, not for this segment",
                              hint="the file was renamed or is damaged")
    return hdr


def segment_size_in(pg_wal: Path) -> int | None:
    """The size of any complete segment file in pg_wal (all of them have the cluster's segment size)."""
    try:
        with os.scandir(pg_wal) as it:
            for e in it:
                if SEGMENT_RE.match(e.name) and e.is_file():
                    return e.stat().st_size
    except OSError:
        return None
    return None


def cluster_identity(data_dir: str | os.PathLike, wal_file: str | os.PathLike | None = None) -> ClusterIdentity:
    """The pushing cluster: system identifier, major version and WAL segment size."""
    d = Path(data_dir)
    sysid = read_system_identifier(d)
    seg_size = None
    if wal_file is not None:
        name = os.path.basename(wal_file)
        if SEGMENT_RE.match(name) or PARTIAL_RE.match(name):
            seg_size = read_header(wal_file).segment_size
    if seg_size is None:
        seg_size = segment_size_in(d / "pg_wal") or 16 * 1024 * 1024
    return ClusterIdentity(sysid, read_pg_major(d), seg_size)
