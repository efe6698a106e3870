"""`dbops restore`: point-in-time restore that picks the backup, replays the archive and reports
what it reached.

:func:`plan_restore` decides everything a restore will do and changes nothing (``--dry-run``
prints it); :func:`restore` computes the same plan and carries it out:

1. pick the backup: the newest one that holds no commit after the target (time targets) or
   is consistent at or before it (LSN targets), whose timeline leads to the target timeline,
   not marked failed, a validated one preferred over a newer merely stored one;
2. check the archive from that backup's redo point: where its run of segments ends or breaks,
   and (``pg_waldump`` on the last segments) the last archived commit, so that a target past
   the end of the archive, or behind a missing segment, is refused before anything is
   downloaded;
3. download the backup into the target folder, every chunk checked against its hash, while the
   WAL replay is expected to need is fetched ahead (verified) into a scratch folder;
4. write the folder's own recovery settings (``restore_command`` through ``dbops wal-fetch``,
   the target, the timeline, the final action, ``archive_mode = off``) and ``recovery.signal``;
5. run the recovery (:mod:`dbops.ops.restore.run`): a local server pauses at the target,
   reports the LSN, last commit time and timeline it reached, then is promoted, left paused or
   shut down, stopped cleanly, and started for the user with ``--start``.

Any failure leaves nothing that looks like a restored database: a folder dbops filled is
emptied again (a ``--delta`` folder is marked unusable instead, to be reused by the next run).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from dbops import log, proc
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.config import Config
from dbops.errors import NotFoundError, PreconditionError, TargetError, UsageError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore import tablespaces as rts
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.timeline import default_timeline
from dbops.pg import walchain
from dbops.ops.wal.archive import WalArchive
from dbops.phases import Phases
from dbops.runtime.scratch import scratch_folder
from dbops.ops.restore.target import FINAL_STATES, LATEST, LSN, TIME, XID, RestoreTarget, iso_utc
from dbops.pg import running
from dbops.pg.lsn import format_lsn, parse_lsn, parse_segment_name, segment_of_lsn, segno_of_lsn
from dbops.storage import ObjectStore, open_archive
from dbops.storage.layout import Layout

_log = log.get("restore")

TIME_SLACK = 30.0  # seconds: segments archived this long after a time target are fetched ahead too
INCOMPLETE_MARK = "DBOPS_RESTORE_INCOMPLETE"


@dataclass(frozen=True)
class Options:
    target: RestoreTarget
    target_dir: Path
    timeline: int | None = None  # None: see ops.restore.timeline (time targets: the newest holding the target)
    backup_id: str | None = None
    final: str = "promote"  # promote | pause | shutdown
    start: bool = False
    port: int | None = None
    keep_archiving: bool = False
    force: bool = False
    delta: bool = False
    tablespace_map: tuple[tuple[str, str], ...] = ()  # (name or OID, folder)
    tablespace_map_all: Path | None = None

    def check(self) -> None:
        if self.final not in FINAL_STATES:
            raise UsageError(f"unknown final state {self.final!r}", hint="one of " + ", ".join(FINAL_STATES))
        if self.start and self.final == "shutdown":
            raise UsageError("--start and --shutdown contradict each other",
                             hint="--shutdown leaves the folder stopped at the target; --start --pause keeps "
                                  "it running, paused there")
        if self.start and self.port is None:
            raise UsageError("--start needs --port N (the restored server must not take the source's port)")
        if self.port is not None and not 0 < self.port < 65536:
            raise UsageError(f"invalid port {self.port}")
        if self.force and self.delta:
            raise UsageError("--force and --delta contradict each other",
                             hint="--force empties the folder first; --delta reuses what is in it")


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


@dataclass
class Plan:
    target: RestoreTarget  # a latest target carries the LSN of the last archived record
    timeline: int
    backup: BackupChoice
    target_dir: str
    final: str
    start: bool
    port: int | None
    settings: dict[str, str]  # what the restored folder's postgresql.auto.conf gets
    first_segment: str
    replay_segments: list[str]  # from the backup's redo to the segment expected to hold the target
    fetch_ahead: list[str]  # fetched before the server starts (replay_segments + a few)
    fetch_bytes: int  # stored (compressed) bytes of fetch_ahead
    histories: list[int]  # every history file in the archive (fetched ahead: a promotion picks a new timeline)
    remote: list[str]  # the rest of the archived run: fetched through dbops wal-fetch if replay asks
    archive_end: dict[str, Any]
    earliest: dict[str, Any]
    newest: dict[str, Any]
    estimate: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    holes: list[str] = field(default_factory=list)
    tablespaces: list[rts.Destination] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.as_dict(), "timeline": self.timeline, "backup": self.backup.as_dict(),
            "target_dir": self.target_dir, "final": self.final, "start": self.start, "port": self.port,
            "wal": {"first": self.first_segment,
                    "last": self.replay_segments[-1] if self.replay_segments else None,
                    "segments": len(self.replay_segments),
                    "bytes": len(self.replay_segments) * self.seg_size,
                    "fetch_ahead": len(self.fetch_ahead), "fetch_ahead_stored_bytes": self.fetch_bytes,
                    "on_demand": len(self.remote),
                    "histories": [f"{t:08X}.history" for t in self.histories]},
            "archive_end": self.archive_end, "earliest": self.earliest, "newest": self.newest,
            "estimate": self.estimate, "settings": self.settings, "notes": self.notes,
            "tablespaces": [d.as_dict() for d in self.tablespaces],
        }

    seg_size: int = 16 * 1024 * 1024
    spans: list[walchain.Span] = field(default_factory=list)  # the timeline chain replay follows


# --------------------------------------------------------------------------- planning


class _Backups:
    """The catalog with manifests loaded on demand (each at most once)."""

    def __init__(self, store: ObjectStore, layout: Layout):
        self.store, self.layout = store, layout
        self.infos = catalog.list_backups(store, layout)
        self._manifests: dict[str, mf.Manifest] = {}

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


def _earliest(b: BackupChoice) -> dict[str, Any]:
    return {"backup_id": b.backup_id, "time": iso_utc(newest_commit_bound(b)), "lsn": format_lsn(b.consistent_lsn)}


def _pick(bk: _Backups, spans, opts: Options) -> tuple[BackupChoice, BackupChoice, list[str]]:
    """(chosen backup, oldest usable backup on the chain, notes)."""
    target = opts.target
    on_chain = [b for b in bk.infos if rwal.on_chain(spans, b.timeline, b.consistent_lsn)]
    usable = [b for b in on_chain if b.usable]
    tli = spans[-1].timeline
    if opts.backup_id:
        b = next((x for x in bk.infos if x.backup_id == opts.backup_id), None)
        if b is None:
            raise NotFoundError(f"no backup {opts.backup_id}", hint="`dbops backup list` shows the backups")
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
        oldest = bk.choice(usable[0]) if usable else c
        return c, oldest, [f"backup {b.backup_id} chosen with --backup"]
    if not usable:
        failed = [b.backup_id for b in on_chain if not b.usable]
        raise TargetError(f"no usable backup on the history of timeline {tli}",
                          detail=f"failed backups: {', '.join(failed)}" if failed else "no backup at all there",
                          hint="run `dbops backup` (it heals a failed chain with a fresh full backup)")
    oldest = bk.choice(usable[0])
    fitting: list[BackupChoice] = []  # newest first; a validated one is preferred over one newer stored one
    for b in reversed(usable):
        c = bk.choice(b)
        if fits(c, target):
            fitting.append(c)
            if c.state == catalog.VALIDATED or len(fitting) == 2:
                break
    if not fitting:
        raise TargetError(
            f"the target {target.describe()} is before the oldest usable backup",
            detail=f"the oldest backup {oldest.backup_id} is consistent at {format_lsn(oldest.consistent_lsn)} "
                   f"({iso_utc(oldest.consistent_time)}), its last commit at "
                   f"{iso_utc(oldest.last_commit_time) or 'an unrecorded time before that'}; "
                   f"the earliest reachable point is {_earliest(oldest)['time']} (LSN {_earliest(oldest)['lsn']})",
            hint="restore to a later point, or keep backups longer (backup.retention)")
    notes = []
    chosen = next((c for c in fitting if c.state == catalog.VALIDATED), fitting[0])
    if chosen is not fitting[0]:
        notes.append(f"the newest fitting backup {fitting[0].backup_id} is not validated yet: preferring validated "
                     f"{chosen.backup_id} (choose the other with --backup ID)")
    elif chosen.state != catalog.VALIDATED:
        notes.append(f"backup {chosen.backup_id} is stored (started and checked when taken) but not yet validated "
                     "by a restore from storage")
    return chosen, oldest, notes


def plan_restore(cfg: Config, opts: Options, *, store: ObjectStore | None = None,
                 cache: Path | None = None) -> Plan:
    """Everything the restore will do, checked against the catalog and the archive; changes nothing.

    `cache`: a folder to keep the segments read while checking the end of the archive (a restore
    replays them next); without it they go to a temporary folder removed afterwards.
    """
    opts.check()
    preflight(opts, cfg.os_user)
    store, layout = open_archive(cfg.storage, store)
    arc = WalArchive(store, layout)
    ident = arc.read_identity()
    if ident is None:
        raise NotFoundError(f"the archive at {layout.root} is empty: no WAL was ever archived there",
                            hint="check storage.prefix; `dbops wal status` shows what the archive holds")
    seg_size = ident.wal_segment_size
    bk = _Backups(store, layout)
    if not bk.infos:
        raise NotFoundError("there are no backups to restore from", hint="run `dbops backup`")
    inv = rwal.inventory(store, layout, seg_size)
    if opts.timeline is not None:
        tli = opts.timeline or inv.latest_timeline() or bk.infos[-1].timeline  # 0: --timeline latest
        if tli not in inv.timelines() and tli != 1:
            raise TargetError(f"timeline {tli} is not in the archive",
                              detail="timelines there: " + ", ".join(map(str, sorted(inv.timelines()))))
        spans, tl_notes = rwal.chain(arc, tli), []
    else:  # the newest timeline whose history holds the target, not merely the highest
        tli, spans, tl_notes = default_timeline(arc, inv, bk.infos, opts.target)
    chosen, oldest, notes = _pick(bk, spans, opts)
    notes = tl_notes + notes
    m = bk.manifest(chosen.backup_id)
    dests = rts.destinations(m.tablespaces, target_dir=opts.target_dir, mapping=opts.tablespace_map,
                             map_all=opts.tablespace_map_all, delta=opts.delta, force=opts.force)

    start_seg = segment_of_lsn(chosen.timeline, chosen.redo_lsn, seg_size)
    wr = rwal.wal_range(inv, spans, start_seg)
    consistent_no = segno_of_lsn(chosen.consistent_lsn, seg_size)
    if not wr.present or parse_segment_name(wr.end, seg_size)[1] < consistent_no:
        missing = wr.needed[wr.present] if wr.present < len(wr.needed) else start_seg
        raise ValidationError(f"WAL segment {missing} is missing from the archive",
                              detail=f"backup {chosen.backup_id} needs {start_seg} .. "
                                     f"{segment_of_lsn(chosen.timeline, chosen.consistent_lsn, seg_size)} to start",
                              hint="`dbops wal status` lists the gaps; restore from another backup with --backup")

    def scan(where: Path) -> rwal.WalEnd | None:
        return rwal.scan_end(arc, wr.contiguous, where, stop_before=consistent_no, seg_size=seg_size)

    if cache is not None:
        end = scan(cache)
    else:
        with tempfile.TemporaryDirectory(prefix="dbops-restore-plan-") as tmp:
            end = scan(Path(tmp))
    assert end is not None  # wr.contiguous is not empty
    last_commit = end.commit if end.commit and end.commit.lsn > chosen.consistent_lsn else None
    archived = inv.segments[end.segment].last_modified
    archive_end = {"segment": end.segment, "lsn": format_lsn(end.end_lsn), "last_record_lsn": format_lsn(end.last_lsn),
                   "archived_at": iso_utc(archived) if archived else None}
    newest = {"time": iso_utc(last_commit.time) if last_commit else None,
              "commit_lsn": format_lsn(last_commit.lsn) if last_commit else None,
              "lsn": format_lsn(end.last_lsn)}
    target = _check_reachable(opts.target, chosen, end, last_commit, wr, archive_end, newest)

    replay, ahead = _segments_to_fetch(cfg, target, wr, inv, seg_size)
    settings = folder_settings(cfg, opts, target, tli)
    return Plan(target=target, timeline=tli, backup=chosen, target_dir=str(opts.target_dir), final=opts.final,
                start=opts.start, port=opts.port, settings=settings, first_segment=start_seg,
                replay_segments=replay, fetch_ahead=ahead,
                fetch_bytes=sum(inv.segments[n].size for n in ahead if n in inv.segments),
                histories=sorted(inv.histories), remote=wr.contiguous[len(ahead):], archive_end=archive_end,
                earliest=_earliest(oldest), newest=newest,
                estimate=estimate(bk.infos, chosen, len(replay), seg_size), notes=notes, holes=wr.holes,
                seg_size=seg_size, spans=spans, tablespaces=dests)


def _check_reachable(target: RestoreTarget, b: BackupChoice, end: rwal.WalEnd, last_commit: rwal.Commit | None,
                     wr: rwal.WalRange, archive_end: dict, newest: dict) -> RestoreTarget:
    """The target as replay will meet it; TargetError/ValidationError when the archive cannot get there."""
    ends = (f"the archive ends at {archive_end['segment']} (LSN {archive_end['lsn']}"
            + (f", archived {archive_end['archived_at']}" if archive_end["archived_at"] else "") + ")")
    reachable = (f"the newest reachable point is {newest['time']} (the last archived commit, LSN "
                 f"{newest['commit_lsn']}; `--to latest` restores through it)" if newest["time"]
                 else f"no commit was archived after backup {b.backup_id}: `--to latest` (LSN {newest['lsn']}) "
                      "is the newest reachable point")
    if target.kind == TIME:
        ok = last_commit is not None and (last_commit.time > target.epoch if target.inclusive
                                          else last_commit.time >= target.epoch)
    elif target.kind == LSN:
        ok = target.lsn <= end.last_lsn
    elif target.kind == LATEST:
        ok = not wr.holes
    else:
        return target  # xid / name: only replay can tell
    if ok:
        return replace(target, lsn=end.last_lsn) if target.kind == LATEST else target
    if wr.holes:
        listed = ", ".join(wr.holes[:5]) + (f" and {len(wr.holes) - 5} more" if len(wr.holes) > 5 else "")
        raise ValidationError(f"WAL segment {listed} is missing from the archive, on the way to the target",
                              detail=f"replay from backup {b.backup_id} stops before it: {ends}; the newest point "
                                     f"reachable before the gap is {newest['time'] or newest['lsn']}",
                              hint="restore to a point before the gap (--to-lsn / --to), or find the segment "
                                   "(the primary's pg_wal may still hold it) and archive it")
    raise TargetError(f"the target {target.describe()} is past the end of the archive: {ends}; {reachable}",
                      hint="if the target is recent, the segment holding it may not be archived yet: "
                           "SELECT pg_switch_wal() on the primary, then try again")


def _segments_to_fetch(cfg: Config, target: RestoreTarget, wr: rwal.WalRange, inv: rwal.Inventory,
                       seg_size: int) -> tuple[list[str], list[str]]:
    """(segments replay is expected to need, segments to fetch ahead: those plus a few)."""
    run = wr.contiguous
    if target.lsn is not None:
        target_no = segno_of_lsn(target.lsn, seg_size)
        n = next((i + 1 for i, s in enumerate(run) if parse_segment_name(s, seg_size)[1] >= target_no), len(run))
    elif target.kind == TIME:
        n = next((i + 1 for i, s in enumerate(run) if inv.segments[s].last_modified > target.epoch), len(run))
        while n < len(run) and inv.segments[run[n]].last_modified <= target.epoch + TIME_SLACK:
            n += 1
    else:
        n = len(run)
    extra = max(2, cfg.archive.prefetch)
    return run[:n], run[:n + extra]


def folder_settings(cfg: Config, opts: Options, target: RestoreTarget, timeline: int) -> dict[str, str]:
    """The restored folder's recovery settings (its postgresql.auto.conf block)."""
    s = {"restore_command": rconf.restore_command(cfg)}
    s.update(target.settings())
    s["recovery_target_timeline"] = str(timeline)
    s["recovery_target_action"] = opts.final
    if opts.final == "pause":
        s["hot_standby"] = "on"
    if not opts.keep_archiving:
        s["archive_mode"] = "off"
    s["primary_conninfo"] = ""
    if opts.port is not None:
        s["port"] = str(opts.port)
    return s


