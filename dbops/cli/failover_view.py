"""What `dbops failover`, `dbops failover --primary-lost` and `dbops rejoin` share: the confirmation,
a plan's checks and steps, a run's phases and verification, and the error that carries the plan and
the report into the JSON error object (dbops.cli.app renders it and turns it into the exit code)."""

from __future__ import annotations

from typing import Any

from dbops.errors import DbopsError


def with_context(e: DbopsError, *, plan: Any = None, report: Any = None) -> DbopsError:
    """The error, carrying the plan and the report for its JSON object (rendered by dbops.cli.app)."""
    e.extra = {"plan": plan.as_dict() if plan else None, "report": report.as_dict() if report else None}
    return e
