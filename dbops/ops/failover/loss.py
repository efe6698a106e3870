"""What a `--primary-lost` failover may have lost, stated with LSNs, bytes and times.

The old primary's WAL is known to have reached: what each standby received, and the last
record of the newest archived segment. The new timeline begins at the switch point (the
end of what the candidate replayed). Anything known past the switch point and not on the
candidate is *known* to be lost, and the exit code says so. Commits whose WAL reached
neither a standby nor the archive cannot be counted here: they exist only on the old
primary's disk (`dbops rejoin` lists them if that disk comes back).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from dbops.nodes import NodeController
from dbops.ops.failover.phases import Phase
from dbops.ops.failover.plan import Finding
from dbops.pg import waldump
from dbops.pg.lsn import format_lsn

ARCHIVE = "archive"


@dataclass
class Loss:
    switch_lsn: str | None  # where the new timeline begins: everything before it was recovered
    last_commit_lsn: str | None  # the last recovered commit record
    last_commit_time: str | None  # its commit time (UTC, ISO 8601)
    known_end_lsn: str | None  # the last LSN the old primary is known to have reached
    last_commit_xid: int | None = None
    known_end_sources: list[str] = field(default_factory=list)  # who knew it (standby names, "archive")
    behind_known_end_bytes: int | None = None  # known end minus switch point
    known_lost_bytes: int = 0  # WAL known to exist elsewhere (another standby, the archive) and not recovered
    candidate_unreplayed_bytes: int = 0  # the candidate's own trailing WAL that held no complete record
    archive_checked: bool = False
    archive_beyond_candidate: bool | None = None  # the archive held WAL the candidate had not received
    recovered_from_archive_bytes: int = 0
    possible: bool = False  # exit 15: WAL known to exist was not recovered, or the archive was not readable
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LostReport:
    old_primary: str
    new_primary: str
    outcome: str = "running"  # promoted | cancelled | unknown | running
    old_timeline: int | None = None
    timeline: int | None = None
    fence: dict[str, Any] = field(default_factory=dict)
    restore_command_set: bool = False
    archived_from_standby: list[str] = field(default_factory=list)  # old-timeline segments pushed after promotion
    plan_seconds: float | None = None  # from the command's start to the end of the assessment
    seconds_to_writable: float | None = None  # from the command's start
    total_seconds: float | None = None
    loss: Loss | None = None
    repointed: dict[str, str] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)
    verification: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # steps that failed after promotion: outcome unknown
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.outcome == "promoted" and not (self.loss and self.loss.possible)
        return d


def compute(*, switch: int, candidate: str, candidate_had: int | None, ends: dict[str, int],
            archive_checked: bool, archive_expected: bool, archive_last_record: int | None) -> Loss:
    """Pure: the loss figures from the switch point and every known end.

    `ends` maps a standby name (or ``"archive"``) to how far its copy of the old primary's WAL
    goes; `candidate_had` is what the candidate held before it replayed from the archive;
    `archive_last_record` is the start of the last record of the newest archived segment
    (replayed iff the switch point lies past it).
    """
    known_end = max(ends.values(), default=None)
    sources = sorted(k for k, v in ends.items() if v == known_end) if known_end is not None else []
    loss = Loss(switch_lsn=format_lsn(switch), last_commit_lsn=None, last_commit_time=None,
                known_end_lsn=format_lsn(known_end) if known_end is not None else None, known_end_sources=sources,
                behind_known_end_bytes=max(0, known_end - switch) if known_end is not None else None,
                archive_checked=archive_checked)
    for name, end in ends.items():
        if end <= switch:
            continue
        if name == candidate:  # what it received past its last replayable record: an incomplete record
            loss.candidate_unreplayed_bytes = end - switch
        elif name == ARCHIVE:
            if archive_last_record is not None and archive_last_record >= switch:
                loss.known_lost_bytes = max(loss.known_lost_bytes, end - switch)
                loss.reasons.append(f"the archive holds WAL up to {format_lsn(end)}, past the switch point "
                                    f"{format_lsn(switch)}: it was not replayed")
        else:  # past what the candidate held too (the same incomplete record is no loss)
            extra = end - max(switch, candidate_had or switch)
            if extra > 0:
                loss.known_lost_bytes = max(loss.known_lost_bytes, extra)
                loss.reasons.append(f"{name} received WAL up to {format_lsn(end)}, {extra} bytes more than "
                                    f"{candidate} (switch point {format_lsn(switch)})")
    if archive_last_record is not None:
        loss.archive_beyond_candidate = candidate_had is None or archive_last_record >= candidate_had
        if loss.archive_beyond_candidate and switch > archive_last_record:
            loss.recovered_from_archive_bytes = max(0, switch - (candidate_had or 0))
    elif archive_checked:
        loss.archive_beyond_candidate = False
    if archive_expected and not archive_checked:
        loss.reasons.append("the WAL archive could not be read: WAL archived past the switch point may exist")
    loss.possible = bool(loss.reasons)
    return loss


def for_plan(plan: Any, archive: Any, switch: int) -> Loss:
    """:func:`compute` from a LostPlan (the standbys as assessed) and the archive's end as last read."""
    from dbops.ops.failover.assess import has_lsn

    cand = plan.candidate
    ends = {s.name: v for s in plan.standbys if (v := has_lsn(s)) is not None}
    if archive.end_lsn is not None:
        ends[ARCHIVE] = archive.end_lsn
    return compute(switch=switch, candidate=cand.name, candidate_had=has_lsn(cand), ends=ends,
                   archive_checked=archive.checked, archive_expected=archive.dbops,
                   archive_last_record=archive.last_record_lsn)


