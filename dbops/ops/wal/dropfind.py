"""Find the transactions that dropped or truncated a table, by name, in the WAL archive.

The backups' relation maps say which relation files were the table; the archived WAL after the
oldest backup that knows it is read (in parallel, segment by segment, following the timeline
history) for commit records whose dropped-files list holds one of them, and for DROP DATABASE
records of its database. `dbops wal find --dropped` prints what is found; `dbops restore
--before-drop` restores to just before one of them."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbops.config import Config
from dbops.errors import NotFoundError, UsageError, ValidationError
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.target import iso_utc
from dbops.ops.wal.archive import WalArchive
from dbops.pg import waldrops
from dbops.pg.lsn import format_lsn, parse_segment_name, segment_of_lsn
from dbops.pg.waldrops import Commit, FileId, SegmentFacts
from dbops.repo import catalog, relmap
from dbops.storage import ObjectStore, open_archive
from dbops.storage.layout import Layout

WINDOW = 32  # segments on local disk at once (512 MiB at the default size)
DROP, TRUNCATE, DROP_DATABASE = "drop", "truncate", "drop database"
KIND_TEXT = {DROP: "DROP TABLE (or DROP SCHEMA / DROP OWNED ... CASCADE)", TRUNCATE: "TRUNCATE",
             DROP_DATABASE: "DROP DATABASE"}


@dataclass
class Finding:
    table: str
    occurrence: int
    xid: int
    commit_lsn: int
    commit_time: float
    timeline: int
    kind: str
    also_dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "occurrence": self.occurrence, "xid": self.xid,
                "commit_lsn": format_lsn(self.commit_lsn), "commit_time": iso_utc(self.commit_time),
                "timeline": self.timeline, "kind": self.kind, "operation": KIND_TEXT[self.kind],
                "also_dropped": self.also_dropped}


@dataclass
class Search:
    """One table's findings, and what was searched for them."""

    asked: str
    table: str  # database.schema.table
    backups: list[str]  # backups whose map knows the table, oldest first
    findings: list[Finding]
    first_segment: str | None = None
    last_segment: str | None = None
    segments: int = 0
    wal_bytes: int = 0  # segments x segment size: the WAL read
    stored_bytes: int = 0  # what was downloaded (compressed)
    seconds: float = 0.0

    def chosen(self, occurrence: int | None) -> Finding:
        """The latest finding, or the N-th (1 = the oldest)."""
        if not self.findings:
            raise NotFoundError(f"no DROP or TRUNCATE of {self.table} in the archived WAL",
                                detail=f"searched {self.segments} segment(s), {self.first_segment} .. "
                                       f"{self.last_segment}, after backup {self.backups[0]}",
                                hint="the table may have been dropped before that backup, or the WAL that holds "
                                     "the drop is not archived yet (`dbops wal status`)")
        if occurrence is None:
            return self.findings[-1]
        if not 1 <= occurrence <= len(self.findings):
            raise UsageError(f"--occurrence {occurrence}: {self.table} was dropped or truncated "
                             f"{len(self.findings)} time(s)", hint="`dbops wal find --dropped` lists them")
        return self.findings[occurrence - 1]

    def as_dict(self) -> dict[str, Any]:
        return {"asked": self.asked, "table": self.table, "backups": self.backups,
                "searched": {"first_segment": self.first_segment, "last_segment": self.last_segment,
                             "segments": self.segments, "bytes": self.wal_bytes, "stored_bytes": self.stored_bytes,
                             "seconds": round(self.seconds, 3)},
                "findings": [f.as_dict() for f in self.findings]}


@dataclass
class _Target:
    asked: str
    table: str
    heap: set[FileId]  # the table's own files (each backup's, and what TRUNCATE gave it since)
    files: set[FileId]  # with its indexes and TOAST
    db_oids: set[int]
    backups: list[str]
    findings: list[Finding] = field(default_factory=list)
    checks: list[tuple[Finding, FileId, int, int]] = field(default_factory=list)  # truncate or rewrite?
    others: list[tuple[Finding, list[FileId]]] = field(default_factory=list)  # dropped with it: to name


def _maps(store: ObjectStore, layout: Layout, infos: list[catalog.BackupInfo]) -> list[relmap.StoredMap]:
    """The usable backups' maps, as stored (compressed): each search pass reads them again."""
    return [m for m in (relmap.fetch(store, layout, b.backup_id) for b in infos if b.usable) if m is not None]


