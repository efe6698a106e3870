"""`dbops restore` carried out: the plan (:mod:`dbops.ops.restore.plan`), then the download of the
backup into the target folder while the WAL replay needs is fetched ahead, the folder's recovery
settings, and the recovery itself (:mod:`dbops.ops.restore.recover`), which starts once the
download is done (with a tablespace map: once the WAL is all fetched as well), replay waiting for
each segment still downloading, handed over once read for CREATE TABLESPACE (:class:`_NewTablespaces`;
a segment waited for counts as no progress of replay, ``validation.start_timeout``). Any failure leaves nothing
that looks like a restored database (:func:`dbops.ops.restore.folder.discard`). A chosen backup
found damaged in storage gives way to the plan's fallback, an older validated backup."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from dbops import heap, log, proc
from dbops.config import Config
from dbops.errors import BackupDamagedError, DbopsError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore import recover
from dbops.ops.restore import room
from dbops.ops.restore import tablespaces as rts
from dbops.ops.restore import wal as rwal
from dbops.ops.restore.folder import discard, empty, pg_ids, preflight
from dbops.ops.restore.plan import Options, Plan, plan_restore
from dbops.pg import conn as pgconn
from dbops.phases import Phases
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.runtime.scratch import (NO_SPACE, clean_stale_scratch, error_text, existing_parent, free_bytes,
                                   out_of_space, scratch_folder)
from dbops.units import human_bytes
from dbops.storage import ObjectStore, open_archive
from dbops.storage.layout import Layout

_log = log.get("restore")


@dataclass
class RestoreResult:
    plan: Plan
    reached: dict[str, Any]
    final_state: str  # promoted | paused | shut down at target
    running: dict[str, Any] | None
    timings: dict[str, float]
    download: dict[str, Any]
    wal: dict[str, Any]
    fell_back_from: dict[str, Any] | None = None  # the chosen backup, found damaged: {backup_id, reason}

    def as_dict(self) -> dict[str, Any]:
        t = self.timings
        return {"ok": True, "target_dir": self.plan.target_dir, "backup_id": self.plan.backup.backup_id,
                "fell_back_from": self.fell_back_from,
                "reached": self.reached, "final_state": self.final_state, "running": self.running,
                "timings": t, "seconds": round(sum(t.values()), 3), "download": self.download, "wal": self.wal,
                "plan": self.plan.as_dict()}


@dataclass
class _Run:
    """What every attempt of one restore shares (the fallback's attempt reuses the WAL cache)."""

    cfg: Config
    opts: Options
    store: ObjectStore
    layout: Layout
    cache: Path
    ids: tuple[int, int] | None
    phases: Phases
    delta: bool  # --delta into a data folder (not into an empty one, which gets a full restore)
    byte_progress: Callable[[int, int], None] | None


def restore(cfg: Config, opts: Options, *, store: ObjectStore | None = None,
            progress: Callable[[str], None] | None = None,
            byte_progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Plan, then carry the plan out (see the module docstring). ``progress(phase)`` and
    ``byte_progress(done, total)`` (the download's bytes) feed a progress display.

    When the backup the plan picked turns out damaged in storage (its manifest, a pack object or
    frame) and the plan has a fallback (an older validated backup), what was written is cleaned
    up and the restore starts over from the fallback; the result names the damaged backup
    (``fell_back_from``). With ``--backup`` there is no fallback."""
    opts.check()
    clean_stale_scratch(Path(cfg.backup.scratch_dir))  # a killed restore's server on its target stops here
    preflight(opts, cfg.os_user)  # before the scratch folder and the plan; the plan checks again
    store, layout = open_archive(cfg.storage, store)
    phases = Phases(progress)
    run_id = catalog.new_backup_id().split("-", 1)[1]
    ids = pg_ids(cfg.os_user) if os.geteuid() == 0 else None
    with proc.sigterm_as_interrupt(), scratch_folder(Path(cfg.backup.scratch_dir), f"restore-{run_id}",
                                                     cfg.os_user) as scratch:
        cache = scratch / "wal"
        cache.mkdir(mode=0o700)
        if ids:
            os.chown(cache, *ids)
        run = _Run(cfg, opts, store, layout, cache, ids, phases,
                   opts.delta and (opts.target_dir / "PG_VERSION").exists(), byte_progress)
        with phases("plan"):
            plan = plan_restore(cfg, opts, store=store, cache=cache)
        try:
            return _attempt(run, plan)
        except BackupDamagedError as e:
            if plan.fallback is None:
                raise
            damaged = e
        fb = plan.fallback.backup_id
        log.event(_log, logging.WARNING, f"backup {damaged.backup_id} is damaged in storage: {damaged.reason}; "
                  f"what it wrote is removed, restoring the validated backup {fb} instead",
                  damaged=damaged.backup_id, fallback=fb)
        with phases("plan"):
            plan = plan_restore(cfg, replace(opts, backup_id=fb, timeline=plan.timeline), store=store, cache=cache,
                                fallback_from=damaged.backup_id)
        try:
            res = _attempt(run, plan)
        except BackupDamagedError as e:
            raise ValidationError(f"backup {damaged.backup_id} and its fallback, backup {fb}, are both damaged "
                                  "in storage", detail=f"{damaged.backup_id}: {damaged.reason}; {fb}: {e.reason}",
                                  hint="restore another backup with --backup ID (`dbops backup list`); run "
                                       "`dbops verify` and take a new backup") from e
        except DbopsError as e:  # the fallback failed for a reason of its own: still say why it was tried
            e.detail = ((e.detail + "; ") if e.detail else "") + (
                f"this was the fallback backup {fb}: backup {damaged.backup_id} is damaged in storage: "
                f"{damaged.reason}")
            raise
        res.fell_back_from = {"backup_id": damaged.backup_id, "reason": damaged.reason}
        return res


def _attempt(run: _Run, plan: Plan) -> RestoreResult:
    """The plan's backup restored and recovered. On any failure the target folder and the
    tablespaces' are cleaned up (:func:`discard`) before the error goes on; the backup's own
    damage is raised as BackupDamagedError."""
    cfg, opts, store, layout, cache, ids, phases = (run.cfg, run.opts, run.store, run.layout, run.cache, run.ids,
                                                    run.phases)
    log.event(_log, logging.INFO, "restore planned", backup=plan.backup.backup_id, target=plan.target.describe(),
              timeline=plan.timeline, segments=len(plan.replay_segments))
    try:
        with heap.fewer_collections():  # every block record decoded and checked (dbops.heap)
            manifest = mf.load(store, layout, plan.backup.backup_id, keep_listing=True)
    except ValidationError as e:
        damaged = BackupDamagedError(plan.backup.backup_id, e)
        key = layout.manifest(plan.backup.backup_id)
        if key not in damaged.reason:  # name the object, as a damaged pack's error does
            damaged.detail = (damaged.detail + "; " if damaged.detail else "") + f"object {key}"
        raise damaged from e
    target = opts.target_dir
    created = not target.exists()
    if opts.force and target.is_dir():
        empty(target)
    for d in plan.tablespaces:
        if opts.force and d.state == "not empty":
            empty(d.folder)
    window = rwal.window(cfg.backup.restore_wal_ahead, opts.mapped(), plan.seg_size)
    if opts.space_check:  # refused before anything is fetched or written (--delta reuses files: WAL only)
        room.check_room([] if run.delta else manifest.listing(), target,
                        {d.tablespace.oid: d.folder for d in plan.tablespaces},
                        wal=(cache, room.wal_to_fetch(cache, rwal.WalAhead.held(plan.fetch_ahead, window),
                                                      plan.seg_size)))
    made = _NewTablespaces(manifest, opts, ids)
    ahead = rwal.WalAhead(store, layout, plan.fetch_ahead, cache, parallel=max(2, cfg.archive.parallel // 2),
                          owner=ids, scan=made, window=window)
    remote = cache / rconf.REMOTE_DIR
    remote.mkdir(exist_ok=True)
    for name in plan.remote:
        (remote / name).touch()
    try:
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbops-walahead") as pool:
            ahead.prepare(plan.histories)
            wal_job = pool.submit(ahead.run)  # each segment read for CREATE TABLESPACE before replay may read it
            pool.submit(pgconn.preload)  # the driver's import (0.1-0.2 s) beside the download, not after it
            try:
                with phases("download"):
                    try:
                        download = _download(cfg, store, layout, manifest, plan, run.delta, ids, run.byte_progress)
                    except ValidationError as e:
                        raise BackupDamagedError(plan.backup.backup_id, e) from e
                with phases("configure"):
                    configure(cfg, target, plan, opts)
                with phases("tablespaces"):
                    if window is None:  # mapped: every segment is read first (rwal.window)
                        wal_job.result()
                        if ahead.scan_error is not None:
                            raise ahead.scan_error
                    # Else the server starts now: replay waits for each segment to be fetched and read,
                    # fetched `window` segments ahead of it.
                    new_tablespaces = dict(made.created)
                reached, final_state, running = recover.run(
                    cfg, plan, opts, cache, phases, manifest.pg.pg_version, ahead.check,
                    mounts=tuple((str(f), loc) for loc, f in new_tablespaces.values() if str(f) != loc),
                    relink={oid: f for oid, (_loc, f) in new_tablespaces.items()})
            finally:
                ahead.stop()  # what replay did not ask for is not needed any more
            stats = wal_job.result()
    except BaseException as e:
        discard(target, created=created, delta=run.delta, reason=getattr(e, "message", None) or repr(e))
        if not run.delta:
            for d in plan.tablespaces:
                discard(d.folder, created=d.state == "absent", delta=False, reason="")
        if out_of_space(e):
            raise _out_of_space(e, phases.current, manifest, target, [d.folder for d in plan.tablespaces],
                                cache) from None
        raise
    wal = {"fetched_ahead": stats.segments, "bytes": stats.bytes, "seconds": stats.seconds,
           "read_in_place": reached.pop("wal_read_in_place", False),
           "released_before_promotion": reached.pop("wal_released", 0),
           "not_archived": stats.missing, "failed": {n: e.message for n, e in ahead.failed.items()}}
    return RestoreResult(plan, reached, final_state, running, dict(phases.t), download, wal)


def _out_of_space(e: BaseException, phase: str | None, manifest: mf.Manifest, target: Path,
                  tablespaces: list[Path], cache: Path) -> DbopsError:
    """The one message for a restore whose disk filled up: each folder it writes, with what is free
    there now (what was written is removed already), and the backup's size."""
    def free(folder: Path) -> str:
        try:
            return human_bytes(free_bytes(existing_parent(folder)))
        except OSError:
            return "unknown"

    where = [f"the target folder {target}: {free(target)} free now"]
    where += [f"the tablespace folder {d}: {free(d)} free now" for d in tablespaces]
    where.append(f"the scratch folder (the WAL fetched for the replay) {cache.parent.parent}: {free(cache)} free now")
    cause = error_text(e)
    return DbopsError(
        f"the restore ran out of disk space (ENOSPC: {NO_SPACE})" + (f" during phase {phase}" if phase else ""),
        detail="; ".join(where) + f"; the backup holds {human_bytes(manifest.logical_size)} of files; what this "
               "restore wrote was removed\n" + cause[-1500:],
        hint="free space where it ran out (other files may have filled it), or restore to a larger filesystem "
             "with --target-dir (--tablespace-map for a tablespace), then run the restore again",
    )


class _NewTablespaces:
    """The scan :class:`~dbops.ops.restore.wal.WalAhead` runs on each run of segments before replay may
    read it: the tablespaces its CREATE TABLESPACE records make (not in the backup) get their folders
    (:func:`dbops.ops.restore.tablespaces.created_destinations`: mapped, or their recorded location when
    absent or empty and unused; a folder an earlier CREATE of this replay was given is given again),
    made now: ``created`` {OID: (location, folder)}. A refusal is raised (WalAhead keeps it for the
    restore)."""

    def __init__(self, manifest: mf.Manifest, opts: Options, ids: tuple[int, int] | None):
        self.manifest, self.opts, self.ids = manifest, opts, ids
        self.known = {t.oid for t in manifest.tablespaces}
        self.created: dict[int, tuple[str, Path]] = {}

    def __call__(self, segments: list[str], folder: Path) -> None:
        from dbops.ops.backup.tablespaces import wal_creates

        new = {oid: loc for oid, loc in wal_creates(folder, segments=segments).items()
               if oid not in self.known and oid not in self.created}
        if not new:  # the usual run: no CREATE TABLESPACE, no look at the running servers
            return
        dests = rts.created_destinations(new, self.manifest.tablespaces, mapping=self.opts.tablespace_map,
                                         map_all=self.opts.tablespace_map_all,
                                         given={f for _loc, f in self.created.values()})
        for _loc, f in dests.values():
            f.mkdir(parents=True, mode=0o700, exist_ok=True)
            if self.ids:
                os.chown(f, *self.ids)
        self.created.update(dests)


def _download(cfg: Config, store: ObjectStore, layout: Layout, manifest: mf.Manifest, plan: Plan, delta: bool,
              ids: tuple[int, int] | None, byte_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The backup into the target folder (verified), or only what differs with --delta."""
    from dbops.ops.restore import delta as restore_delta

    t0 = time.monotonic()
    owner = cfg.os_user if ids else None
    dirs = {d.tablespace.oid: str(d.folder) for d in plan.tablespaces}
    if delta:
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
