"""What a switchover reports: its phases with their times, the outcome, the verification, and the
Prometheus textfile values of the last run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dbops.errors import DbopsError
from dbops.ops.failover.phases import Phase
from dbops.ops.failover.plan import Finding


@dataclass
class Report:
    old_primary: str
    new_primary: str
    outcome: str = "running"  # succeeded | rolled_back | unknown | cancelled | running
    old_timeline: int | None = None
    timeline: int | None = None
    shutdown_checkpoint_lsn: str | None = None
    switch_lsn: str | None = None
    write_unavailable_seconds: float | None = None
    total_seconds: float | None = None
    rewind: dict[str, Any] | None = None
    phases: list[Phase] = field(default_factory=list)
    verification: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.outcome == "succeeded"
        return d


def attach(err: DbopsError, report: Any) -> DbopsError:
    """The error, carrying the run's report (a switchover's, --primary-lost's, rejoin's): the CLI prints it
    and puts it into the JSON error object."""
    err.report = report  # type: ignore[attr-defined]
    return err


def metrics(report: Report) -> dict[str, tuple[float | int | None, str]]:
    """Prometheus textfile values for the last switchover (see dbops.metrics.write)."""
    return {
        "dbops_failover_last_run_timestamp_seconds": (time.time(), "When the last switchover finished."),
        "dbops_failover_success": (1 if report.outcome == "succeeded" else 0,
                                   "Whether the last switchover succeeded (1) or not (0)."),
        "dbops_failover_write_unavailable_seconds": (report.write_unavailable_seconds,
                                                     "Write-unavailability window of the last switchover."),
        "dbops_failover_duration_seconds": (report.total_seconds, "Duration of the last switchover."),
        "dbops_failover_timeline": (report.timeline, "Timeline of the new primary after the last switchover."),
    }
