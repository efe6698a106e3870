"""A gap in the WAL archive after a backup is not a bad backup.

A backup run proves the previous backup by replaying the archive from it to a new target. When a
segment on the way is missing (with later ones archived), that replay cannot happen, but the
backup itself may be perfectly good: it is then the only way back to any point before the gap.
So the run proves what can be proved: the backup restores (every chunk checked against its hash)
and replays to its own consistent point in a throwaway instance, passes the checks and stops in
recovery. It is recorded ``validated`` with a ``wal_gap`` detail ("archive complete up to segment
X; point-in-time restore reaches LSN L, last commit at T"), never ``failed``. Retention keeps it
while it is the newest backup before the gap; `backup list` and `status` show the cut-off range.

The next backup cannot be proven by replaying through the gap, so the run takes a fresh full
backup (when ``backup.validation.heal`` is on) and exits 7 naming the gap.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from dbops import log
from dbops.config import Config
from dbops.errors import DbopsError, ValidationError
from dbops.ops.backup.validate import Validation, prove, restore_seconds
from dbops.ops.restore import wal as rwal
from dbops.ops.wal.archive import WalArchive, WalGapError
from dbops.pg.lsn import format_lsn, parse_segment_name, segno_of_lsn
from dbops.phases import Phases
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.storage import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup")


def reach_before_gap(store: ObjectStore, layout: Layout, m: mf.Manifest, gap: WalGapError,
                     scratch: Path) -> catalog.WalGap:
    """How far point-in-time restore from m gets before the gap: the end of the last archived record
    and the last commit (pg_waldump on the last complete segments). Best effort for the commit: when
    the segments cannot be read, the end of the last complete segment is recorded without a time."""
    seg_size = m.pg.wal_segment_size
    until = gap.complete[-1]
    end_lsn = (parse_segment_name(until, seg_size)[1] + 1) * seg_size  # the end of the last complete segment
    t = commit_lsn = None
    try:
        end = rwal.scan_end(WalArchive(store, layout), gap.complete, scratch, seg_size=seg_size,
                            stop_before=segno_of_lsn(m.pg.consistent_lsn, seg_size))
        if end is not None:
            end_lsn = end.end_lsn
            if end.commit is not None and end.commit.lsn > m.pg.consistent_lsn:
                t, commit_lsn = end.commit.time, end.commit.lsn
    except DbopsError as e:
        log.event(_log, logging.WARNING, "could not read the last segments before the gap", error=e.message)
    if t is None:
        t = m.meta.get("last_commit_time") or m.pg.consistent_time  # nothing later was found: the backup's own
        t = float(t) if t is not None else None
    return catalog.WalGap(gap.missing, until, end_lsn, t, commit_lsn)


def prove_before_gap(cfg: Config, store: ObjectStore, layout: Layout, backup_id: str, gap: WalGapError, *,
                     run_id: str, progress=None, byte_progress=None) -> tuple[Validation, catalog.WalGap, dict]:
    """Prove backup_id up to its own consistent point and measure its reach before the gap.

    ValidationError from here is a fault of the backup itself (its content, or the WAL it needs to
    become consistent): the caller marks it failed as for any other validation failure."""
    m = mf.load(store, layout, backup_id)
    if not gap.complete:
        raise ValidationError(f"WAL segment {gap.missing}, needed to restore backup {backup_id} at all, is missing "
                              "from the archive", detail=gap.detail)
    phases = Phases(progress)
    with prove(cfg, store, layout, m, phases, run_id=run_id, name=f"backup-{run_id}-gap",
               byte_progress=byte_progress) as proof:
        val = proof.validation
    with tempfile.TemporaryDirectory(prefix="dbops-gap-", dir=cfg.backup.scratch_dir) as tmp:
        reach = reach_before_gap(store, layout, m, gap, Path(tmp))
    return val, reach, dict(phases.t)


def record(store: ObjectStore, layout: Layout, backup_id: str, val: Validation, reach: catalog.WalGap,
           timings: dict[str, float], *, run_id: str) -> None:
    catalog.record_status(store, layout, backup_id, catalog.VALIDATED, run_id=run_id, phase="validate",
                          timings=timings,
                          detail={"checks": val.checks, "restore_seconds": restore_seconds(timings),
                                  "replayed_to": format_lsn(val.replayed_lsn or 0), "wal_gap": reach.to_dict()})
    log.event(_log, logging.WARNING, "the WAL archive has a gap after the backup; it restores up to the gap",
              backup=backup_id, missing=reach.missing, complete_until=reach.complete_until,
              reach_lsn=format_lsn(reach.lsn))


def describe(reach: catalog.WalGap) -> str:
    """The line `backup list` and `status` show for a backup cut off by a WAL gap."""
    from dbops.ops.restore.target import iso_utc

    when = iso_utc(reach.time) if reach.time is not None else "its consistent point"
    return f"PITR to {when} (LSN {format_lsn(reach.lsn)}), gap from segment {reach.missing}"


def gap_error(backup_id: str, reach: catalog.WalGap, healed_id: str | None) -> ValidationError:
    """Exit 7: the archive is broken, the backup is not."""
    after = (f"a fresh full backup {healed_id} was taken and stored (a backup after the gap cannot be proven "
             "by replaying through it)" if healed_id else
             "no new backup was taken (backup.validation.heal is off): run `dbops backup --full`")
    return ValidationError(
        f"the WAL archive has a gap after backup {backup_id}: segment {reach.missing} is missing",
        detail=f"backup {backup_id} restores and is consistent (recorded validated): archive complete up to "
               f"segment {reach.complete_until}; {describe(reach)}. {after}",
        hint="points in time inside the gap cannot be restored; if the primary's pg_wal (or another archive) "
             f"still holds {reach.missing}, archive it again (`dbops wal-push`). `dbops backup list` shows the "
             "cut-off range; retention keeps this backup while it is the newest before the gap")

