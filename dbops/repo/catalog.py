"""The backup catalog: which backups exist, in time order, and what became of them.

* A backup exists exactly when its manifest does; listing needs one LIST plus one HEAD
  per backup (the manifest's object metadata carries its summary).
* Order is by consistent time (then LSN), never by name.
* Status records are append-only small JSON objects under ``Layout.status_prefix(id)``,
  named ``<epoch ns, 20 digits>-<random>.json`` so key order is time order; the latest
  one is the backup's current status. Nothing is ever rewritten. The time is the storage
  server's (its Date), and a new record is always named after every existing one, so hosts
  with skewed clocks still append in order.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets as pysecrets
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dbops.repo import manifest as mf
from dbops.errors import ConflictError, NotFoundError, ValidationError
from dbops.pg.lsn import SEGMENT_RE, format_lsn, parse_lsn
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.probe import put_once

STORED, VALIDATED, FAILED = "stored", "validated", "failed"
STATES = (STORED, VALIDATED, FAILED)

BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}$")
_MANIFEST_NAME = "manifest.json.zst"


def new_backup_id(now: float | None = None) -> str:
    """Time-based, sortable, unique: ``20261125T101530.123Z-1a2b3c4d`` (UTC, ms, 32 random bits)."""
    t = time.time() if now is None else now
    ms = int(t * 1000) % 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{ms:03d}Z-{pysecrets.token_hex(4)}"


def is_backup_id(text: str) -> bool:
    return bool(BACKUP_ID_RE.match(text))


@dataclass(frozen=True)
class StatusRecord:
    backup_id: str
    state: str  # stored | validated | failed
    at: float  # epoch seconds
    run_id: str  # the run that recorded it
    phase: str | None = None  # the phase it concerns, e.g. "validate" (failed: where it failed)
    timings: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # failed: why
    detail: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "state": self.state, "at": self.at, "run_id": self.run_id,
                "phase": self.phase, "timings": self.timings, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    consistent_time: float
    consistent_lsn: int
    redo_lsn: int
    timeline: int
    parent_id: str | None
    logical_size: int
    stored_bytes: int
    status: StatusRecord | None = None  # latest status record, if any
    kind: str | None = None  # full | incremental
    created: float | None = None
    referenced_bytes: int | None = None  # None: a manifest written before this was recorded

    @property
    def state(self) -> str:
        """Latest recorded state; a backup with no record yet counts as stored."""
        return self.status.state if self.status else STORED

    @property
    def usable(self) -> bool:
        return self.state != FAILED

    @property
    def wal_gap(self) -> WalGap | None:
        """Validated, but the archive has a gap after it (see :func:`wal_gap_of`)."""
        return wal_gap_of(self.status)


@dataclass(frozen=True)
class WalGap:
    """What a validation proved about a backup when the archive has a gap after it: the backup
    restores and is consistent, and the archive is complete from it up to ``complete_until``
    (then ``missing`` is missing, with later segments archived). Point-in-time restore from it
    reaches ``lsn`` (the end of the last record before the gap), whose last commit is at ``time``."""

    missing: str
    complete_until: str
    lsn: int
    time: float | None = None
    commit_lsn: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"missing": self.missing, "complete_until": self.complete_until, "lsn": format_lsn(self.lsn),
                "time": self.time, "commit_lsn": None if self.commit_lsn is None else format_lsn(self.commit_lsn)}


def wal_gap_of(status: StatusRecord | None) -> WalGap | None:
    """The gap a validated status record names, read strictly (the record comes from the bucket:
    anything malformed counts as no gap record, and the backup as plainly validated)."""
    if status is None or status.state != VALIDATED:
        return None
    g = (status.detail or {}).get("wal_gap")
    if not isinstance(g, dict):
        return None
    try:
        missing, until = str(g["missing"]), str(g["complete_until"])
        if not (SEGMENT_RE.match(missing) and SEGMENT_RE.match(until)):
            return None
        t = g.get("time")
        c = g.get("commit_lsn")
        return WalGap(missing, until, parse_lsn(str(g["lsn"])), None if t is None else float(t),
                      None if c is None else parse_lsn(str(c)))
    except (KeyError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------------- status records


def record_status(
    store: ObjectStore,
    layout: Layout,
    backup_id: str,
    state: str,
    *,
    run_id: str,
    phase: str | None = None,
    timings: Mapping[str, float] | None = None,
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> StatusRecord:
    """Append a status record to an existing backup."""
    if state not in STATES:
        raise ValueError(f"unknown backup state {state!r}")
    if state == FAILED and not reason:
        raise ValueError("a failed status needs a reason")
    if store.head(layout.manifest(backup_id)) is None:
        raise NotFoundError(f"backup {backup_id} does not exist", detail=f"no manifest at {layout.manifest(backup_id)}")
    if now is None:
        now = store.server_time() or time.time()
        now += time.time() % 1.0 if now == int(now) else 0.0  # the Date header has whole seconds
    newest = max((o.key for o in store.list(layout.status_prefix(backup_id)) if o.key.endswith(".json")),
                 default="")
    after = newest.rsplit("/", 1)[-1].split("-", 1)[0]
    ns = max(int(now * 1e9), int(after) + 1 if after.isdigit() else 0)
    at = ns / 1e9
    seq = f"{ns:020d}-{pysecrets.token_hex(4)}"
    key = layout.status(backup_id, seq)
    rec = StatusRecord(backup_id, state, at, run_id, phase, dict(timings or {}), reason, dict(detail or {}), key)
    if not put_once(store, key, json.dumps(rec.to_dict()).encode()):
        raise ConflictError(f"status record {key} already exists")
    return rec


def _read_status(store: ObjectStore, key: str) -> StatusRecord:
    try:
        d = json.loads(store.get(key))
        return StatusRecord(d["backup_id"], d["state"], float(d["at"]), d.get("run_id", ""), d.get("phase"),
                            dict(d.get("timings") or {}), d.get("reason"), dict(d.get("detail") or {}), key)
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationError(f"status record {key} is unreadable: {e}") from None


def statuses(store: ObjectStore, layout: Layout, backup_id: str) -> list[StatusRecord]:
    """Every status record of a backup, oldest first."""
    return [_read_status(store, o.key) for o in store.list(layout.status_prefix(backup_id)) if o.key.endswith(".json")]


def latest_status(store: ObjectStore, layout: Layout, backup_id: str) -> StatusRecord | None:
    keys = [o.key for o in store.list(layout.status_prefix(backup_id)) if o.key.endswith(".json")]
    return _read_status(store, max(keys)) if keys else None


# ---------------------------------------------------------------------- listing


def _info_from_metadata(backup_id: str, meta: Mapping[str, str]) -> BackupInfo | None:
    try:
        return BackupInfo(
            backup_id=backup_id,
            consistent_time=float(meta["consistent-time"]),
            consistent_lsn=parse_lsn(meta["consistent-lsn"]),
            redo_lsn=parse_lsn(meta["redo-lsn"]),
            timeline=int(meta["timeline"]),
            parent_id=meta.get("parent-id") or None,
            logical_size=int(meta.get("logical-size", 0)),
            stored_bytes=int(meta.get("stored-bytes", 0)),
            kind=meta.get("kind") or None,
            created=float(meta["created"]) if meta.get("created") else None,
            referenced_bytes=int(meta["referenced-bytes"]) if meta.get("referenced-bytes") else None,
        )
    except (KeyError, ValueError):
        return None


def info_of(m: mf.Manifest, status: StatusRecord | None = None) -> BackupInfo:
    return BackupInfo(m.backup_id, m.pg.consistent_time, m.pg.consistent_lsn, m.pg.redo_lsn, m.pg.timeline,
                      m.parent_id, m.logical_size, m.stored_bytes, status, kind=m.meta.get("kind"),
                      created=m.created, referenced_bytes=m.referenced_bytes())


def list_backups(store: ObjectStore, layout: Layout, *, with_status: bool = True) -> list[BackupInfo]:
    """Every backup whose manifest exists, oldest first by consistent time (then LSN)."""
    base = layout.backups_prefix()
    ids: list[str] = []
    status_keys: dict[str, str] = {}
    for o in store.list(base):
        rest = o.key[len(base):]
        backup_id, _, name = rest.partition("/")
        if name == _MANIFEST_NAME:
            ids.append(backup_id)
        elif o.key.startswith(layout.status_prefix(backup_id)) and o.key.endswith(".json"):
            status_keys[backup_id] = max(status_keys.get(backup_id, ""), o.key)

    def one(backup_id: str) -> BackupInfo | None:
        head = store.head(layout.manifest(backup_id))
        if head is None:  # deleted between LIST and HEAD
            return None
        info = _info_from_metadata(backup_id, head.metadata)
        if info is None:
            try:
                info = info_of(mf.load_header(store, layout, backup_id))
            except NotFoundError:
                return None
        if with_status and backup_id in status_keys:
            info = _with_status(info, _read_status(store, status_keys[backup_id]))
        return info

    out = [info for info in each(one, ids) if info is not None]
    out.sort(key=lambda b: (b.consistent_time, b.consistent_lsn, b.backup_id))
    return out


READERS = 8  # requests in flight at once when the catalog reads one small object (or two) per backup


def each(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """[fn(x) for x in items], up to READERS at once (each a request or two of a few ms that would
    otherwise wait for the one before: a catalog of 30 backups, 60 requests, one after the other);
    results in the items' order, the first failure (in that order) raised."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(READERS, len(items)), thread_name_prefix="dbops-catalog") as pool:
        return list(pool.map(fn, items))


def _with_status(info: BackupInfo, status: StatusRecord) -> BackupInfo:
    return dataclasses.replace(info, status=status)


def newest_usable(store: ObjectStore, layout: Layout, *, require_validated: bool = False) -> BackupInfo | None:
    """The newest backup not marked failed (with require_validated: the newest validated one)."""
    for b in reversed(list_backups(store, layout)):
        if b.state == VALIDATED or (b.usable and not require_validated):
            return b
    return None
