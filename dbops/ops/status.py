"""`dbops status`: one screen about the cluster, built from independent sections.

Extension point: a section is a function ``(Config) -> Section``; add one with
:func:`register` (e.g. the last backup and its validation, the archive's lag) and both
the table view and ``--json`` pick it up. A section that fails shows its error instead
of hiding the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbops.config import Config
from dbops.errors import DbopsError
from dbops.pg.lsn import format_lsn


@dataclass
class Section:
    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    data: Any = None  # what --json prints for this section
    notes: list[str] = field(default_factory=list)
    error: str | None = None


SectionFn = Callable[[Config], Section]
_SECTIONS: list[tuple[str, SectionFn]] = []


def register(name: str, fn: SectionFn) -> None:
    """Add (or replace) a section; sections show in registration order."""
    for i, (n, _) in enumerate(_SECTIONS):
        if n == name:
            _SECTIONS[i] = (name, fn)
            return
    _SECTIONS.append((name, fn))


def collect(cfg: Config) -> list[tuple[str, Section]]:
    out = []
    for name, fn in _SECTIONS:
        try:
            out.append((name, fn(cfg)))
        except DbopsError as e:
            out.append((name, Section(title=name, error=e.message + (f" ({e.detail})" if e.detail else ""))))
    return out


def topology_section(cfg: Config) -> Section:
    from dbops.ops import topology

    topo = topology.discover(cfg)
    sec = Section(title="topology", headers=["NODE", "ADDRESS", "ROLE", "UPSTREAM", "TIMELINE", "LSN",
                                             "REPLAY LAG", "STATE"], data=topo.as_dict())
    for s in topo.nodes:
        lsn = s.current_lsn if s.role == topology.PRIMARY else s.replay_lsn
        lag = topo.replay_lag(s) if s.role == topology.STANDBY else None
        if s.role == topology.PRIMARY:
            a = s.archiver
            state = "archiver failing" if a and a.failing else "ok"
        elif s.role == topology.STANDBY:
            state = (s.receiver.status if s.receiver else "not streaming") + (", replay paused" if s.replay_paused
                                                                                else "")
        else:
            state = s.error or ""
        sec.rows.append([s.name, f"{s.node.host}:{s.node.port}", s.role, s.upstream or "", s.timeline or "",
                         format_lsn(lsn) if lsn is not None else "", "" if lag is None else lag, state])
    if len(topo.primaries) != 1:
        sec.notes.append(f"expected exactly one primary, found {len(topo.primaries)}")
    for s in topo.standbys:
        if topo.primary and s.system_identifier != topo.primary.system_identifier:
            sec.notes.append(f"{s.name} belongs to another cluster (system identifier {s.system_identifier})")
    return sec


register("topology", topology_section)


def backups_section(cfg: Config) -> Section:
    """The newest backups, their state, and when the chain was last proven."""
    from dbops.ops import catalogview

    rows = catalogview.list_rows(cfg)
    sec = Section(title="backups", headers=["BACKUP", "CONSISTENT", "TIMELINE", "STATUS", "RESTORE", "NEW BYTES"],
                  data={"count": len(rows), "newest": rows[-1] if rows else None,
                        "last_validated": next((r for r in reversed(rows) if r["status"] == "validated"), None),
                        "failed": [r["backup_id"] for r in rows if r["status"] == "failed"]})
    import datetime as _dt

    for r in rows[-3:]:
        when = _dt.datetime.fromtimestamp(r["consistent_time"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        sec.rows.append([r["backup_id"], when, r["timeline"], r["status"],
                         "" if r["restore_seconds"] is None else f"{r['restore_seconds']:.1f}s", r["new_bytes"]])
    if not rows:
        sec.notes.append("no backups yet: run `dbops backup`")
    elif sec.data["failed"]:
        sec.notes.append("failed validation: " + ", ".join(sec.data["failed"]))
    cut = [r for r in rows if r.get("pitr_until")]
    sec.data["pitr_cut_off"] = [{"backup_id": r["backup_id"], **r["pitr_until"],
                                 "note": catalogview.pitr_note(r)} for r in cut]
    for r in cut[-1:]:  # the newest backup before the newest gap: how far back-in-time restores reach there
        sec.notes.append(f"WAL gap: backup {r['backup_id']}: {catalogview.pitr_note(r)}; points inside the gap "
                         "cannot be restored (restore exits 7)")
    return sec


def archive_section(cfg: Config) -> Section:
    """Newest archived segment per timeline and its age; gaps since the oldest backup."""
    from dbops.ops.wal import status as walstatus
    from dbops.storage import open_archive

    store, layout = open_archive(cfg.storage)
    start = walstatus.oldest_backup_start(store, layout)
    st = walstatus.archive_status(store, layout, start_segment=start, start_source="oldest backup" if start else None)
    sec = Section(title="archive", headers=["TIMELINE", "SEGMENTS", "NEWEST", "AGE"],
                  data={"timelines": [t.__dict__ for t in st.timelines], "gaps": st.gaps, "gap_count": st.gap_count,
                        "end": st.end})
    for t in st.timelines:
        sec.rows.append([t.timeline, t.segments, t.newest or "", "" if t.newest_age is None else f"{t.newest_age:.0f}s"])
    if st.gap_count:
        sec.notes.append(f"{st.gap_count} segment(s) missing since {st.start}: " + ", ".join(st.gaps[:5]))
    return sec


def rpo_section(cfg: Config) -> Section:
    """RPO: WAL written on the primary and not yet archived, in bytes and seconds."""
    from dbops.ops import recovery
    from dbops.ops.wal import status as walstatus
    from dbops.storage import open_archive
    from dbops.units import human_bytes

    store, layout = open_archive(cfg.storage)
    st = walstatus.archive_status(store, layout)
    r = recovery.rpo(st, walstatus.archiver_state(cfg.nodes))
    sec = Section(title="rpo (what a loss of the primary would lose now)",
                  headers=["SECONDS", "BYTES", "PRIMARY AT", "ARCHIVED TO", "NEWEST ARCHIVED SEGMENT"], data=r)
    sec.rows.append(["-" if r["seconds"] is None else f"{r['seconds']:.1f}",
                     "-" if r["bytes"] is None else f"{r['bytes']} ({human_bytes(r['bytes'])})",
                     f"{r['current_lsn']} on {r['node']} (timeline {r['timeline']})" if r["current_lsn"] else "-",
                     r["archived_lsn"] or "-", r["newest_segment"] or "-"])
    if r["note"]:
        sec.notes.append(r["note"])
    return sec


def rto_section(cfg: Config) -> Section:
    """RTO: the newest measured restore time and the backup it belongs to."""
    import datetime as _dt

    from dbops.ops import catalogview, recovery

    r = recovery.rto(catalogview.list_rows(cfg))
    sec = Section(title="rto (the newest measured restore)", headers=["SECONDS", "BACKUP", "MEASURED"], data=r)
    if r["seconds"] is not None:
        when = (_dt.datetime.fromtimestamp(r["measured_at"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
                if r["measured_at"] else "-")
        sec.rows.append([f"{r['seconds']:.1f}", r["backup_id"], when])
    if r["note"]:
        sec.notes.append(r["note"])
    return sec


register("backups", backups_section)
register("archive", archive_section)
register("rpo", rpo_section)
register("rto", rto_section)
