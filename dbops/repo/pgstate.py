"""Read a stopped data folder's PostgreSQL state (PG_VERSION + pg_controldata) for the manifest."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dbops.repo.manifest import PgState
from dbops.errors import PreconditionError
from dbops.pg import controldata

STOPPED_STATES = ("shut down", "shut down in recovery")


def from_control(
    cd: controldata.ControlData,
    pg_version: str,
    *,
    consistent_lsn: int | None = None,
    consistent_time: float | None = None,
) -> PgState:
    """PgState from control data. Without explicit values, the snapshot counts as consistent at
    max(checkpoint, minimum recovery end) and at the time of its latest checkpoint."""
    if consistent_lsn is None:
        consistent_lsn = max(cd.checkpoint_lsn, cd.min_recovery_end_lsn)
    if consistent_time is None:
        consistent_time = _parse_ctime(cd.checkpoint_time)
    return PgState(
        pg_version=pg_version,
        system_identifier=cd.system_identifier,
        timeline=cd.timeline,
        redo_lsn=cd.redo_lsn,
        consistent_lsn=consistent_lsn,
        consistent_time=consistent_time,
        wal_segment_size=cd.wal_segment_size,
        data_checksums=cd.data_checksums,
    )


def read(
    data_dir: str,
    *,
    bin_dir: str | None = None,
    consistent_lsn: int | None = None,
    consistent_time: float | None = None,
) -> PgState:
    """PgState of a cleanly stopped data folder; PreconditionError if it is running or crashed."""
    try:
        pg_version = (Path(data_dir) / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        raise PreconditionError(f"{data_dir} is not a PostgreSQL data folder (no PG_VERSION)") from None
    if os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        raise PreconditionError(
            f"{data_dir} has a postmaster.pid: PostgreSQL may be running there",
            hint="a snapshot is taken from a stopped data folder; stop the server first",
        )
    cd = controldata.read(data_dir, bin_dir=bin_dir)
    if cd.state not in STOPPED_STATES:
        raise PreconditionError(
            f"{data_dir} was not cleanly stopped (cluster state: {cd.state})",
            hint="start and stop it cleanly (pg_ctl stop -m fast) before taking a snapshot",
        )
    return from_control(cd, pg_version, consistent_lsn=consistent_lsn, consistent_time=consistent_time)


def _parse_ctime(text: str) -> float:
    """pg_controldata's C-locale '%c' time ('Wed Nov 25 20:03:19 2026', local time)."""
    try:
        return time.mktime(time.strptime(text.strip(), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        raise PreconditionError(
            f"cannot read the checkpoint time {text!r} from pg_controldata",
            hint="pass consistent_time explicitly",
        ) from None
