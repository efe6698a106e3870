"""Reading ``pg_waldump`` output: records, transaction ends with their times, where the WAL ends.

Pure parsing, and the one place that reads ``pg_waldump``'s record lines: the primary-lost
assessment, ``--before-drop`` (:mod:`dbops.pg.waldrops`) and the restore's end-of-archive scan all
use :func:`records` and :func:`xact_time`. The caller runs ``pg_waldump`` wherever the WAL is,
with :data:`ENV` (``TZ=UTC LANG=C``).
A record line looks like::

    rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/03000148, prev 0/03000110,
    desc: COMMIT 2026-11-29 20:01:02.123456 UTC

a record that changes pages names each one (:func:`block_refs`), PostgreSQL 15 printing::

    ..., desc: UPDATE off 45 xmax 741 flags 0x03 ; new off 22 xmax 0, blkref #0: rel 1663/5/16396 blk 1639 FPW,
    blkref #1: rel 1663/5/16396 fork vm blk 0

and the run ends with an error naming where the valid WAL stops, e.g.
``error in WAL record at 0/3000148: invalid record length at 0/3000180: wanted 24, got 0``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from dbops.pg.lsn import SEGMENT_RE, parse_lsn

ENV = {"TZ": "UTC", "LANG": "C", "LC_ALL": "C"}

_RECORD_RE = re.compile(r"rmgr: (\w+)\s+len \(rec/tot\):\s*\d+/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), "
                        r"prev [0-9A-F]+/[0-9A-F]+, desc: (\S+)\s?(.*)$")
# PostgreSQL 13-15: "rel 1663/5/16396 fork vm blk 0"; 16+: "rel 1663/5/16396, fork vm, blk 0".
_BLKREF_RE = re.compile(r"blkref #\d+: rel (\d+)/(\d+)/(\d+),?(?: fork (\w+),?)? blk (\d+)")
_XACT_TIME_RE = re.compile(r"^(?:(\d+): )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
_ERROR_RE = re.compile(r"error in WAL record at ([0-9A-F]+/[0-9A-F]+): (.*)$")
_LSN_IN_TEXT_RE = re.compile(r"\bat ([0-9A-F]+/[0-9A-F]+)")
XACT_ENDS = ("COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED")


@dataclass(frozen=True)
class Record:
    rmgr: str
    total_len: int
    xid: int
    lsn: int
    kind: str
    desc: str

    @property
    def end_guess(self) -> int:
        """Start plus length: the record's end unless it crosses a page header (then a little more)."""
        return self.lsn + self.total_len


@dataclass(frozen=True)
class BlockRef:
    """A page a record changes: relation (tablespace OID, database OID, relfilenode), fork, block number."""

    spc: int
    db: int
    rel: int
    fork: str  # main | fsm | vm | init
    blk: int


@dataclass(frozen=True)
class XactEnd:
    """A transaction's commit (or abort) record."""

    lsn: int
    xid: int
    kind: str  # COMMIT | ABORT | COMMIT_PREPARED | ABORT_PREPARED
    time: float  # epoch seconds (the record's own timestamp)

    @property
    def committed(self) -> bool:
        return self.kind.startswith("COMMIT")


@dataclass(frozen=True)
class Dump:
    records: list[Record]
    last_valid_lsn: int | None  # start of the last record read (from the closing error), if any
    stop_lsn: int | None  # where reading stopped: the first position holding no valid record
    error: str | None  # the closing error message (normal at the end of the WAL)


def parse_record(line: str) -> Record | None:
    """The record one ``pg_waldump`` line describes, or None for any other line."""
    m = _RECORD_RE.search(line)
    if not m:
        return None
    return Record(m.group(1), int(m.group(2)), int(m.group(3)), parse_lsn(m.group(4)), m.group(5), m.group(6))


def records(text: str) -> list[Record]:
    """Every record line of a ``pg_waldump`` output, in order."""
    return [r for r in (parse_record(line) for line in text.splitlines()) if r is not None]


def block_refs(line: str) -> list[BlockRef]:
    """Every page a ``pg_waldump`` record line names (``blkref #N: rel SPC/DB/REL [fork F] blk B``), in order;
    none for any other line."""
    return [BlockRef(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or "main", int(m.group(5)))
            for m in _BLKREF_RE.finditer(line)]


# How pg_waldump reports the end of the valid WAL in a folder (not a problem): a record not
# written yet, a recycled segment's old bytes, no next segment.
_WAL_END = ("invalid record length", "invalid magic number", "could not find file")


def segments_by_timeline(wal_dir: str | os.PathLike, names: Iterable[str] | None = None) -> list[list[str]]:
    """The WAL segment names in wal_dir (or ``names``, files of wal_dir), sorted, one list per timeline
    (what one ``pg_waldump`` run reads: from the first to the last)."""
    by_tli: dict[str, list[str]] = {}
    for name in sorted(os.listdir(wal_dir) if names is None else names):
        if SEGMENT_RE.match(name):
            by_tli.setdefault(name[:8], []).append(name)
    return list(by_tli.values())


def ended_at_wal_end(stderr: str) -> bool:
    """Whether a failed ``pg_waldump`` run's error only says it reached the end of the WAL there."""
    return any(w in stderr for w in _WAL_END)


def xact_time(desc: str) -> tuple[int | None, float] | None:
    """(prepared transaction's xid or None, epoch seconds) from a transaction end's description
    (``2026-11-29 20:01:02.123456 UTC ...``, or ``731: 2026-... UTC`` for COMMIT/ABORT_PREPARED)."""
    m = _XACT_TIME_RE.match(desc)
    if not m:
        return None
    text = m.group(2)
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
    when = datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
    return (int(m.group(1)) if m.group(1) else None), when


def parse(text: str) -> Dump:
    """Records and the closing error of a ``pg_waldump`` run (stdout and stderr concatenated)."""
    found: list[Record] = []
    last_valid = stop = None
    error = None
    for line in text.splitlines():
        rec = parse_record(line)
        if rec is not None:
            found.append(rec)
            continue
        e = _ERROR_RE.search(line)
        if e:
            last_valid = parse_lsn(e.group(1))
            error = e.group(2).strip()
            inner = _LSN_IN_TEXT_RE.search(error)
            stop = parse_lsn(inner.group(1)) if inner else None
        elif "error:" in line and error is None:
            error = line.split("error:", 1)[1].strip()
    return Dump(found, last_valid, stop, error)


def xact_end(rec: Record) -> XactEnd | None:
    """The transaction end a record stands for (with its time), else None."""
    if rec.rmgr != "Transaction" or rec.kind not in XACT_ENDS:
        return None
    t = xact_time(rec.desc)
    if t is None:
        return None
    return XactEnd(rec.lsn, rec.xid, rec.kind, t[1])


def xact_ends(records: list[Record]) -> list[XactEnd]:
    return [x for x in (xact_end(r) for r in records) if x is not None]


def last_commit(records: list[Record], before: int | None = None) -> XactEnd | None:
    """The last commit record (starting before `before`, when given)."""
    for rec in reversed(records):
        if before is not None and rec.lsn >= before:
            continue
        x = xact_end(rec)
        if x is not None and x.committed:
            return x
    return None


__all__ = ["ENV", "BlockRef", "Dump", "block_refs", "ended_at_wal_end", "Record", "segments_by_timeline", "XACT_ENDS", "XactEnd", "last_commit", "parse", "parse_record", "records",
           "xact_end", "xact_ends", "xact_time"]