def _target(maps: list[relmap.RelMap], asked: str) -> _Target:
    tables, heap, files = relmap.files_of(maps, asked)
    if not tables:
        newest = maps[-1].backup_id if maps else None
        raise NotFoundError(f"no backup knows a table {asked}",
                            detail=(f"searched the relation maps of {len(maps)} backup(s), the newest {newest}"
                                    if newest else "no backup has a relation map (they are recorded from this "
                                                   "version on, when a backup is validated)"),
                            hint="name it as [DATABASE.][SCHEMA.]TABLE; `dbops backup show ID --relations` "
                                 "lists what a backup knows")
    names = sorted({t.qualified for t in tables})
    if len(names) > 1:
        raise UsageError(f"{asked} can mean several tables: {', '.join(names)}", hint="qualify the name")
    known = [m.backup_id for m in maps if any(t.qualified == names[0] for t in relmap.find_table(m, asked))]
    return _Target(asked, names[0], heap, files, {t.db_oid for t in tables}, known)


def tables_of(cfg: Config, backup_id: str, *, store: ObjectStore | None = None) -> list[dict[str, Any]] | None:
    """The tables a backup's relation map knows; None when it has no map."""
    m = relmap.fetch(*open_archive(cfg.storage, store), backup_id)
    if m is None:
        return None
    return [{"table": t.qualified, "oid": t.oid, "kind": t.kind, "file": t.file.path() if t.file else None,
             "parts": parts} for t, parts in sorted(m.tables_and_parts(), key=lambda x: x[0].qualified)]


def find(cfg: Config, names: list[str], *, store: ObjectStore | None = None,
         parallel: int | None = None) -> list[Search]:
    t0 = time.monotonic()
    store, layout = open_archive(cfg.storage, store)
    arc = WalArchive(store, layout)
    ident = arc.read_identity()
    if ident is None:
        raise NotFoundError(f"the archive at {layout.root} is empty", hint="check storage.prefix")
    seg_size = ident.wal_segment_size
    infos = catalog.list_backups(store, layout)
    maps = _maps(store, layout, infos)
    about = [m.about(names) for m in maps]  # what each map knows of these names, not all of it
    targets = [_target(about, n) for n in names]
    by_id = {b.backup_id: b for b in infos}
    inv = rwal.inventory(store, layout, seg_size)
    tli = inv.latest_timeline() or 1
    spans = rwal.chain(arc, tli)
    starts = [by_id[t.backups[0]] for t in targets]
    on = [b for b in starts if rwal.on_chain(spans, b.timeline, b.consistent_lsn)] or starts
    first = min(on, key=lambda b: b.consistent_lsn)
    wr = rwal.wal_range(inv, spans, segment_of_lsn(first.timeline, first.consistent_lsn, seg_size))
    if wr.holes:
        raise ValidationError(f"WAL segment {wr.holes[0]} is missing from the archive",
                              detail=f"the search needs {wr.needed[0]} .. {wr.contiguous[-1] if wr.contiguous else ''}"
                                     f" and later; missing: {', '.join(wr.holes[:10])}",
                              hint="`dbops wal status` lists the gaps")
    segs = wr.contiguous
    workers = parallel or max(2, (os.cpu_count() or 2) * 2)
    scratch = Path(cfg.backup.scratch_dir)
    with tempfile.TemporaryDirectory(prefix="dbops-walfind-", dir=scratch if scratch.is_dir() else None) as tmp:
        folder = Path(tmp)
        facts = _scan(arc, segs, folder, seg_size, workers, cfg.runtime.bin_dir)
        _match(targets, facts)
        _classify(arc, targets, folder, seg_size, cfg.runtime.bin_dir)
    _name_others(maps, targets)
    out = []
    for t in targets:
        t.findings.sort(key=lambda f: f.commit_lsn)
        for i, f in enumerate(t.findings, 1):
            f.occurrence = i
        out.append(Search(t.asked, t.table, t.backups, t.findings, segs[0] if segs else None,
                          segs[-1] if segs else None, len(segs), len(segs) * seg_size,
                          sum(inv.segments[n].size for n in segs), time.monotonic() - t0))
    return out


def _scan(arc: WalArchive, segs: list[str], folder: Path, seg_size: int, workers: int,
          bin_dir: str | None) -> list[SegmentFacts]:
    """Every segment's facts, in order; at most WINDOW + 1 segments on disk at once."""
    out: list[SegmentFacts] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbops-walfind") as pool:
        for w in range(0, len(segs), WINDOW):
            window = segs[w:w + WINDOW]
            ahead = segs[w + WINDOW:w + WINDOW + 1]
            todo = [n for n in window + ahead if not (folder / n).exists()]
            list(pool.map(lambda n: arc.fetch(n, folder / n), todo))

            def one(i: int) -> SegmentFacts:
                name = window[i]
                nxt = (window + ahead)[i + 1] if i + 1 < len(window) + len(ahead) else None
                if nxt is not None and nxt[:8] != name[:8]:
                    nxt = None
                return waldrops.read_segment(folder, name, nxt, seg_size=seg_size, bin_dir=bin_dir)

            out.extend(pool.map(one, range(len(window))))
            for n in window:
                (folder / n).unlink(missing_ok=True)
    return out


