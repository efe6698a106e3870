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
    """Parse a timeline history file: [(parent_tli, switchpoint_lsn, reason), ...].

    The content comes from the archive (untrusted): a line that is not `<timeline> <LSN> [reason]`,
    a timeline of 0 or beyond 32 bits, timelines that do not increase or switch points that go
    back raise ValidationError (exit 7) naming the line.
    """
    from dbops.errors import ValidationError

    out: list[tuple[int, int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        try:
            if len(parts) < 2:
                raise ValueError("fewer than two fields")
            tli, lsn = int(parts[0], 10), parse_lsn(parts[1])
            if not 0 < tli < 1 << 32:
                raise ValueError(f"timeline {tli} out of range")
            if out and (tli <= out[-1][0] or lsn < out[-1][1]):
                raise ValueError("timelines must increase and switch points must not go back")
        except ValueError as e:
            raise ValidationError(f"timeline history line {n} is malformed: {e}",
                                  detail=repr(line[:200]),
                                  hint="the archived history file is damaged or not PostgreSQL's") from None
        out.append((tli, lsn, parts[2] if len(parts) > 2 else ""))
    return out