def estimate(infos: list[catalog.BackupInfo], chosen: BackupChoice, replay_segments: int,
             seg_size: int) -> dict[str, Any]:
    """Seconds from the newest measured restore (a validation: download, WAL fetch, start, replay)."""
    for b in reversed(infos):
        st = b.status
        if not st or st.state != catalog.VALIDATED or not st.timings.get("download") or not b.logical_size:
            continue
        t = st.timings
        rate = b.logical_size / t["download"]
        replayed_to = (st.detail or {}).get("replayed_to")
        segs = 1
        if replayed_to:
            segs = max(1, segno_of_lsn(parse_lsn(replayed_to), seg_size) - segno_of_lsn(b.redo_lsn, seg_size) + 1)
        per_seg = (t.get("replay", 0.0) + t.get("wal_fetch", 0.0)) / segs
        secs = chosen.logical_size / rate + replay_segments * per_seg + t.get("start", 0.0) + t.get("stop", 0.0)
        return {"seconds": round(secs, 1),
                "basis": f"validation of {b.backup_id}: {b.logical_size / 2**20:.0f} MiB downloaded in "
                         f"{t['download']:.1f} s, {segs} segment(s) fetched and replayed in "
                         f"{t.get('replay', 0.0) + t.get('wal_fetch', 0.0):.1f} s, start {t.get('start', 0.0):.1f} s"}
    return {"seconds": None, "basis": "no measured restore yet (no backup has been validated)"}