def _match(targets: list[_Target], facts: list[SegmentFacts]) -> None:
    creates: dict[int, list[tuple[int, FileId]]] = {}
    db_drops: dict[int, set[int]] = {}
    for sf in facts:
        for lsn, xid, fid in sf.creates:
            creates.setdefault(xid, []).append((lsn, fid))
        for _lsn, xid, dirs in sf.db_drops:
            db_drops.setdefault(xid, set()).update(db for _spc, db in dirs)
        for c in sf.commits:
            xids = [c.xid, *c.subxacts]
            made = sorted(x for i in xids for x in creates.pop(i, []))
            gone_dbs = set().union(*(db_drops.pop(i, set()) for i in xids))
            for t in targets:
                _commit(t, c, made, gone_dbs)


def _commit(t: _Target, c: Commit, made: list[tuple[int, FileId]], gone_dbs: set[int]) -> None:
    hits = [f for f in c.dropped if f in t.heap]
    if hits:
        dbs = {h.db for h in hits}
        successor = next(((lsn, f) for lsn, f in made if f.db in dbs), None)
        finding = Finding(t.table, 0, c.xid, c.lsn, c.time, c.timeline, TRUNCATE if successor else DROP)
        t.findings.append(finding)
        t.others.append((finding, [f for f in c.dropped if f not in t.files]))  # named after the scan
        if successor:  # the table lives on in a new file: follow it, and check whether data was copied
            t.heap.add(successor[1])
            t.files.update(f for _lsn, f in made if f.db in dbs)  # its new index and TOAST files too
            t.checks.append((finding, successor[1], successor[0], c.lsn))
    elif gone_dbs & t.db_oids:
        t.findings.append(Finding(t.table, 0, c.xid, c.lsn, c.time, c.timeline, DROP_DATABASE,
                                  [f"database {t.table.split('.', 1)[0]} with all its tables"]))


def _name_others(maps: list[relmap.StoredMap], targets: list[_Target]) -> None:
    """Each finding's other dropped files, named by the maps (a later backup's name wins): one pass
    over each map, keeping only the files asked about."""
    asked = {f for t in targets for _finding, files in t.others for f in files}
    lookup: dict[FileId, relmap.Relation] = {}
    if asked:
        for m in maps:
            lookup.update((r.file, r) for r in m.relations() if r.file in asked)
    for t in targets:
        for finding, files in t.others:
            finding.also_dropped = _also(files, t, lookup)


def _also(dropped: list[FileId], t: _Target, lookup: dict[FileId, relmap.Relation]) -> list[str]:
    named: set[str] = set()
    unnamed = 0
    for f in dropped:
        r = lookup.get(f)
        if r is None:
            unnamed += 1
        elif f"{r.database}.{r.table}" != t.table:
            named.add(f"{r.database}.{r.table}")
    return sorted(named) + ([f"{unnamed} relation file(s) no backup knows (created since)"] if unnamed else [])


def _classify(arc: WalArchive, targets: list[_Target], folder: Path, seg_size: int, bin_dir: str | None) -> None:
    """A new file that received data in the same transaction is a rewrite (VACUUM FULL, CLUSTER, ALTER
    TABLE), not a TRUNCATE: nothing was lost, so it is no finding."""
    for t in targets:
        for finding, fid, start, end in t.checks:
            tli = finding.timeline
            first = parse_segment_name(segment_of_lsn(tli, start, seg_size), seg_size)[1]
            last = parse_segment_name(segment_of_lsn(tli, end, seg_size), seg_size)[1]
            names = [segment_of_lsn(tli, n * seg_size, seg_size) for n in range(first, last + 1)]
            try:
                for n in names:
                    if not (folder / n).exists():
                        arc.fetch(n, folder / n)
            except NotFoundError:
                continue  # cannot tell: keep it as a TRUNCATE (restoring before it loses nothing)
            if waldrops.wrote_to(folder, tli, start, end, fid, bin_dir=bin_dir):
                t.findings.remove(finding)
            for n in names:
                (folder / n).unlink(missing_ok=True)
