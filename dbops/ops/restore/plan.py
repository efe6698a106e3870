"""`dbops restore`: point-in-time restore that picks the backup, replays the archive and reports
what it reached.

:func:`plan_restore` decides everything a restore will do and changes nothing (``--dry-run``
prints it); :func:`dbops.ops.restore.run.restore` computes the same plan and carries it out:

1. pick the backup (:mod:`dbops.ops.restore.choose`): the newest one that holds no commit after
   the target (time targets) or is consistent at or before it (LSN targets), whose timeline leads
   to the target timeline, not marked failed, stored or validated; when it is not validated yet,
   the newest older validated one that fits (its WAL archived) is the fallback, restored instead
   if the chosen one turns out damaged in storage;
2. check the archive from that backup's redo point: where its run of segments ends or breaks,
   and (``pg_waldump`` on the last segments) the last archived commit, so that a target past
   the end of the archive, or behind a missing segment, is refused before anything is
   downloaded;
3. download the backup into the target folder, every chunk checked against its hash, while the
   WAL replay is expected to need is fetched ahead (verified) into a scratch folder;
4. write the folder's own recovery settings (``restore_command`` through ``dbops wal-fetch``,
   the target, the timeline, the final action, ``archive_mode = off``) and ``recovery.signal``;
5. run the recovery (:mod:`dbops.ops.restore.recover`): a local server pauses at the target,
   reports the LSN, last commit time and timeline it reached, then is promoted, left paused or
   shut down, stopped cleanly, and started for the user with ``--start``.

Any failure leaves nothing that looks like a restored database (:mod:`dbops.ops.restore.folder`):
a folder dbops filled is emptied again (a ``--delta`` folder is marked unusable instead, to be
reused by the next run).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dbops.config import Config
from dbops.errors import NotFoundError, TargetError, UsageError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore import room
from dbops.ops.restore import tablespaces as rts
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.choose import BackupChoice, Backups, earliest, pick
from dbops.ops.restore.folder import preflight
from dbops.ops.restore.target import FINAL_STATES, LATEST, LSN, TIME, RestoreTarget, iso_utc
from dbops.ops.restore.timeline import default_timeline
from dbops.ops.wal.archive import WalArchive
from dbops.pg import walchain
from dbops.pg.lsn import format_lsn, parse_lsn, parse_segment_name, segment_of_lsn, segno_of_lsn
from dbops.repo import catalog
from dbops.storage import ObjectStore, open_archive

TIME_SLACK = 30.0  # seconds: segments archived this long after a time target are fetched ahead too


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
    space_check: bool = True  # refuse before the download when the files cannot fit (ops.restore.room)
    tablespace_map: tuple[tuple[str, str], ...] = ()  # (name or OID, folder)
    tablespace_map_all: Path | None = None

    def mapped(self) -> bool:
        """Whether tablespaces are given folders (--tablespace-map, --tablespace-map-all)."""
        return bool(self.tablespace_map) or self.tablespace_map_all is not None

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
    fallback: BackupChoice | None = None  # restored instead if `backup` is damaged in storage

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.as_dict(), "timeline": self.timeline, "backup": self.backup.as_dict(),
            "fallback": self.fallback.as_dict() if self.fallback else None,
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


class PastEndError(TargetError):
    """The target lies past the end of the archive along the chosen timeline."""


def plan_restore(cfg: Config, opts: Options, *, store: ObjectStore | None = None,
                 cache: Path | None = None, fallback_from: str | None = None) -> Plan:
    """Everything the restore will do, checked against the catalog and the archive; changes nothing.

    `cache`: a folder to keep the segments read while checking the end of the archive (a restore
    replays them next); without it they go to a temporary folder removed afterwards.
    `fallback_from`: the damaged backup a restore starts over from ``opts.backup_id`` instead of.
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
    bk = Backups(store, layout)
    if not bk.infos:
        raise NotFoundError("there are no backups to restore from", hint="run `dbops backup`")
    inv = rwal.inventory(store, layout, seg_size)
    if opts.timeline is not None:
        tli = opts.timeline or inv.latest_timeline() or bk.infos[-1].timeline  # 0: --timeline latest
        if tli not in inv.timelines() and tli != 1:
            raise TargetError(f"timeline {tli} is not in the archive",
                              detail="timelines there: " + ", ".join(map(str, sorted(inv.timelines()))))
        choices = [(tli, rwal.chain(arc, tli), [])]
    else:  # the newest timeline whose history holds the target, not merely the highest
        first, later = default_timeline(arc, inv, bk.infos, opts.target)
        choices = [first, *later]
    failed: PastEndError | None = None
    for tli, spans, tl_notes in choices:
        try:
            return _plan_on(cfg, opts, bk, arc, inv, tli, spans, tl_notes, seg_size, cache, fallback_from)
        except PastEndError as e:  # a later choice may hold it; the first choice's error is the one to show
            failed = failed or e
    assert failed is not None
    raise failed


