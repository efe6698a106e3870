"""Inspection and upkeep of the backup catalog: list, show, prune, verify."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dbops import log
from dbops.repo import catalog
from dbops.repo import retention
from dbops.repo import manifest as mf
from dbops.repo.verify import verify_backup
from dbops.config import Config
from dbops.ops.backup.validate import prove, restore_seconds
from dbops.phases import Phases
from dbops.errors import NotFoundError, UsageError, ValidationError
from dbops.storage.guard import GuardedStore
from dbops.storage.lock import BACKUP, ClusterLock
from dbops.pg.lsn import format_lsn, parse_lsn, parse_segment_name
from dbops.storage import ObjectStore, open_archive
from dbops.storage.layout import Layout

_log = log.get("catalog")


def _open(cfg: Config, store: ObjectStore | None = None) -> tuple[ObjectStore, Layout]:
    return open_archive(cfg.storage, store)


def _measured(status: catalog.StatusRecord | None,
              history: list[catalog.StatusRecord] | None = None) -> catalog.StatusRecord | None:
    """The newest validation record with timings: the newest measured restore of this backup."""
    for rec in reversed(history or ([status] if status else [])):
        if rec and rec.state == catalog.VALIDATED and rec.timings:
            return rec
    return None


def _restore_seconds(status: catalog.StatusRecord | None, history: list[catalog.StatusRecord] | None = None) -> float | None:
    rec = _measured(status, history)
    return restore_seconds(rec.timings) if rec else None


def list_rows(cfg: Config, store: ObjectStore | None = None) -> list[dict[str, Any]]:
    store, layout = _open(cfg, store)
    rows = []
    for b in catalog.list_backups(store, layout, with_status=False):
        if b.referenced_bytes is None:  # an older manifest: its summary lacks these, so read it
            b = catalog.info_of(mf.load_header(store, layout, b.backup_id))
        history = catalog.statuses(store, layout, b.backup_id)
        latest = history[-1] if history else None
        measured = _measured(latest, history)
        rows.append({
            "backup_id": b.backup_id,
            "kind": b.kind,
            "parent_id": b.parent_id,
            "created": b.created,
            "consistent_time": b.consistent_time,
            "consistent_lsn": format_lsn(b.consistent_lsn),
            "timeline": b.timeline,
            "logical_size": b.logical_size,
            "stored_size": b.referenced_bytes,
            "new_bytes": b.stored_bytes,
            "status": latest.state if latest else catalog.STORED,
            "status_reason": latest.reason if latest else None,
            "restore_seconds": _restore_seconds(latest, history),
            "restore_measured_at": measured.at if measured else None,
            "wal_gap": (g.to_dict() if (g := catalog.wal_gap_of(latest)) else None),
        })
    _cut_off(rows)
    return rows


def _cut_off(rows: list[dict[str, Any]]) -> None:
    """pitr_until on every backup whose point-in-time range a recorded WAL gap cuts off: how far
    replay from it gets (the gap found after the newest of them applies to all older ones too)."""
    gaps = sorted((r["wal_gap"] for r in rows if r["wal_gap"]), key=lambda g: parse_lsn(g["lsn"]))
    for r in rows:
        lsn = parse_lsn(r["consistent_lsn"])
        g = next((g for g in gaps if parse_lsn(g["lsn"]) >= lsn), None)
        r["pitr_until"] = None if g is None else {
            "segment": g["complete_until"], "lsn": g["lsn"], "time": g["time"], "gap_from": g["missing"]}


def pitr_note(row: dict[str, Any]) -> str | None:
    """'PITR to 2026-11-29T23:10:02Z (LSN 0/3000120), gap from segment X' for a cut-off backup."""
    from dbops.ops.restore.target import iso_utc

    u = row.get("pitr_until")
    if not u:
        return None
    when = iso_utc(u["time"]) if u["time"] is not None else "its consistent point"
    return f"PITR to {when} (LSN {u['lsn']}), gap from segment {u['gap_from']}"


def resolve_id(store: ObjectStore, layout: Layout, backup_id: str | None) -> str:
    backups = catalog.list_backups(store, layout, with_status=False)
    if not backups:
        raise NotFoundError("there are no backups yet", hint="run `dbops backup`")
    if backup_id in (None, "latest"):
        return backups[-1].backup_id
    if backup_id not in {b.backup_id for b in backups}:
        raise NotFoundError(f"no backup {backup_id}", hint="`dbops backup list` shows the backups")
    return backup_id


def show(cfg: Config, backup_id: str, store: ObjectStore | None = None) -> dict[str, Any]:
    store, layout = _open(cfg, store)
    bid = resolve_id(store, layout, backup_id)
    m = mf.load_header(store, layout, bid)
    history = catalog.statuses(store, layout, bid)
    latest = history[-1] if history else None
    return {
        "backup_id": bid,
        "kind": m.meta.get("kind"),
        "parent_id": m.parent_id,
        "status": latest.state if latest else catalog.STORED,
        "created": m.created,
        "consistent_time": m.pg.consistent_time,
        "consistent_lsn": format_lsn(m.pg.consistent_lsn),
        "redo_lsn": format_lsn(m.pg.redo_lsn),
        "timeline": m.pg.timeline,
        "pg_version": m.pg.pg_version,
        "system_identifier": m.pg.system_identifier,
        "data_checksums": m.pg.data_checksums,
        "dbops_version": m.dbops_version,
        "files": m.entry_count if m.entry_count is not None else sum(1 for _ in m.entries()),
        "logical_size": m.logical_size,
        "stored_size": m.referenced_bytes(),
        "new_bytes": m.stored_bytes,
        "counts": m.counts,
        "timings": m.timings,
        "meta": m.meta,
        "restore_seconds": _restore_seconds(latest, history),
        "tablespaces": [t.to_dict() for t in m.tablespaces],
        "history": [h.to_dict() for h in history],
    }


def _wal_to_remove(store: ObjectStore, layout: Layout, oldest: str | None, seg_size: int) -> list[str]:
    """WAL segment objects (any timeline) wholly before the oldest kept backup's redo segment.
    History files are always kept: they are tiny and replay needs them to follow timelines."""
    if not oldest:
        return []
    _, oldest_no = parse_segment_name(oldest[:24], seg_size)
    out = []
    for o in store.list(layout.wal_prefix()):
        name = layout.wal_name_of(o.key)
        if name is None or name.endswith(".history"):
            continue
        try:
            _, segno = parse_segment_name(name[:24], seg_size)
        except ValueError:
            continue
        if segno < oldest_no:
            out.append(o.key)
    return out


def _plan_with_wal(store: ObjectStore, layout: Layout, policy, now: float | None):
    p = retention.build_plan(store, layout, policy, now=now)
    seg_size = 16 * 1024 * 1024
    if p.keep:
        seg_size = mf.load_header(store, layout, p.keep[0]).pg.wal_segment_size
    return p, _wal_to_remove(store, layout, p.oldest_wal, seg_size)


def _summary(p: retention.RetentionPlan, wal: list[str], *, confirmed: bool) -> dict[str, Any]:
    return {"confirmed": confirmed, "keep": list(p.keep), "remove": list(p.remove), "reasons": p.reasons,
            "packs": len(p.remove_packs), "freed_bytes": p.freed_bytes, "oldest_wal": p.oldest_wal,
            "wal_segments": len(wal)}


def apply_retention(store: ObjectStore, layout: Layout, policy, *, now: float | None = None) -> dict[str, Any]:
    """Plan and delete what the retention policy lets go; the caller holds the backup lock.

    Used by `backup prune --confirm` and, with backup.retention.auto, by every successful backup
    right after it stored its snapshot. Returns what was removed (the shape of `prune --json`)."""
    p, wal = _plan_with_wal(store, layout, policy, now)
    retention.execute(store, layout, p)
    store.delete_many(wal)
    log.event(_log, logging.INFO, "pruned", backups=len(p.remove), packs=len(p.remove_packs), wal=len(wal),
              freed_bytes=p.freed_bytes)
    return _summary(p, wal, confirmed=True)


def prune(cfg: Config, *, confirm: bool, store: ObjectStore | None = None, now: float | None = None) -> dict[str, Any]:
    store, layout = _open(cfg, store)
    policy = cfg.backup.retention
    if policy.keep_last is None and policy.keep_within is None:
        raise UsageError("no retention policy configured",
                         hint="set backup.retention.keep_last and/or keep_within in the configuration")
    if not confirm:
        p, wal = _plan_with_wal(store, layout, policy, now)
        return _summary(p, wal, confirmed=False)
    with ClusterLock(store, layout, BACKUP, command="backup prune", ttl=cfg.storage.lock_ttl,
                     os_user=cfg.os_user) as lock:
        # each deletion first checks the lock is still ours
        return apply_retention(GuardedStore(store, lock), layout, policy, now=now)


def verify(cfg: Config, *, backup_id: str | None, all_: bool, restore: bool,
           store: ObjectStore | None = None, progress: Callable[[str], None] | None = None,
           byte_progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """``progress(phase)``, ``byte_progress(done, total)``: for a progress display."""
    store, layout = _open(cfg, store)
    if all_:
        ids = [b.backup_id for b in catalog.list_backups(store, layout, with_status=False)]
        if not ids:
            raise NotFoundError("there are no backups yet", hint="run `dbops backup`")
    else:
        ids = [resolve_id(store, layout, backup_id)]
    out = []
    for bid in ids:
        m = mf.load(store, layout, bid)
        if progress:
            progress("verify" if len(ids) == 1 else f"verify {bid}")
        rep = verify_backup(store, layout, m, cfg.backup.parallel, progress=byte_progress)
        d = {"backup_id": bid, "ok": rep.ok, "objects": rep.objects, "chunks": rep.chunks,
             "fetched_bytes": rep.fetched_bytes, "seconds": round(rep.seconds, 3),
             "problems": [{"key": p.key, "reason": p.reason, "files": list(p.files)} for p in rep.problems]}
        if rep.ok and restore:
            try:
                d["restore_seconds"], d["checks"] = restore_and_start(cfg, store, layout, m, progress=progress,
                                                                      byte_progress=byte_progress)
            except ValidationError as e:
                d["ok"] = False
                d["problems"].append({"key": bid, "reason": e.message, "files": []})
        out.append(d)
    return out


def restore_and_start(cfg: Config, store: ObjectStore, layout: Layout, m: mf.Manifest, *,
                      progress: Callable[[str], None] | None = None,
                      byte_progress: Callable[[int, int], None] | None = None) -> tuple[float, list]:
    """Prove a backup the way `dbops backup` does (restore into scratch, replay to its own consistent
    point, check, stop) and record it validated."""
    phases = Phases(progress)
    run_id = catalog.new_backup_id().split("-", 1)[1]
    with prove(cfg, store, layout, m, phases, run_id=run_id, name=f"verify-{run_id}",
               byte_progress=byte_progress) as proof:
        val = proof.validation
    detail: dict[str, Any] = {"checks": val.checks, "by": "dbops verify --restore"}
    gap = catalog.wal_gap_of(catalog.latest_status(store, layout, m.backup_id))
    if gap is not None:  # proving the backup again says nothing about the archive after it
        detail["wal_gap"] = gap.to_dict()
    catalog.record_status(store, layout, m.backup_id, catalog.VALIDATED, run_id=run_id, phase="verify",
                          timings=dict(phases.t), detail=detail)
    return restore_seconds(phases.t), val.checks
