"""Read the transaction-level facts `--before-drop` needs out of WAL segments with pg_waldump:
relation files created, databases dropped, and commits with the relation files they dropped.

Only the Transaction, Storage and Database resource managers are printed, so a segment reads in
milliseconds whatever the workload. Each segment is read from its first record start to the first
byte of the next segment (with the next segment beside it, so a record that crosses the boundary is
read whole, once)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dbops import proc
from dbops.errors import ValidationError
from dbops.pg import binaries, waldump
from dbops.pg.lsn import format_lsn, parse_segment_name

RMGRS = ("Transaction", "Storage", "Database")
_PATH_RE = re.compile(r"(?:base/(\d+)/(\d+)|global/(\d+)|pg_tblspc/(\d+)/[^/\s]+/(\d+)/(\d+))(?:_(fsm|vm|init))?")
_DIR_RE = re.compile(r"(\d+)/(\d+)")
DEFAULT_TABLESPACE, GLOBAL_TABLESPACE = 1663, 1664


@dataclass(frozen=True)
class FileId:
    spc: int
    db: int
    node: int

    def path(self) -> str:
        return f"{self.spc}/{self.db}/{self.node}"


@dataclass
class Commit:
    xid: int
    lsn: int
    time: float
    timeline: int
    dropped: list[FileId] = field(default_factory=list)
    subxacts: list[int] = field(default_factory=list)


@dataclass
class SegmentFacts:
    """What one segment holds, in WAL order within it."""

    name: str
    creates: list[tuple[int, int, FileId]] = field(default_factory=list)  # (lsn, xid, main-fork file)
    db_drops: list[tuple[int, int, list[tuple[int, int]]]] = field(default_factory=list)  # (lsn, xid, [(spc, db)])
    commits: list[Commit] = field(default_factory=list)


def parse_path(text: str) -> tuple[FileId, str | None] | None:
    """base/5/16384, global/1262 or pg_tblspc/16400/PG_15_.../5/16401 (with a fork suffix or not)."""
    m = _PATH_RE.fullmatch(text)
    if not m:
        return None
    if m.group(1):
        fid = FileId(DEFAULT_TABLESPACE, int(m.group(1)), int(m.group(2)))
    elif m.group(3):
        fid = FileId(GLOBAL_TABLESPACE, 0, int(m.group(3)))
    else:
        fid = FileId(int(m.group(4)), int(m.group(5)), int(m.group(6)))
    return fid, m.group(7)


def _section(desc: str, name: str) -> list[str]:
    for part in desc.split("; "):
        if part.startswith(name + ": "):
            return part[len(name) + 2:].split()
    return []


def parse_lines(name: str, timeline: int, text: str) -> SegmentFacts:
    facts = SegmentFacts(name)
    for rec in waldump.records(text):
        rmgr, xid, lsn, kind, desc = rec.rmgr, rec.xid, rec.lsn, rec.kind, rec.desc
        if rmgr == "Storage" and kind == "CREATE":
            p = parse_path(desc.strip())
            if p and p[1] is None:
                facts.creates.append((lsn, xid, p[0]))
        elif rmgr == "Database" and kind == "DROP":
            dirs = [(int(a), int(b)) for a, b in _DIR_RE.findall(desc)]
            if dirs:
                facts.db_drops.append((lsn, xid, dirs))
        elif rmgr == "Transaction" and kind in ("COMMIT", "COMMIT_PREPARED"):
            t = waldump.xact_time(desc)
            if t is None:
                continue
            prepared_xid, when = t
            if prepared_xid is not None:  # COMMIT_PREPARED names its transaction in the description
                xid = prepared_xid
            dropped = []
            for rel in _section(desc, "rels"):
                p = parse_path(rel)
                if p and p[1] is None:
                    dropped.append(p[0])
            subs = [int(x) for x in _section(desc, "subxacts") if x.isdigit()]
            facts.commits.append(Commit(xid, lsn, when, timeline, dropped, subs))
    return facts


def read_segment(folder: Path, name: str, next_name: str | None, *, seg_size: int,
                 bin_dir: str | None = None) -> SegmentFacts:
    """The facts of the records that start in segment `name` (in `folder`, with `next_name` beside it
    when the following segment is on the same timeline)."""
    tli, segno = parse_segment_name(name, seg_size)
    start = segno * seg_size
    argv = [binaries.binary("pg_waldump", bin_dir), "-p", str(folder), "-t", str(tli), "-s", format_lsn(start)]
    if next_name is not None:
        argv += ["-e", format_lsn(start + seg_size)]
    for r in RMGRS:
        argv += ["-r", r]
    res = proc.run(argv, env=waldump.ENV, check=False, timeout=600, what="pg_waldump")
    if res.returncode != 0 and "rmgr:" not in res.stdout and next_name is not None:
        raise ValidationError(f"pg_waldump cannot read archived segment {name}",
                              detail=(res.stderr or res.stdout)[-1500:])
    return parse_lines(name, tli, res.stdout)


def wrote_to(folder: Path, timeline: int, start: int, end: int, fid: FileId, *, bin_dir: str | None = None) -> bool:
    """Whether any record between start and end (LSNs) modified a block of the relation file."""
    argv = [binaries.binary("pg_waldump", bin_dir), "-p", str(folder), "-t", str(timeline), "-s", format_lsn(start),
            "-e", format_lsn(end), "-R", fid.path()]
    res = proc.run(argv, env=waldump.ENV, check=False, timeout=600, what="pg_waldump")
    return "rmgr:" in res.stdout
