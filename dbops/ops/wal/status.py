"""`wal status`: what the archive holds, how fresh it is, whether anything is missing.

* newest segment and its age per timeline (ages against the storage server's clock);
* the primary's archiver (pg_stat_archiver) and, when the primary's data folder is on
  this host, its spool (pusher running, failures);
* gaps: every segment replay needs from the start (the oldest backup's start, else the
  oldest archived segment) to the newest one, following timeline history.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dbops import log
from dbops.config import Config, Node
from dbops.errors import DbopsError, NotFoundError, ValidationError
from dbops.pg import walchain
from dbops.ops.wal.archive import WalArchive
from dbops.pg.lsn import (
    BACKUP_LABEL_RE,
    DEFAULT_SEGMENT_SIZE,
    HISTORY_RE,
    PARTIAL_RE,
    SEGMENT_RE,
    format_lsn,
    parse_history,
    parse_segment_name,
    segment_of_lsn,
)
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("walstatus")
MAX_LISTED_GAPS = 200


@dataclass
class TimelineStatus:
    timeline: int
    segments: int
    oldest: str | None
    newest: str | None
    newest_age: float | None  # seconds
    partial: list[str] = field(default_factory=list)
    has_history: bool = False


@dataclass
class ArchiveStatus:
    timelines: list[TimelineStatus]
    start: str | None
    start_source: str  # "given" | "oldest backup" | "oldest archived segment" | "none"
    end: str | None
    needed: int
    gaps: list[str]
    gap_count: int
    histories: list[str]
    backup_labels: int
    system_identifier: str | None
    wal_segment_size: int
    archiver: dict[str, Any] | None = None
    spool: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.gap_count == 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def archive_status(store: ObjectStore, layout: Layout, *, start_segment: str | None = None,
                   start_source: str | None = None) -> ArchiveStatus:
    """Inventory of the archive and its gaps from start_segment (default: oldest archived) to the newest."""
    arc = WalArchive(store, layout)
    owner = arc.read_identity()
    seg_size = owner.wal_segment_size if owner else DEFAULT_SEGMENT_SIZE
    now = store.server_time() or time.time()
    segs: dict[int, dict[int, tuple[str, float]]] = {}
    partial: dict[int, list[str]] = {}
    histories: list[str] = []
    labels = 0
    for obj in store.list(layout.wal_prefix()):
        name = layout.wal_name_of(obj.key) or ""
        if SEGMENT_RE.match(name):
            tli, segno = parse_segment_name(name, seg_size)
            segs.setdefault(tli, {})[segno] = (name, obj.last_modified)
        elif PARTIAL_RE.match(name):
            partial.setdefault(int(name[:8], 16), []).append(name)
        elif HISTORY_RE.match(name):
            histories.append(name)
        elif BACKUP_LABEL_RE.match(name):
            labels += 1
    hist_tlis = {int(h[:8], 16) for h in histories}
    tlis = sorted(set(segs) | set(partial))
    timelines = []
    for tli in tlis:
        by_no = segs.get(tli, {})
        nos = sorted(by_no)
        newest = by_no[nos[-1]] if nos else None
        timelines.append(TimelineStatus(
            timeline=tli, segments=len(nos), oldest=by_no[nos[0]][0] if nos else None,
            newest=newest[0] if newest else None,
            newest_age=round(max(0.0, now - newest[1]), 1) if newest else None,
            partial=sorted(partial.get(tli, [])), has_history=tli in hist_tlis))

    present = {name for per in segs.values() for name, _ in per.values()}
    gaps: list[str] = []
    needed = 0
    end = start = None
    source = "none"
    if segs:
        end_tli = max(segs)
        end = segs[end_tli][max(segs[end_tli])][0]
        spans = walchain.chain(end_tli, [])
        if end_tli > 1:
            try:
                text = arc.read_small(walchain.history_name(end_tli)).decode(errors="replace")
                spans = walchain.chain(end_tli, parse_history(text))
            except NotFoundError:
                gaps.append(walchain.history_name(end_tli))
        chain_tlis = {sp.timeline for sp in spans}
        if start_segment:
            start, source = start_segment, start_source or "given"
        else:
            candidates = [(no, name) for tli in chain_tlis for no, (name, _) in segs.get(tli, {}).items()]
            start, source = min(candidates)[1], "oldest archived segment"
        for sp in spans[1:]:  # every timeline switch needs its history file
            if walchain.history_name(sp.timeline) not in histories and walchain.history_name(sp.timeline) not in gaps:
                gaps.append(walchain.history_name(sp.timeline))
        wanted = walchain.needed_segments(start, end, spans, seg_size)
        needed = len(wanted)
        gaps.extend(n for n in wanted if n not in present)
    return ArchiveStatus(
        timelines=timelines, start=start, start_source=source, end=end, needed=needed,
        gaps=gaps[:MAX_LISTED_GAPS], gap_count=len(gaps), histories=sorted(histories), backup_labels=labels,
        system_identifier=str(owner.system_identifier) if owner else None, wal_segment_size=seg_size)


def oldest_backup_start(store: ObjectStore, layout: Layout) -> str | None:
    """The segment the oldest usable backup needs first (its checkpoint's REDO), or None without backups."""
    from dbops.repo import catalog

    backups = [b for b in catalog.list_backups(store, layout) if b.usable]
    if not backups:
        return None
    owner = WalArchive(store, layout).read_identity()
    seg_size = owner.wal_segment_size if owner else DEFAULT_SEGMENT_SIZE
    return segment_of_lsn(backups[0].timeline, backups[0].redo_lsn, seg_size)


def require_no_gaps(st: ArchiveStatus) -> None:
    if st.gap_count:
        shown = ", ".join(st.gaps[:20]) + (f" and {st.gap_count - 20} more" if st.gap_count > 20 else "")
        raise ValidationError(
            f"the WAL archive has {st.gap_count} gap(s): {shown}",
            detail=f"every segment from {st.start} ({st.start_source}) to {st.end} must be archived",
            hint="if PostgreSQL still has them, archiving catches up by itself; otherwise take a new backup "
                 "so restores no longer need the missing WAL",
        )


# --------------------------------------------------------------------------- the primary's side


def archiver_state(nodes: tuple[Node, ...] | list[Node]) -> dict[str, Any] | None:
    """pg_stat_archiver of the first reachable node that is not in recovery (None when none is)."""
    from dbops.pg.inspect import PRIMARY, probe

    for node in nodes:
        st = probe(node, tuple(nodes))
        if st.role != PRIMARY or st.archiver is None:
            if st.error:
                _log.debug("archiver state from %s: %s", node.name, st.error)
            continue
        a = st.archiver
        return {"archived_count": a.archived_count, "last_archived_wal": a.last_archived_wal,
                "last_archived_time": a.last_archived_time, "failed_count": a.failed_count,
                "last_failed_wal": a.last_failed_wal, "last_failed_time": a.last_failed_time,
                "archive_mode": st.settings.get("archive_mode"), "archive_command": st.settings.get("archive_command"),
                "current_wal": st.current_wal,
                "current_lsn": format_lsn(st.current_lsn) if st.current_lsn is not None else None,
                "ready_count": a.ready_count, "node": node.name, "data_dir": node.data_dir}
    return None


def spool_state(cfg: Config, data_dir: str | None) -> dict[str, Any] | None:
    """The primary's local spool, when its data folder is readable from here."""
    from pathlib import Path

    from dbops.ops.wal.spool import spool_for

    if not data_dir:
        return None
    try:
        return spool_for(cfg.archive, Path(data_dir), cfg.storage).state()
    except (DbopsError, OSError):
        return None


# --------------------------------------------------------------------------- Prometheus textfile


def metrics_text(st: ArchiveStatus, cluster: str) -> str:
    """Prometheus textfile metrics; every one carries the cluster label."""
    c = f'cluster="{cluster}"'

    def metric(name: str, help_: str, samples: list[tuple[str, float]]) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        return out + [f"{name}{{{c}{',' + labels if labels else ''}}} {value}" for labels, value in samples]

    lines = metric("dbops_wal_archive_ok", "1 when no WAL file is missing between the start and the newest segment",
                   [("", 1 if st.ok else 0)])
    lines += metric("dbops_wal_archive_gaps", "missing WAL files (segments and history files)", [("", st.gap_count)])
    lines += metric("dbops_wal_newest_segment_age_seconds", "age of the newest archived segment per timeline",
                    [(f'timeline="{t.timeline}"', t.newest_age) for t in st.timelines if t.newest_age is not None])
    lines += metric("dbops_wal_segments", "archived segments per timeline",
                    [(f'timeline="{t.timeline}"', t.segments) for t in st.timelines])
    from dbops.ops import recovery

    rpo = recovery.rpo(st, st.archiver)
    for name, (value, help_) in recovery.metrics(rpo, None).items():
        if value is not None:
            lines += metric(name, help_, [("", value)])
    a = st.archiver
    if a:
        lines += metric("dbops_wal_archiver_archived_count", "WAL files archived (pg_stat_archiver)",
                        [("", a.get("archived_count") or 0)])
        lines += metric("dbops_wal_archiver_failed_count", "failed archive attempts (pg_stat_archiver)",
                        [("", a.get("failed_count") or 0)])
        lines += metric("dbops_wal_archiver_ready_count", "WAL files waiting to be archived (.ready)",
                        [("", a.get("ready_count") or 0)])
        for key in ("last_archived_time", "last_failed_time"):
            if a.get(key):
                lines += metric(f"dbops_wal_archiver_{key}_seconds", f"pg_stat_archiver {key} (epoch seconds)",
                                [("", a[key])])
    return "\n".join(lines) + "\n"