# --------------------------------------------------------------------------- the target folder


def _pg_ids(os_user: str) -> tuple[int, int]:
    pw = pwd.getpwnam(os_user)
    return pw.pw_uid, pw.pw_gid


def preflight(opts: Options, os_user: str) -> None:
    """Refuse a folder that is in use, not empty (without --force / --delta), or out of postgres's reach."""
    d = opts.target_dir
    if d.exists() and not d.is_dir():
        raise PreconditionError(f"target {d} exists and is not a folder")
    in_the_way = running.cluster_in_the_way(d)
    if in_the_way:
        data, pid, how = in_the_way
        where = "on it" if how == "is" else f"on {data}, which it {how}"
        raise PreconditionError(f"{d}: PostgreSQL (pid {pid}) is running {where}",
                                hint="restore somewhere else, or stop that server first")
    if d.is_dir() and any(d.iterdir()) and not (opts.force or opts.delta):
        raise PreconditionError(f"target folder {d} is not empty",
                                hint="restore into a new or empty folder; --force replaces its contents, "
                                     "--delta reuses them and fetches only what differs")
    if opts.delta and d.is_dir() and any(d.iterdir()) and not (d / "PG_VERSION").exists():
        raise PreconditionError(f"--delta: {d} is not a PostgreSQL data folder (no PG_VERSION)")
    if os.geteuid() == 0:
        uid, gid = _pg_ids(os_user)
        for parent in d.resolve().parents:
            st = parent.stat() if parent.exists() else None
            reachable = st is None or st.st_mode & stat.S_IXOTH or st.st_uid == uid or (
                st.st_gid == gid and st.st_mode & stat.S_IXGRP)
            if not reachable:
                raise PreconditionError(f"the {os_user} OS user cannot reach {d}: {parent} is mode "
                                        f"{stat.S_IMODE(st.st_mode):04o}",
                                        hint=f"restore under a folder {os_user} can traverse")
    if opts.start and opts.port is not None and not proc.port_free(opts.port):
        raise PreconditionError(f"port {opts.port} is in use on this host",
                                hint="choose a free port for the restored server")