def last_recovered_commit(ctl: NodeController, switch: int, *, old_timeline: int, new_timeline: int,
                          seg_size: int, segments: int = 4) -> waldump.XactEnd | None:
    """The last commit before the switch point, read with pg_waldump from the new primary's pg_wal.

    The segment holding the switch point was copied to the new timeline at promotion; the
    ones before it keep the old timeline's name. Reads back at most `segments` segments.
    """
    switch_segno = switch // seg_size
    last = (switch - 1) // seg_size
    for segno in range(last, max(-1, last - segments), -1):
        tli = new_timeline if segno == switch_segno else old_timeline
        res = ctl.waldump("-t", str(tli), "-s", format_lsn(segno * seg_size), "-e", format_lsn(switch),
                          "-r", "Transaction", timeout=120)
        found = waldump.last_commit(waldump.parse(res.stdout + "\n" + res.stderr).records, before=switch)
        if found is not None:
            return found
    return None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def metrics(report: Any) -> dict[str, tuple[float | int | None, str]]:
    """Prometheus textfile values for the last `--primary-lost` failover (see dbops.metrics.write)."""
    loss: Loss | None = report.loss
    return {
        "dbops_failover_last_run_timestamp_seconds": (time.time(), "When the last failover finished."),
        "dbops_failover_success": (1 if report.outcome == "promoted" else 0,
                                   "Whether the last failover promoted a new primary (1) or not (0)."),
        "dbops_failover_primary_lost": (1, "1: the last failover was for a lost primary (--primary-lost)."),
        "dbops_failover_duration_seconds": (report.total_seconds, "Duration of the last failover."),
        "dbops_failover_seconds_to_writable": (report.seconds_to_writable,
                                               "From the start of the command to the new primary taking writes."),
        "dbops_failover_timeline": (report.timeline, "Timeline of the new primary after the last failover."),
        "dbops_failover_loss_possible": (None if loss is None else int(loss.possible),
                                         "1: WAL known to exist was not recovered (exit 15)."),
        "dbops_failover_known_lost_bytes": (None if loss is None else loss.known_lost_bytes,
                                            "WAL bytes known to exist elsewhere and not recovered."),
        "dbops_failover_recovered_from_archive_bytes": (None if loss is None else loss.recovered_from_archive_bytes,
                                                        "WAL bytes the candidate replayed from the archive only."),
    }


__all__ = ["ARCHIVE", "LostReport", "Loss", "compute", "for_plan", "iso", "last_recovered_commit", "metrics"]
