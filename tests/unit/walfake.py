"""Fake data folders and WAL files for unit tests: real on-disk formats, small segments (1 MiB)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from dbops.pg.lsn import parse_segment_name

SEG = 1024 * 1024
SYSID = 7312345678901234567
_HDR = struct.Struct("=HHIQI4xQII")


def make_data_dir(root: Path, sysid: int = SYSID, major: int = 15) -> Path:
    d = root
    (d / "global").mkdir(parents=True, exist_ok=True)
    (d / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    (d / "global" / "pg_control").write_bytes(struct.pack("=Q", sysid) + b"\0" * 8184)
    (d / "PG_VERSION").write_text(f"{major}\n")
    (d / "postmaster.pid").write_text("1\n")
    return d


def segment_bytes(name: str, sysid: int = SYSID, seed: int = 0, seg_size: int = SEG) -> bytes:
    tli, segno = parse_segment_name(name[:24], seg_size)
    hdr = _HDR.pack(0xD110, 0x0002 | 0x0004, tli, segno * seg_size, 0, sysid, seg_size, 8192)
    rnd = random.Random(f"{name}-{seed}")
    # compressible like real WAL: repeated records with some random bytes
    body = b"".join(rnd.randbytes(24) + b"\0" * 40 for _ in range((seg_size - len(hdr)) // 64 + 1))
    return (hdr + body)[:seg_size]


def write_segment(data_dir: Path, name: str, *, ready: bool = True, **kw) -> Path:
    p = data_dir / "pg_wal" / name
    p.write_bytes(segment_bytes(name, **kw))
    if ready:
        (data_dir / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    return p


def write_file(data_dir: Path, name: str, content: bytes, *, ready: bool = True) -> Path:
    p = data_dir / "pg_wal" / name
    p.write_bytes(content)
    if ready:
        (data_dir / "pg_wal" / "archive_status" / f"{name}.ready").touch()
    return p


def status_listing(data_dir: Path) -> list[tuple[str, int]]:
    d = data_dir / "pg_wal" / "archive_status"
    return sorted((n, os.stat(d / n).st_mtime_ns) for n in os.listdir(d))
