"""Which timeline a restore follows when none is given (``--timeline``).

PostgreSQL's ``recovery_target_timeline = latest`` follows the numerically highest timeline. When
the archive holds competing branches (a failover made timeline 2; later a restored copy was
promoted from an older point and made timeline 3), the highest one is not always the history a
point in time belongs to: replay along timeline 3 leaves timeline 1 at 3's fork point, so the
commits timeline 1 made after that point, and everything on timeline 2, would be silently missing
from a restore to a time at which timeline 3 did not exist yet.

For a time target, the default is therefore the newest timeline whose history (the chain of
history files, parsed strictly) contains a usable backup from before the target and whose every
branch on that chain was made at or before the target (a timeline is made when its history file
is archived: its Last-Modified on the storage server). A branch made after the target cannot hold
the target. The backup's own line always qualifies, so there is always an answer when a backup
fits.

The Last-Modified of a history file is only an upper bound on when its timeline was made: the
archiver uploads it a moment after the promotion, and a commit made on the new timeline within
that moment looks older than the branch. So the timelines skipped for their history time are
returned as well, nearest first: when the chosen timeline's archive ends before the target, the
target can only lie on one of them, and the plan tries them in turn. Other targets (LSN, transaction, restore point, latest) follow the newest timeline, as
PostgreSQL does; ``--timeline N`` chooses explicitly.
"""

from __future__ import annotations

from dbops.ops.restore import wal as rwal
from dbops.ops.restore.target import TIME, RestoreTarget, iso_utc
from dbops.ops.wal.archive import WalArchive
from dbops.pg import walchain
from dbops.repo import catalog


Choice = tuple[int, list[walchain.Span], list[str]]  # (timeline, its chain, notes)


def default_timeline(arc: WalArchive, inv: rwal.Inventory, infos: list[catalog.BackupInfo],
                     target: RestoreTarget) -> tuple[Choice, list[Choice]]:
    """The timeline a restore without --timeline follows, and the ones to try after it.

    The second part lists the newer timelines skipped only because their history file looked
    younger than the target, nearest to the chosen one first (see the module's notes).
    """
    latest = inv.latest_timeline() or (infos[-1].timeline if infos else 1)
    if target.kind != TIME or target.epoch is None:
        return (latest, rwal.chain(arc, latest), []), []
    skipped: list[str] = []
    by_time: list[tuple[int, list[walchain.Span]]] = []
    for tli in sorted(inv.timelines() | {1}, reverse=True):
        spans = rwal.chain(arc, tli)
        made_after = [sp.timeline for sp in spans[1:]
                      if inv.history_times.get(sp.timeline, 0.0) > target.epoch]
        if made_after:
            t = made_after[0]
            skipped.append(f"timeline {tli} (its branch timeline {t} was made at "
                           f"{iso_utc(inv.history_times[t])}, after the target)")
            by_time.append((tli, spans))
            continue
        if any(b.usable and b.consistent_time <= target.epoch and rwal.on_chain(spans, b.timeline, b.consistent_lsn)
               for b in infos):
            notes = []
            if tli != latest:
                notes.append(f"following timeline {tli}, the newest whose history holds the target: not "
                             + "; ".join(skipped) + " (choose another with --timeline N)")
            later = [(t, sp, [f"following timeline {t}: timeline {tli}'s archive ends before the target, so "
                              f"the target lies after timeline {t} was made (its history file was archived "
                              f"a moment later)"])
                     for t, sp in reversed(by_time) if any(s.timeline == tli for s in sp)]
            return (tli, spans, notes), later
        skipped.append(f"timeline {tli} (no usable backup from before the target on its history)")
    return (latest, rwal.chain(arc, latest), []), []  # nothing fits: the backup choice explains why