def _empty(d: Path) -> None:
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def discard(d: Path, *, created: bool, delta: bool, reason: str) -> None:
    """After a failed restore: nothing may look like a restored database."""
    try:
        if delta:
            control = d / "global" / "pg_control"
            if control.exists():
                control.rename(control.with_name("pg_control.dbops-incomplete"))
            (d / INCOMPLETE_MARK).write_text(f"dbops restore failed here: {reason}\n"
                                             "This folder cannot be started; run `dbops restore --delta` again.\n")
        elif created:
            shutil.rmtree(d, ignore_errors=True)
        elif d.is_dir():
            _empty(d)
    except OSError as e:
        log.event(_log, logging.ERROR, "could not clean up the failed restore", folder=str(d), error=str(e))


# --------------------------------------------------------------------------- the run


@dataclass
class RestoreResult:
    plan: Plan
    reached: dict[str, Any]
    final_state: str  # promoted | paused | shut down at target
    running: dict[str, Any] | None
    timings: dict[str, float]
    download: dict[str, Any]
    wal: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        t = self.timings
        return {"ok": True, "target_dir": self.plan.target_dir, "backup_id": self.plan.backup.backup_id,
                "reached": self.reached, "final_state": self.final_state, "running": self.running,
                "timings": t, "seconds": round(sum(t.values()), 3), "download": self.download, "wal": self.wal,
                "plan": self.plan.as_dict()}


