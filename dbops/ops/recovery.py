"""RPO and RTO: the on-call person's two questions, from what dbops already measures.

* **RPO** (how much could be lost right now): the WAL between the primary's current write
  position and the end of the newest segment in the archive, in bytes, and in seconds as the
  age of that newest archived segment while anything is unarchived (an upper bound on how old
  the oldest write at risk is; 0 when everything written is archived). A quiet server with no
  ``archive_timeout`` keeps a few bytes unarchived for a long time: that shows here, honestly.
* **RTO** (how long a restore takes): the newest *measured* restore time - download, WAL fetch,
  start and replay of a backup restored from storage by a validation (``dbops backup``) or by
  ``dbops verify --restore`` - and the backup it belongs to.

Pure functions over :class:`~dbops.ops.wal.status.ArchiveStatus`, the primary's archiver state
(:func:`~dbops.ops.wal.status.archiver_state`) and backup rows (``backup list --json``).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from dbops.pg.lsn import format_lsn, parse_lsn, parse_segment_name


def rpo(st: Any, archiver: dict[str, Any] | None) -> dict[str, Any]:
    """RPO from an ArchiveStatus and the primary's archiver state (None: no reachable primary)."""
    seg_size = st.wal_segment_size
    out: dict[str, Any] = {"seconds": None, "bytes": None, "newest_segment": None, "newest_segment_age": None,
                           "node": None, "timeline": None, "current_lsn": None, "archived_lsn": None, "note": None}
    with_segments = [t for t in st.timelines if t.newest]
    if archiver is None or not archiver.get("current_lsn"):
        newest = max(with_segments, key=lambda t: t.timeline, default=None)
        if newest is not None:
            out.update(newest_segment=newest.newest, newest_segment_age=newest.newest_age, seconds=newest.newest_age)
        out["note"] = "no reachable primary: bytes unknown; seconds are the newest archived segment's age"
        return out
    cur = parse_lsn(archiver["current_lsn"])
    tli = int(archiver["current_wal"][:8], 16) if archiver.get("current_wal") else None
    out.update(node=archiver.get("node"), timeline=tli, current_lsn=format_lsn(cur))
    # The newest archived segment on the primary's timeline, else on the newest timeline before it
    # (just after a promotion, before the new timeline's first segment is archived).
    candidates = [t for t in with_segments if tli is None or t.timeline <= tli]
    newest = max(candidates, key=lambda t: t.timeline, default=None)
    if newest is None:
        out.update(bytes=cur, note="nothing archived yet")
        return out
    _, segno = parse_segment_name(newest.newest, seg_size)
    archived_end = (segno + 1) * seg_size
    at_risk = max(0, cur - archived_end)
    out.update(newest_segment=newest.newest, newest_segment_age=newest.newest_age, archived_lsn=format_lsn(archived_end),
               bytes=at_risk, seconds=0.0 if at_risk == 0 else newest.newest_age)
    return out


def rto(rows: Sequence[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """RTO: the newest measured restore time among backup rows (oldest first), and its backup."""
    now = time.time() if now is None else now
    for r in reversed(rows):
        if r.get("restore_seconds") is not None:
            at = r.get("restore_measured_at")
            return {"seconds": r["restore_seconds"], "backup_id": r["backup_id"], "measured_at": at,
                    "measured_age": round(now - at, 1) if at else None, "note": None}
    return {"seconds": None, "backup_id": None, "measured_at": None, "measured_age": None,
            "note": "no restore measured yet: the second `dbops backup` (or `dbops verify --restore`) measures one"}


def metrics(rpo_: dict[str, Any] | None, rto_: dict[str, Any] | None) -> dict[str, tuple[Any, str]]:
    """Prometheus textfile metrics (for dbops.metrics.write); None values are left out."""
    out: dict[str, tuple[Any, str]] = {}
    if rpo_ is not None:
        out["dbops_rpo_seconds"] = (rpo_["seconds"], "RPO: age of the newest archived segment while WAL is "
                                                     "unarchived (0 when everything is archived)")
        out["dbops_rpo_bytes"] = (rpo_["bytes"], "RPO: bytes of WAL written on the primary and not yet archived")
    if rto_ is not None:
        out["dbops_rto_seconds"] = (rto_["seconds"], "RTO: the newest measured restore time (download, WAL "
                                                     "fetch, start, replay)")
        out["dbops_rto_measured_timestamp_seconds"] = (rto_["measured_at"], "When that restore time was measured")
    return out
