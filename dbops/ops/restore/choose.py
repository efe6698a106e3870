"""Which backup a restore starts from: the newest usable one (stored or validated, not marked
failed) that holds no commit after the target (time targets) or is consistent at or before it (LSN
targets), and whose timeline leads to the target timeline.

Every stored backup was built from an instance that was started and checked (a first full in its
own run; an incremental is the previous backup restored, caught up by replay and checked), so the
newest fitting one is chosen: it leaves the least WAL to replay. What a stored backup has not yet
proven is the round trip through storage, and a restore verifies every block's hash anyway. When
the chosen backup is not validated, the newest older validated one that fits is the *fallback*: the
restore starts over from it when the chosen one turns out damaged in storage
(:mod:`dbops.ops.restore.run`). A backup whose manifest header cannot be read is passed over here
already, and the plan's notes say so. ``--backup ID`` picks exactly that backup, with no fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbops import log
from dbops.errors import NotFoundError, PreconditionError, TargetError, ValidationError
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.target import LSN, TIME, XID, RestoreTarget, iso_utc
from dbops.pg import walchain
from dbops.pg.lsn import format_lsn
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.storage import ObjectStore
from dbops.storage.layout import Layout


@dataclass(frozen=True)
class BackupChoice:
    backup_id: str
    state: str
    timeline: int
    redo_lsn: int
    consistent_lsn: int
    consistent_time: float
    last_commit_time: float | None  # newest commit the snapshot holds (None: none replayed into it)
    logical_size: int
    pg_version: str

    def as_dict(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "state": self.state, "timeline": self.timeline,
                "redo_lsn": format_lsn(self.redo_lsn), "consistent_lsn": format_lsn(self.consistent_lsn),
                "consistent_time": iso_utc(self.consistent_time), "last_commit_time": iso_utc(self.last_commit_time),
                "logical_size": self.logical_size}


class Backups:
    """The catalog with manifests loaded on demand (each at most once)."""

    def __init__(self, store: ObjectStore, layout: Layout):
        self.store, self.layout = store, layout
        self.infos = catalog.list_backups(store, layout)
        self._manifests: dict[str, mf.Manifest] = {}
        self.damaged: dict[str, ValidationError] = {}  # backups whose manifest header did not read

    def readable(self, b: catalog.BackupInfo) -> BackupChoice | None:
        """The backup's choice, or None when its manifest is damaged in storage (kept in `damaged`)."""
        if b.backup_id in self.damaged:
            return None
        try:
            return self.choice(b)
        except ValidationError as e:
            self.damaged[b.backup_id] = e
            log.get("restore").warning("backup %s is passed over: its manifest is damaged in storage: %s",
                                       b.backup_id, e.message + (f" ({e.detail})" if e.detail else ""))
            return None

    def manifest(self, backup_id: str) -> mf.Manifest:
        if backup_id not in self._manifests:
            self._manifests[backup_id] = mf.load_header(self.store, self.layout, backup_id)
        return self._manifests[backup_id]

    def choice(self, b: catalog.BackupInfo) -> BackupChoice:
        m = self.manifest(b.backup_id)
        lct = m.meta.get("last_commit_time")
        return BackupChoice(b.backup_id, b.state, m.pg.timeline, m.pg.redo_lsn, m.pg.consistent_lsn,
                            m.pg.consistent_time, float(lct) if lct is not None else None, m.logical_size,
                            m.pg.pg_version)


def newest_commit_bound(b: BackupChoice) -> float:
    """No commit in the snapshot is later than this: its last replayed commit, else its consistent time."""
    return b.last_commit_time if b.last_commit_time is not None else b.consistent_time


def fits(b: BackupChoice, target: RestoreTarget) -> bool:
    """Whether replay from this backup can stop at the target (it holds nothing after it)."""
    if target.kind == TIME:
        bound = newest_commit_bound(b)
        return bound <= target.epoch if target.inclusive else bound < target.epoch
    if target.kind == LSN:
        return b.consistent_lsn <= target.lsn
    if target.kind == XID and target.lsn is not None:  # --before-drop knows where the commit is
        return b.consistent_lsn < target.lsn
    return True


def earliest(b: BackupChoice) -> dict[str, Any]:
    return {"backup_id": b.backup_id, "time": iso_utc(newest_commit_bound(b)), "lsn": format_lsn(b.consistent_lsn)}


@dataclass(frozen=True)
class Picked:
    chosen: BackupChoice
    oldest: BackupChoice  # the oldest usable backup on the chain (the earliest reachable point)
    fallback: BackupChoice | None  # an older validated backup that fits, when `chosen` is not validated
    notes: list[str]