def restore(cfg: Config, opts: Options, *, store: ObjectStore | None = None,
            progress: Callable[[str], None] | None = None,
            byte_progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Plan, then carry the plan out (see the module docstring). ``progress(phase)`` and
    ``byte_progress(done, total)`` (the download's bytes) feed a progress display."""
    from dbops.ops.restore import run as restore_run

    opts.check()
    preflight(opts, cfg.os_user)  # before the scratch folder and the plan; the plan checks again
    store, layout = open_archive(cfg.storage, store)
    phases = Phases(progress)
    run_id = catalog.new_backup_id().split("-", 1)[1]
    target = opts.target_dir
    ids = _pg_ids(cfg.os_user) if os.geteuid() == 0 else None
    with proc.sigterm_as_interrupt(), scratch_folder(Path(cfg.backup.scratch_dir), f"restore-{run_id}", cfg.os_user) as scratch:
        cache = scratch / "wal"
        cache.mkdir(mode=0o700)
        if ids:
            os.chown(cache, *ids)
        with phases("plan"):
            plan = plan_restore(cfg, opts, store=store, cache=cache)
        log.event(_log, logging.INFO, "restore planned", backup=plan.backup.backup_id, target=plan.target.describe(),
                  timeline=plan.timeline, segments=len(plan.replay_segments))
        manifest = mf.load(store, layout, plan.backup.backup_id)
        created = not target.exists()
        if opts.force and target.is_dir():
            _empty(target)
        for d in plan.tablespaces:
            if opts.force and d.state == "not empty":
                rts.empty_folder(d.folder)
        ahead = rwal.WalAhead(store, layout, plan.fetch_ahead, cache, parallel=max(2, cfg.archive.parallel // 2),
                              owner=ids)
        remote = cache / rconf.REMOTE_DIR
        remote.mkdir()
        for name in plan.remote:
            (remote / name).touch()
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-walahead") as pool:
                ahead.prepare(plan.histories)
                wal_job = pool.submit(ahead.run)
                try:
                    with phases("download"):
                        download = _download(cfg, store, layout, manifest, plan, opts.delta, ids, byte_progress)
                    with phases("configure"):
                        configure(cfg, target, plan, opts)
                    with phases("tablespaces"):
                        wal_job.result()  # the WAL to replay is here: its CREATE TABLESPACE records
                        new_tablespaces = _created_tablespaces(cache, manifest, opts, ids)
                    reached, final_state, running = restore_run.run(
                        cfg, plan, opts, cache, phases, manifest.pg.pg_version, ahead.check,
                        mounts=tuple((str(f), loc) for loc, f in new_tablespaces.values() if str(f) != loc),
                        relink={oid: f for oid, (_loc, f) in new_tablespaces.items()})
                finally:
                    ahead.stop()  # what replay did not ask for is not needed any more
                stats = wal_job.result()
        except BaseException as e:
            discard(target, created=created, delta=opts.delta, reason=getattr(e, "message", None) or repr(e))
            if not opts.delta:
                for d in plan.tablespaces:
                    discard(d.folder, created=d.state == "absent", delta=False, reason="")
            raise
    wal = {"fetched_ahead": stats.segments, "bytes": stats.bytes, "seconds": stats.seconds,
           "not_archived": stats.missing, "failed": {n: e.message for n, e in ahead.failed.items()}}
    return RestoreResult(plan, reached, final_state, running, dict(phases.t), download, wal)


def _created_tablespaces(cache: Path, manifest: mf.Manifest, opts: Options,
                         ids: tuple[int, int] | None) -> dict[int, tuple[str, Path]]:
    """Tablespaces created in the WAL replayed after the backup: {OID: (location, folder)}, folders made."""
    from dbops.ops.backup.tablespaces import wal_creates

    created = rts.created_destinations(wal_creates(cache), manifest.tablespaces, mapping=opts.tablespace_map,
                                       map_all=opts.tablespace_map_all)
    for _loc, folder in created.values():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        if ids:
            os.chown(folder, *ids)
    return created


def _download(cfg: Config, store: ObjectStore, layout: Layout, manifest: mf.Manifest, plan: Plan, delta: bool,
              ids: tuple[int, int] | None, byte_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The backup into the target folder (verified), or only what differs with --delta."""
    from dbops.ops.restore import delta as restore_delta

    t0 = time.monotonic()
    owner = cfg.os_user if ids else None
    dirs = {d.tablespace.oid: str(d.folder) for d in plan.tablespaces}
    if delta and (Path(plan.target_dir) / "PG_VERSION").exists():
        d = restore_delta.restore_delta(store, layout, manifest, Path(plan.target_dir), parallel=cfg.backup.parallel,
                                        owner=owner, tablespace_dirs=dirs)
    else:
        st = restore_snapshot(store, layout, manifest, plan.target_dir, parallel=cfg.backup.parallel, owner=owner,
                              tablespace_dirs=dirs, progress=byte_progress)
        d = {"mode": "full", "files": st.files, "logical_bytes": st.logical_bytes,
             "fetched_bytes": st.fetched_bytes, "requests": st.requests}
    d["seconds"] = round(time.monotonic() - t0, 3)
    return d


def configure(cfg: Config, data: Path, plan: Plan, opts: Options) -> None:
    """The folder's own recovery settings, recovery.signal, and a postgresql.conf if it had none."""
    rconf.ensure_main_conf(data)
    rconf.write_settings(data, plan.settings, [f"restore of backup {plan.backup.backup_id} to "
                                               f"{plan.target.describe()} on timeline {plan.timeline}"])
    rconf.write_signal(data, recovery=True)
