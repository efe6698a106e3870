"""The point a backup is proved at: captured on the current primary (under the switch lock, so it
never interleaves with a switchover) and waited for until its segment is archived, or a stored
backup's own consistent point; and the archived WAL from a backup's start to it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dbops import log, proc
from dbops.config import Config, Node
from dbops.errors import DbopsError, NotFoundError, PostgresError, ValidationError
from dbops.ops.wal import archive as arch
from dbops.pg import conn as pgconn
from dbops.pg.inspect import find_primary
from dbops.pg.lsn import format_lsn, parse_lsn, parse_segment_name, segment_name, segment_of_lsn
from dbops.repo import manifest as mf
from dbops.storage import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.lock import SWITCH, ClusterLock

_log = log.get("backup")


@dataclass
class Target:
    lsn: int
    time: float
    timeline: int
    segment: str


PRIMARY_PROBE_INTERVAL = 5.0  # while waiting for the target's segment: is the primary still there?


class ArchiveStalledError(ValidationError):
    """The target's segment did not reach the archive: archiving is stuck (exit 7), which says nothing
    against the previous backup, so it is not marked failed."""


def require_primary_up(primary: Node, segment: str) -> None:
    try:
        with pgconn.session(primary) as c:
            c.execute("SELECT 1")
    except PostgresError as e:
        raise PostgresError(
            f"the primary {primary.name} went away while dbops waited for WAL segment {segment} to be archived",
            detail=e.detail or e.message,
            hint="start the primary again (its archiver then archives the segment) and run dbops backup again; "
                 "nothing was stored by this run",
        ) from None


def archiver_passed(primary: Node, seg: str) -> bool:
    """PostgreSQL's archiver acknowledged seg, so every segment before it too (it archives in order,
    and retries one until it succeeds). The target's object alone is not enough: with an async
    pusher a later segment can be stored while an earlier one is still being retried."""
    from dbops.pg.lsn import SEGMENT_RE

    try:
        with pgconn.session(primary) as c:
            last = c.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
    except PostgresError:
        return False  # the probe in the loop names a primary that went away
    if not last or not SEGMENT_RE.match(last):
        return False
    return last[:8] > seg[:8] or (last[:8] == seg[:8] and last[8:] >= seg[8:])


def capture_target(cfg: Config, *, archive_wait: float, store: ObjectStore, layout: Layout) -> Target:
    """On the current primary (found under the switch lock): CHECKPOINT, note the insert LSN and
    time, switch WAL; then wait until that segment is archived."""
    with ClusterLock(store, layout, SWITCH, command="backup (target capture)", ttl=cfg.storage.lock_ttl,
                     os_user=cfg.os_user):
        try:
            primary = find_primary(cfg.nodes)
        except PostgresError as e:  # it was there when the run began
            raise PostgresError(f"cannot capture the backup's target: {e.message}", detail=e.detail,
                                hint="the primary went away mid-run; start it again and run dbops backup again "
                                     "(nothing was stored by this run)") from None
        with pgconn.session(primary) as c:
            c.execute("CHECKPOINT")
            row = c.execute("SELECT pg_current_wal_insert_lsn()::text, extract(epoch from clock_timestamp())::float8, "
                            "(SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
            c.execute("SELECT pg_switch_wal()")
    lsn, t, tli = parse_lsn(row[0]), float(row[1]), int(row[2])
    seg = segment_of_lsn(tli, lsn)
    key = layout.wal_key(seg)
    deadline = time.monotonic() + archive_wait
    next_probe = time.monotonic() + PRIMARY_PROBE_INTERVAL
    while store.head(key) is None or not archiver_passed(primary, seg):
        now = time.monotonic()
        if now > deadline:
            raise ArchiveStalledError(
                f"WAL segment {seg} (holding the backup's target {format_lsn(lsn)}) did not reach the archive "
                f"within {archive_wait:.0f} s",
                hint="is archiving working? `dbops wal status` and the primary's log show why not",
            )
        if now > next_probe:
            require_primary_up(primary, seg)
            next_probe = now + PRIMARY_PROBE_INTERVAL
        time.sleep(0.2)
    log.event(_log, logging.INFO, "target captured", lsn=format_lsn(lsn), timeline=tli, segment=seg)
    return Target(lsn=lsn, time=t, timeline=tli, segment=seg)


def own_target(m: mf.Manifest) -> Target:
    """A stored backup's own consistent point, as a replay target."""
    seg = segment_of_lsn(m.pg.timeline, m.pg.consistent_lsn, m.pg.wal_segment_size)
    return Target(lsn=m.pg.consistent_lsn, time=m.pg.consistent_time, timeline=m.pg.timeline, segment=seg)


def fetch_wal(cfg: Config, store: ObjectStore, layout: Layout, start_segment: str, target: Target,
              wal: Path) -> None:
    """The archived WAL from start_segment to the target's segment, verified, into wal (for replay).
    Segments already there are kept (see fetch_wal_ahead); whatever else is there, removed."""
    try:
        got = arch.fetch_range(store, layout, start_segment, target.segment, wal,
                               parallel=max(2, cfg.archive.parallel))
    except NotFoundError as e:
        raise ValidationError(f"WAL needed for replay is missing from the archive: {e.message}",
                              detail=e.detail) from None
    needed = set(got.segments) | set(got.histories)
    for f in wal.iterdir():
        if f.name in needed:
            proc.chown_to(f, cfg.os_user)
        else:  # fetched ahead past the target, or on a timeline the target left
            f.unlink()


def fetch_wal_ahead(cfg: Config, store: ObjectStore, layout: Layout, start_segment: str, seg_size: int,
                    wal: Path, enough: threading.Event) -> None:
    """While the target is still being captured: the segments archived so far, from start_segment on
    (its timeline), verified, into wal; until one is not archived (yet) or ``enough`` is set (a batch
    already asked for still lands). Best effort: fetch_wal, once the target is known, fetches what is
    missing and reports what is wrong."""
    archive = arch.WalArchive(store, layout)
    parallel = max(2, cfg.archive.parallel)
    tli, segno = parse_segment_name(start_segment, seg_size)

    def one(name: str) -> bool:
        try:
            archive.fetch(name, wal / name)
        except DbopsError:
            return False
        return True

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="dbops-wal-ahead") as pool:
        while not enough.is_set():
            batch = [segment_name(tli, segno + i, seg_size) for i in range(parallel)]
            if not all(pool.map(one, [n for n in batch if not (wal / n).exists()])):
                return
            segno += parallel


def capture_fetching_ahead(cfg: Config, store: ObjectStore, layout: Layout, start_segment: str, seg_size: int,
                           wal: Path, capture: Callable[[], Target]) -> Target:
    """``capture()`` (on the primary: :func:`capture_target`), while the segments archived so far from
    start_segment on are fetched into wal (:func:`fetch_wal_ahead`): :func:`fetch_wal` then fetches
    only the rest."""
    enough = threading.Event()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-wal-ahead") as ahead:
        ahead.submit(fetch_wal_ahead, cfg, store, layout, start_segment, seg_size, wal, enough)
        try:
            return capture()
        finally:
            enough.set()
