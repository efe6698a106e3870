"""`restore --before-drop TABLE`: the restore target just before the transaction that dropped or
truncated a table, found by name in the archived WAL (dbops.ops.wal.dropfind)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbops.config import Config
from dbops.ops.restore.target import XID, RestoreTarget
from dbops.ops.wal import dropfind


@dataclass
class BeforeDrop:
    target: RestoreTarget
    finding: dropfind.Finding  # the earliest of the chosen transactions: the restore stops before it
    chosen: list[dropfind.Finding]
    searches: list[dropfind.Search]

    def as_dict(self) -> dict[str, Any]:
        return {"stop_before": self.finding.as_dict(), "chosen": [f.as_dict() for f in self.chosen],
                "searches": [s.as_dict() for s in self.searches]}


def resolve(cfg: Config, tables: list[str], occurrence: int | None = None, **kw: Any) -> BeforeDrop:
    """Find each table's drop (the latest, or the N-th) and aim just before the earliest of them.

    The target is the transaction, exclusive: replay stops before its commit, so everything committed
    earlier, in any table, is there. Its commit LSN bounds the backup choice (a backup consistent
    after the drop cannot go back before it)."""
    searches = dropfind.find(cfg, tables, **kw)
    chosen = [s.chosen(occurrence) for s in searches]
    first = min(chosen, key=lambda f: f.commit_lsn)
    target = RestoreTarget(XID, str(first.xid), lsn=first.commit_lsn, inclusive=False)
    return BeforeDrop(target, first, chosen, searches)