def pick(bk: Backups, spans: list[walchain.Span], target: RestoreTarget, backup_id: str | None = None, *,
         fallback_from: str | None = None) -> Picked:
    """The backup to restore (see the module docstring); `backup_id`: the one asked for (--backup),
    or with `fallback_from` (the damaged backup's ID) the fallback a restore is starting over from."""
    on_chain = [b for b in bk.infos if rwal.on_chain(spans, b.timeline, b.consistent_lsn)]
    usable = [b for b in on_chain if b.usable]
    tli = spans[-1].timeline
    if backup_id:
        b = next((x for x in bk.infos if x.backup_id == backup_id), None)
        if b is None:
            raise NotFoundError(f"no backup {backup_id}", hint="`dbops backup list` shows the backups")
        if not b.usable:
            raise PreconditionError(f"backup {b.backup_id} is marked failed: {b.status.reason if b.status else ''}",
                                    hint="choose another backup, or leave out --backup")
        if b not in on_chain:
            raise TargetError(f"backup {b.backup_id} (timeline {b.timeline}, {format_lsn(b.consistent_lsn)}) is not "
                              f"on the history of timeline {tli}",
                              hint="it belongs to a branch that timeline does not follow")
        c = bk.choice(b)
        if not fits(c, target):
            raise TargetError(f"backup {b.backup_id} holds changes after the target {target.describe()}",
                              detail=f"its last commit is at {iso_utc(newest_commit_bound(c))}, consistent at "
                                     f"{format_lsn(c.consistent_lsn)} ({iso_utc(c.consistent_time)})",
                              hint="choose an older backup, or leave out --backup")
        oldest = next((x for x in map(bk.readable, usable) if x is not None), c)
        note = (f"backup {b.backup_id} ({b.state}) is the fallback: backup {fallback_from} is damaged in storage"
                if fallback_from else f"backup {b.backup_id} chosen with --backup")
        return Picked(c, oldest, None, [note])
    if not usable:
        failed = [b.backup_id for b in on_chain if not b.usable]
        raise TargetError(f"no usable backup on the history of timeline {tli}",
                          detail=f"failed backups: {', '.join(failed)}" if failed else "no backup at all there",
                          hint="run `dbops backup` (it heals a failed chain with a fresh full backup)")
    chosen: BackupChoice | None = None
    fallback: BackupChoice | None = None
    for b in reversed(usable):  # newest first
        if chosen is not None and b.state != catalog.VALIDATED:
            continue  # only a validated backup serves as the fallback
        c = bk.readable(b)
        if c is None or not fits(c, target):
            continue
        if chosen is None:
            chosen = c
            if c.state == catalog.VALIDATED:
                break
        else:
            fallback = c
            break
    oldest = next((x for x in map(bk.readable, usable) if x is not None), None)
    damaged = [f"backup {i} is passed over: its manifest is damaged in storage: {e.message}"
               + (f" ({e.detail})" if e.detail else "") for i, e in bk.damaged.items()]
    if oldest is None or (chosen is None and damaged):
        raise ValidationError(f"no readable backup fits the target {target.describe()}",
                              detail="; ".join(damaged),
                              hint="run `dbops verify` and `dbops backup` (it heals a failed chain with a fresh "
                                   "full backup)")
    if chosen is None:
        raise TargetError(
            f"the target {target.describe()} is before the oldest usable backup",
            detail=f"the oldest backup {oldest.backup_id} is consistent at {format_lsn(oldest.consistent_lsn)} "
                   f"({iso_utc(oldest.consistent_time)}), its last commit at "
                   f"{iso_utc(oldest.last_commit_time) or 'an unrecorded time before that'}; "
                   f"the earliest reachable point is {earliest(oldest)['time']} (LSN {earliest(oldest)['lsn']})",
            hint="restore to a later point, or keep backups longer (backup.retention)")
    notes = damaged
    if chosen.state != catalog.VALIDATED:
        notes.append(f"backup {chosen.backup_id} is the newest that fits: stored (started and checked when taken), "
                     "not yet validated by a restore from storage; every block is verified as it is downloaded")
        notes.append(f"fallback: validated backup {fallback.backup_id}, restored instead if {chosen.backup_id} "
                     "turns out damaged in storage" if fallback else
                     "no validated backup fits the target: there is no fallback if this one is damaged")
    return Picked(chosen, oldest, fallback, notes)
