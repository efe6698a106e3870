"""LSN, WAL segment and timeline arithmetic (pure functions, no I/O)."""

from __future__ import annotations

import re

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_LABEL_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer."""
    try:
        hi, lo = text.strip().split("/")
        return (int(hi, 16) << 32) | int(lo, 16)
    except (ValueError, AttributeError):
        raise ValueError(f"invalid LSN {text!r} (expected the form 16/B374D848)") from None


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_xlogid(seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return 0x100000000 // seg_size


def segment_name(timeline: int, segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_xlogid(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segno_of_lsn(lsn: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn // seg_size


def segment_of_lsn(timeline: int, lsn: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    return segment_name(timeline, segno_of_lsn(lsn, seg_size), seg_size)


def parse_segment_name(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int]:
    """'00000001000000000000000A' -> (timeline, segno)."""
    if not SEGMENT_RE.match(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    tli = int(name[0:8], 16)
    log = int(name[8:16], 16)
    seg = int(name[16:24], 16)
    return tli, log * segments_per_xlogid(seg_size) + seg


def is_wal_file(name: str) -> bool:
    return bool(SEGMENT_RE.match(name) or HISTORY_RE.match(name) or PARTIAL_RE.match(name) or BACKUP_LABEL_RE.match(name))


def next_segment(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    tli, segno = parse_segment_name(name, seg_size)
    return segment_name(tli, segno + 1, seg_size)


def parse_history(text: str) -> list[tuple[int, int, str]]:
    """Parse a timeline history file: [(parent_tli, switchpoint_lsn, reason), ...]."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        out.append((int(parts[0]), parse_lsn(parts[1]), parts[2] if len(parts) > 2 else ""))
    return out