def _plan_on(cfg: Config, opts: Options, bk: Backups, arc: WalArchive, inv: rwal.Inventory, tli: int,
             spans: list[walchain.Span], tl_notes: list[str], seg_size: int, cache: Path | None,
             fallback_from: str | None = None) -> Plan:
    """The plan along one timeline's chain."""
    picked = pick(bk, spans, opts.target, opts.backup_id, fallback_from=fallback_from)
    chosen, oldest, fallback = picked.chosen, picked.oldest, picked.fallback
    notes = tl_notes + picked.notes
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
    if fallback is not None:
        fallback = fallback_reaches(fallback, wr, inv, spans, seg_size, notes)

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
    if opts.space_check:  # the restore checks again, after --force emptied what it empties
        wal_dir = cache if cache is not None else Path(cfg.backup.scratch_dir)
        short = room.shortages([] if opts.delta else room.summed(m.logical_size, [(t.oid, t.size)
                                                                                  for t in m.tablespaces]),
                               opts.target_dir, {d.tablespace.oid: d.folder for d in dests},
                               wal=(wal_dir, room.wal_to_fetch(wal_dir, rwal.WalAhead.held(
                                   ahead, rwal.window(cfg.backup.restore_wal_ahead, opts.mapped(), seg_size)),
                                   seg_size)))
        if short:
            notes.append(f"not enough free space now: {short}; the restore will refuse to start (exit 11) "
                         "unless space is freed (or --no-space-check, where the filesystem compresses)")
    return Plan(target=target, timeline=tli, backup=chosen, target_dir=str(opts.target_dir), final=opts.final,
                start=opts.start, port=opts.port, settings=settings, first_segment=start_seg,
                replay_segments=replay, fetch_ahead=ahead,
                fetch_bytes=sum(inv.segments[n].size for n in ahead if n in inv.segments),
                histories=sorted(inv.histories), remote=wr.contiguous[len(ahead):], archive_end=archive_end,
                earliest=earliest(oldest), newest=newest,
                estimate=estimate(bk.infos, chosen, len(replay), seg_size), notes=notes, holes=wr.holes,
                seg_size=seg_size, spans=spans, tablespaces=dests, fallback=fallback)


def fallback_reaches(fallback: BackupChoice, wr: rwal.WalRange, inv: rwal.Inventory, spans: list[walchain.Span],
                      seg_size: int, notes: list[str]) -> BackupChoice | None:
    """The fallback when the archive holds every segment from its redo point to where the chosen
    backup's run starts (from there both replay the same WAL); else None, said in the notes."""
    run = rwal.wal_range(inv, spans, segment_of_lsn(fallback.timeline, fallback.redo_lsn, seg_size))
    before = run.needed[:max(0, len(run.needed) - len(wr.needed))]
    missing = [n for n in before if n not in inv.segments]
    if not missing:
        return fallback
    notes[:] = [n for n in notes if not n.startswith("fallback: ")]
    notes.append(f"no fallback: validated backup {fallback.backup_id} cannot be restored to the target, WAL segment "
                 f"{missing[0]} is missing from the archive")
    return None


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
    raise PastEndError(f"the target {target.describe()} is past the end of the archive: {ends}; {reachable}",
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


