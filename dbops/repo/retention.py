"""Retention: which backups to keep, which packs and WAL that frees; then (separately) deleting.

Policy (``RetentionSettings``), applied to usable (not failed) backups in consistent-time order:

* ``keep_last N``: the N newest are kept;
* ``keep_within S``: every backup newer than ``now - S`` is kept, and so is the newest one
  older than that, so any point in the window stays restorable;
* with both set, a backup either rule keeps is kept; with neither, everything is kept;
* the newest usable backup is always kept, and so is the newest *validated* one (restored from
  storage and checked by a later run): a run of merely stored backups never pushes it out;
* the newest backup before a gap in the WAL archive (recorded by the validation that found the
  gap) is kept: it is the only way back to the times before the gap. With ``keep_within`` this
  holds while the last point it reaches before the gap is inside the window;
* failed backups are removed unless ``keep_failed``.

A pack is removed only when no kept manifest references it. Packs no manifest references
at all (left by an interrupted run) are removed once older than ``orphan_grace``, so a
backup still uploading is never robbed. Plan and execute under the cluster lock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dbops import log
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.catalog import BackupInfo
from dbops.config import RetentionSettings
from dbops.errors import ConflictError
from dbops.pg.lsn import segment_of_lsn
from dbops.storage.base import ObjectInfo, ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup.retention")

ORPHAN_GRACE = 24 * 3600.0


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[str, ...]  # backup ids, oldest first
    remove: tuple[str, ...]  # backup ids, oldest first
    reasons: dict[str, str]  # backup id -> why kept / removed
    remove_packs: tuple[str, ...]  # pack ids
    freed_bytes: int  # size of the packs to remove
    oldest_wal: str | None  # oldest WAL segment any kept usable backup needs (None: no such backup)
    oldest_wal_timeline: int | None = None
    oldest_wal_lsn: int | None = None
    # objects of backups without a manifest: what a prune killed after deleting the manifests left,
    # or (older than orphan_grace) what a backup killed before writing its manifest left
    leftovers: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.remove and not self.remove_packs


@dataclass
class RetentionResult:
    removed_backups: list[str] = field(default_factory=list)
    removed_packs: list[str] = field(default_factory=list)
    deleted_objects: int = 0


def _pack_id(key: str, layout: Layout) -> str | None:
    name = key[len(layout.packs_prefix()):].rpartition("/")[2]
    for ext in (".pack", ".idx"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def plan(
    backups: Sequence[BackupInfo],
    packs_of: Callable[[str], set[str]],
    pack_objects: Sequence[ObjectInfo],
    layout: Layout,
    policy: RetentionSettings,
    *,
    now: float,
    keep_failed: bool = False,
    wal_segment_size: Mapping[str, int] | None = None,
    orphan_grace: float = ORPHAN_GRACE,
) -> RetentionPlan:
    """Pure planning. ``packs_of(id)``: pack ids a backup's manifest references;
    ``pack_objects``: what is stored under the packs prefix (sizes and ages)."""
    ordered = sorted(backups, key=lambda b: (b.consistent_time, b.consistent_lsn, b.backup_id))
    usable = [b for b in ordered if b.usable]
    reasons: dict[str, str] = {}
    keep: set[str] = set()

    def mark(b: BackupInfo, why: str) -> None:
        if b.backup_id not in keep:
            keep.add(b.backup_id)
            reasons[b.backup_id] = why

    if usable:
        mark(usable[-1], "newest usable backup")
    validated = [b for b in usable if b.state == catalog.VALIDATED]
    if validated:
        mark(validated[-1], "newest validated backup")
    if policy.keep_last is None and policy.keep_within is None:
        for b in usable:
            mark(b, "no retention policy set")
    if policy.keep_last is not None:
        for b in usable[-policy.keep_last:]:
            mark(b, f"among the {policy.keep_last} newest")
    if policy.keep_within is not None:
        cutoff = now - policy.keep_within
        older = [b for b in usable if b.consistent_time < cutoff]
        for b in usable:
            if b.consistent_time >= cutoff:
                mark(b, f"within the last {policy.keep_within} s")
        if older:
            mark(older[-1], "newest before the keep_within window (restores its start)")
    for b in usable:  # the newest backup before a WAL gap is the only way back to the times before it
        g = b.wal_gap
        if g is None:
            continue
        before = [u for u in usable if u.consistent_lsn <= g.lsn]
        reach = g.time if g.time is not None else b.consistent_time
        if before and (policy.keep_within is None or reach >= now - policy.keep_within):
            mark(before[-1], f"newest backup before the WAL gap at {g.missing} (the only way back to the times "
                             "before it)")
    for b in ordered:
        if not b.usable:
            if keep_failed:
                mark(b, "failed, kept (keep_failed)")
            else:
                reasons[b.backup_id] = f"failed: {b.status.reason if b.status else ''}".rstrip(": ")
        elif b.backup_id not in keep:
            reasons[b.backup_id] = "outside the retention policy"
    kept = [b for b in ordered if b.backup_id in keep]
    removed = [b for b in ordered if b.backup_id not in keep]

    referenced_by_kept: set[str] = set()
    referenced: set[str] = set()
    for b in ordered:
        ps = packs_of(b.backup_id)
        referenced |= ps
        if b.backup_id in keep:
            referenced_by_kept |= ps
    sizes: dict[str, int] = {}
    newest_obj: dict[str, float] = {}
    for o in pack_objects:
        pid = _pack_id(o.key, layout)
        if pid:
            sizes[pid] = sizes.get(pid, 0) + o.size
            newest_obj[pid] = max(newest_obj.get(pid, 0.0), o.last_modified)
    remove_packs = sorted(
        pid for pid in sizes
        if pid not in referenced_by_kept and (pid in referenced or now - newest_obj[pid] > orphan_grace)
    )

    oldest = min((b for b in kept if b.usable), key=lambda b: b.redo_lsn, default=None)
    wal = None
    if oldest is not None:
        seg = (wal_segment_size or {}).get(oldest.backup_id, 16 * 1024 * 1024)
        wal = segment_of_lsn(oldest.timeline, oldest.redo_lsn, seg)
    return RetentionPlan(
        keep=tuple(b.backup_id for b in kept),
        remove=tuple(b.backup_id for b in removed),
        reasons=reasons,
        remove_packs=tuple(remove_packs),
        freed_bytes=sum(sizes[p] for p in remove_packs),
        oldest_wal=wal,
        oldest_wal_timeline=oldest.timeline if oldest else None,
        oldest_wal_lsn=oldest.redo_lsn if oldest else None,
    )


def build_plan(
    store: ObjectStore,
    layout: Layout,
    policy: RetentionSettings,
    *,
    now: float | None = None,
    keep_failed: bool = False,
    orphan_grace: float = ORPHAN_GRACE,
) -> RetentionPlan:
    """Read the catalog, every manifest and the pack listing; then :func:`plan`."""
    backups = catalog.list_backups(store, layout)
    manifests = dict(zip((b.backup_id for b in backups),
                         catalog.each(lambda b: mf.load_header(store, layout, b.backup_id), backups)))
    now = time.time() if now is None else now
    p = plan(
        backups,
        lambda i: manifests[i].packs(),
        list(store.list(layout.packs_prefix())),
        layout,
        policy,
        now=now,
        keep_failed=keep_failed,
        wal_segment_size={i: m.pg.wal_segment_size for i, m in manifests.items()},
        orphan_grace=orphan_grace,
    )
    return dataclasses.replace(p, leftovers=leftovers(store, layout, set(manifests), now, orphan_grace))


def leftovers(store: ObjectStore, layout: Layout, listed: set[str], now: float, orphan_grace: float) -> tuple[str, ...]:
    """Keys under backups/ of a backup that has no manifest: at once when it has status records (a
    prune deleted its manifest and was killed: status records are written only once a manifest is
    stored), else once its newest object is older than orphan_grace (a backup killed before its
    manifest; never a run still writing one)."""
    base = layout.backups_prefix()
    by_id: dict[str, list[ObjectInfo]] = {}
    for o in store.list(base):
        backup_id = o.key[len(base):].split("/", 1)[0]
        if backup_id not in listed:
            by_id.setdefault(backup_id, []).append(o)
    out: list[str] = []
    for backup_id, objs in sorted(by_id.items()):
        has_status = any(o.key.startswith(layout.status_prefix(backup_id)) for o in objs)
        if has_status or now - max(o.last_modified for o in objs) > orphan_grace:
            out += [o.key for o in objs]
    return tuple(out)


def execute(store: ObjectStore, layout: Layout, p: RetentionPlan) -> RetentionResult:
    """Delete what the plan removes: every manifest first (the backups cease to exist),
    then the rest of those backups' objects, then the packs (data and index). Each step is one
    ``delete_many`` (S3: DeleteObjects, 1,000 keys a request).

    Refuses (ConflictError) when a backup appeared since the plan was made: its manifest
    may reference packs the plan would delete."""
    planned = set(p.keep) | set(p.remove)
    new = [b.backup_id for b in catalog.list_backups(store, layout, with_status=False) if b.backup_id not in planned]
    if new:
        raise ConflictError(
            f"backup {new[0]} appeared after the retention plan was made",
            hint="plan again, under the cluster lock",
        )
    res = RetentionResult()
    # Deletes go in batches (DeleteObjects: up to 1,000 keys a request), in this order.
    manifests = [layout.manifest(b) for b in p.remove]
    store.delete_many(manifests)
    res.deleted_objects += len(manifests)
    for backup_id in p.remove:
        res.removed_backups.append(backup_id)
        _log.info("removed backup %s (%s)", backup_id, p.reasons.get(backup_id, ""))
    rest = [o.key for backup_id in p.remove for o in store.list(layout.backup_prefix(backup_id))]
    rest += [k for k in p.leftovers if k not in set(rest)]
    store.delete_many(rest)
    res.deleted_objects += len(rest)
    _log.debug("deleted the other objects of the removed backups: %d", len(rest))
    store.delete_many([k for pack_id in p.remove_packs for k in (layout.pack(pack_id), layout.pack_index(pack_id))])
    res.deleted_objects += 2 * len(p.remove_packs)
    _log.debug("deleted the packs of the removed backups: %d", len(p.remove_packs))
    res.removed_packs.extend(p.remove_packs)
    return res
