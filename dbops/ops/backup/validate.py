"""Proving a backup: restore it into scratch, replay the archive to a target in a throwaway
PostgreSQL, check it, stop it in recovery.

``prove(...)`` is the one way a stored backup is proved, used by `dbops backup` (before it
builds the next link from the proved copy) and by `dbops verify --restore`. A fresh base
backup (the first run) goes through ``recover_to_target`` the same way. The target itself (captured
on the primary, or a backup's own point) and the WAL up to it come from :mod:`dbops.ops.backup.target`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dbops import log, proc
from dbops.config import Config
from dbops.errors import DbopsError, EngineError, NotFoundError, StorageError, ValidationError
from dbops.ops.backup import basesave, shadow
from dbops.ops.backup import tablespaces as tbs
from dbops.ops.backup.checks import run_checks
from dbops.ops.backup.environment import environment_cause, environment_error, server_detail
from dbops.ops.backup.recoveryconf import (RECOVERY_SETTINGS_BASE, RECOVERY_SETTINGS_PG15, pg_major, standby_minimums,
                                          write_recovery_signal)
from dbops.ops.backup.relfiles import RelFiles
from dbops.ops.backup.replay import raise_if_disk_full, restartpoint_beside, wait_paused
from dbops.ops.backup.target import Target, capture_fetching_ahead, fetch_wal, own_target
from dbops.pg import controldata
from dbops.pg import relmap as relmap_reader
from dbops.pg.lsn import format_lsn, segment_of_lsn
from dbops.phases import Phases
from dbops.repo import manifest as mf
from dbops.repo import relmap as relmap_store
from dbops.repo.known import Known
from dbops.repo.restore import restore_snapshot
from dbops.repo.model import PAGE
from dbops.repo.savedpages import SavedPages, Saver
from dbops.runtime import InstanceSpec, Runtime, open_runtime
from dbops.runtime.walfolder import link_wal
from dbops.runtime.scratch import copy_stays_cached, room_beside_copy, scratch_folder
from dbops.storage import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup")


@dataclass
class Validation:
    backup_id: str
    ok: bool
    timings: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    replayed_lsn: int | None = None
    last_commit_time: float | None = None
    relation_map: bytes | None = None  # read at the target (stored form); stored with the backup taken there
    tablespace_names: dict[int, str] = field(default_factory=dict)  # OID -> name, read at the target
    checksums: Checksums | None = None  # pg_checksums still running (see recover_to_target's ``stack``)
    scratch_cache: str | None = None  # the downloaded copy's pages: "kept" in the page cache or "dropped"

    def settle(self) -> None:
        """Wait for a pg_checksums still running; ok once it passed (raises ValidationError if not)."""
        if self.checksums is not None:
            self.checksums.wait()
        self.ok = True

    @contextmanager
    def verdict_first(self) -> Iterator[None]:
        """Around work on the copy while pg_checksums still runs (the store): when that work fails,
        the check's verdict comes first when it has one (its failure stopped the store, and it is the
        backup's fault); a check still running is stopped instead of waited for (minutes at TB sizes),
        and the work's own error is raised."""
        try:
            yield
        except Exception:
            if self.checksums is not None:
                self.checksums.stop()
                try:
                    self.checksums.wait()  # raises the check's ValidationError, when it failed first
                except proc.Cancelled:
                    pass
            raise


class Checksums:
    """``pg_checksums --check`` over the stopped copy in a worker thread, while the caller reads the
    copy (to store it). ``failed`` is set as soon as it fails; ``wait()`` raises its error.

    ``then``: run in the same thread once the check has ended and its verdict is known (the throwaway
    instance's removal, off the run's serial path); it delays neither ``wait()`` nor the verdict, and
    its failure is only logged (the instance's own removal when the caller's stack closes tries again
    and reports it).

    ``check(cancel)``: stops its tool and raises :class:`dbops.proc.Cancelled` once ``cancel`` is set
    (:meth:`stop`): when the store beside it failed, or the run ends without having asked for the
    verdict (interrupted); ``wait()`` then raises that Cancelled, and ``failed`` stays clear."""

    def __init__(self, check: Callable[[threading.Event], None], timings: dict[str, float],
                 then: Callable[[], None] | None = None) -> None:
        self.failed = threading.Event()
        self.cancel = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-checksums")
        self._verdict: Future = Future()
        t0 = time.monotonic()

        def run() -> None:
            try:
                check(self.cancel)
            except proc.Cancelled as e:
                timings["checksums"] = round(time.monotonic() - t0, 3)
                self._verdict.set_exception(e)
            except BaseException as e:
                self.failed.set()
                timings["checksums"] = round(time.monotonic() - t0, 3)
                self._verdict.set_exception(e)
            else:
                timings["checksums"] = round(time.monotonic() - t0, 3)
                self._verdict.set_result(None)
            if then is not None:
                try:
                    then()
                except Exception as e:  # noqa: BLE001  tried again, and reported, when the stack closes
                    log.event(_log, logging.WARNING, "could not remove the throwaway instance after pg_checksums; "
                              "trying again at the end of the run", error=getattr(e, "message", None) or str(e))

        self._job: Future = self._pool.submit(run)

    def wait(self) -> None:
        self._verdict.result()

    def stop(self) -> None:
        """The verdict is no longer wanted: the tool is stopped, unless it has ended (its verdict stays)."""
        self.cancel.set()

    def close(self) -> None:
        """Wait for it to end (the instance and the copy it reads go after this), stopping it first: a
        run that wanted the verdict had it from wait() before; its error is wait()'s."""
        self.stop()
        self._pool.shutdown(wait=True)


class _Stopped(Exception):
    """The job beside the download stopped because the download failed (never reported)."""


class Beside:
    """The WAL job that runs beside the download of the previous backup, tied to it both ways: when
    the download fails, the job stops at its next step (:meth:`step`) rather than capturing,
    downloading and scanning on for nothing; when the job fails, the download stops at its next
    range (:meth:`progress`) and the job's own error is the one raised (:meth:`result`)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.job: Future | None = None

    def step(self) -> None:
        if self.stop.is_set():
            raise _Stopped()

    def failed(self) -> bool:
        return self.job is not None and self.job.done() and not self.job.cancelled() \
            and self.job.exception() is not None

    def progress(self, then: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            if self.failed():
                raise _Stopped()
            if then is not None:
                then(done, total)
        return progress

    def result(self) -> Any:
        assert self.job is not None
        return self.job.result()


def scratch_cached(mode: str, size: int) -> bool:
    """Whether the validation's download leaves its copy of size bytes in the page cache
    (``backup.scratch_cache``: keep, drop, or auto: :func:`dbops.runtime.scratch.copy_stays_cached`)."""
    cached = mode == "keep" or (mode == "auto" and copy_stays_cached(size))
    if not cached:
        log.event(_log, logging.INFO, "the scratch copy's pages are written back and dropped from the page cache "
                  "as it is written", bytes=size, scratch_cache=mode)
    return cached


def restore_seconds(t: dict[str, float]) -> float:
    """The measured restore time: download + WAL fetch + start + replay."""
    return round(sum(t.get(k, 0.0) for k in ("download", "wal_fetch", "start", "replay")), 3)


# --------------------------------------------------------------------------- validation run


class _Kept:
    """The instance's own removal when the block ends (its ``__exit__``), unless ``handed`` on."""

    def __init__(self, inst) -> None:
        self.inst = inst
        self.handed = False

    def __enter__(self) -> "_Kept":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if not self.handed:
            self.inst.__exit__(et, ev, tb)


def read_relation_map(inst) -> bytes | None:
    """Which relfilenodes are which tables at the target (for `restore --before-drop`), in its stored
    form; a failure to read it costs that feature for this backup, never the backup."""
    try:
        return relmap_store.encode(lambda out: relmap_reader.write(inst.node, inst.node(), out))
    except DbopsError as e:
        log.event(_log, logging.WARNING, "could not read the relation map", error=e.message, detail=e.detail)
        return None


def scan_wal(cfg: Config, tablespaces: tbs.ScratchTablespaces, wal_dir: Path) -> None:
    """The CREATE TABLESPACE records replay will meet: each gets a scratch folder."""
    tablespaces.read_wal(wal_dir, cfg.os_user, None if cfg.runtime.image else cfg.runtime.bin_dir)


def recover_to_target(cfg: Config, data: Path, wal_dir: Path, target: Target, phases: Phases,
                      name: str, tablespaces: tbs.ScratchTablespaces | None = None,
                      stack: ExitStack | None = None, wal_scanned: bool = False,
                      known: Known | None = None, runtime: Runtime | None = None,
                      after_copy: list[Callable[[], None]] | None = None) -> Validation:
    """Start PostgreSQL on data in a throwaway instance, replay to target, check, stop cleanly.
    Tablespaces: read from / written to the run's scratch folders only (see ops.backup.tablespaces).

    ``wal_scanned``: the tablespaces already read the WAL folder (``scan_wal``). ``known``: the files
    whose content the download recorded; pg_checksums' shadow folder links to them (see
    :meth:`dbops.repo.known.Known.linked`).
    With ``stack``, ``pg_checksums --check`` of the stopped copy runs on in the background once this
    returns (``val.checksums``; the copy may be read meanwhile, never changed): the caller lists
    nothing before ``val.settle()`` returned, and the instance stays until the stack closes. Without
    it, the check has passed when this returns (``val.ok``), and once it has run in the background the
    instance is removed there (its server stopped, nothing else needs it) rather than when the stack closes.
    ``runtime``: the runtime to start the server with (default: the configuration's, opened here).
    ``after_copy``: once its server stopped cleanly, the instance's removal is appended there rather
    than done here or when the stack closes: run once the copy is gone (``scratch_folder``'s
    ``after``), a container's exit then finds the copy's pages no more to write out (see
    :mod:`dbops.runtime.container`)."""
    val = Validation(backup_id="", ok=False)
    mounts: tuple[tuple[str, str], ...] = ()
    if tablespaces is not None:
        if not wal_scanned:
            with phases("wal_scan"):
                scan_wal(cfg, tablespaces, wal_dir)
        mounts = tablespaces.mounts(cfg.runtime.engine)
    settings = dict(RECOVERY_SETTINGS_BASE)
    if pg_major(data) >= 15:
        settings.update(RECOVERY_SETTINGS_PG15)
    settings.update(standby_minimums(data))
    settings["recovery_target_lsn"] = format_lsn(target.lsn)
    settings["recovery_target_timeline"] = str(target.timeline)
    write_recovery_signal(data, cfg.os_user)
    linked = link_wal(wal_dir, data)  # recovery reads the fetched WAL in place rather than copying it
    rt = runtime if runtime is not None else open_runtime(cfg.runtime)
    timeout = cfg.backup.validation.start_timeout
    with phases("start"):
        try:
            inst = rt.start(InstanceSpec(data_dir=data, port=proc.free_port(), wal_dir=wal_dir, settings=settings,
                                         name=name, mounts=mounts, wal_linked=linked))
        except DbopsError as e:
            raise environment_error(f"the {rt.engine} runtime could not start the throwaway PostgreSQL",
                                    "container runtime or host failure", e.detail or e.message) from None
    kept = _Kept(inst)
    with ExitStack() as own:
        (stack if stack is not None else own).enter_context(kept)
        with phases("start"):
            try:
                inst.wait_ready(timeout)
            except EngineError as e:  # the engine could not say whether the server runs: not the backup
                raise environment_error(e.message, "container runtime or host failure",
                                        "\n".join(x for x in (e.detail, e.hint) if x)) from None
            except DbopsError as e:
                detail = (e.detail or e.message) + "\n" + server_detail(inst)
                if inst.is_running():  # alive but not ready in time: the start timeout, not the backup
                    raise environment_error(f"PostgreSQL did not accept connections within {timeout:.0f} s",
                                            "backup.validation.start_timeout too short for this machine",
                                            detail) from None
                cause = environment_cause(detail)
                if cause:
                    raise environment_error("PostgreSQL exited while starting", cause, detail) from None
                raise_if_disk_full(data)
                raise ValidationError("PostgreSQL did not start on the restored backup", detail=detail) from None
        with phases("replay"):
            val.replayed_lsn, val.last_commit_time = wait_paused(inst, data, target, timeout)
        val.checks.append({"check": "consistency", "ok": True, "replayed_lsn": format_lsn(val.replayed_lsn)})
        verified = RelFiles()  # the main forks the checks read in full: the server verified their pages
        with phases("checks"), restartpoint_beside(inst, timeout) as restartpoint:
            run_checks(cfg, inst, val.checks, verified)
            val.relation_map = read_relation_map(inst)
            val.tablespace_names = tbs.names(inst.node())
        with phases("stop"):
            try:
                inst.stop("fast", timeout=timeout)
            except EngineError as e:  # the engine, not the backup: the server's state is unknown
                raise environment_error(e.message, "container runtime or host failure",
                                        "\n".join(x for x in (e.detail, e.hint) if x)) from None
        if after_copy is not None:  # the server is down: its container may outlive the copy
            kept.handed = True
            after_copy.append(inst.remove)
        if tablespaces is not None:
            tablespaces.relink(data)
        cd = controldata.read(str(data), bin_dir=None)
        if cd.state != "shut down in recovery":
            raise ValidationError(f"the throwaway instance did not stop in recovery (state: {cd.state})",
                                  detail=inst.logs(30))
        if cfg.backup.validation.checksums and cd.data_checksums:
            # Pages replay left dirty were written by the restart point (else: every file to pg_checksums).
            left_to_server = verified if restartpoint.written else None

            def check(cancel: threading.Event | None = None) -> None:
                shadow.pg_checksums(cfg, inst, data, left_to_server, val.checks,
                                    known.linked if known is not None else None, cancel=cancel)

            if stack is None:
                with phases("checksums"):
                    check()
            else:  # entered after the instance, so it ends before the instance goes
                val.checksums = Checksums(check, phases.t, then=None if kept.handed else inst.remove)
                stack.callback(val.checksums.close)
                log.event(_log, logging.INFO, "pg_checksums runs on while the copy is stored")
    if val.checksums is None:
        val.ok = True
    return val




# --------------------------------------------------------------------------- proving a stored backup


@dataclass
class Proof:
    data: Path  # the proved copy, stopped in recovery at the target (removed when prove() ends)
    target: Target
    validation: Validation
    tablespaces: tbs.ScratchTablespaces  # the copy's tablespace folders (in the scratch folder)
    saved: SavedPages | None = None  # with save_bases: the pages replay changed, as they were before it
    known: Known | None = None  # the files as the download finished them: m's entries (dbops.repo.known)


@contextmanager
def prove(cfg: Config, store: ObjectStore, layout: Layout, m: mf.Manifest, phases: Phases, *, run_id: str,
          name: str, target: Target | Callable[[], Target] | None = None,
          byte_progress: Callable[[int, int], None] | None = None,
          background_checksums: bool = False, save_bases: bool = False,
          removals: list[threading.Thread] | None = None) -> Iterator[Proof]:
    """Restore backup m into a scratch folder (every chunk checked against its hash) while the archived
    WAL from its redo point to the target downloads, replay to the target (default: the backup's own
    consistent point) in a throwaway instance, run the checks, stop it in recovery.

    ``target`` may be a function that captures it (on the primary): it runs while the backup
    downloads (timed as ``capture``, with the WAL archived so far downloading meanwhile), and the
    rest of the WAL up to it downloads after it, then is scanned for CREATE TABLESPACE
    (``wal_scan``), still beside the download. Yields the proof
    while the scratch folder still holds the proved copy. A backup that cannot be restored,
    missing WAL and failed checks raise ValidationError; so does ``proof.validation.settle()``
    when ``background_checksums`` let pg_checksums run on while the caller reads the copy.
    ``save_bases``: the pages replay will change (read from the WAL beside the download,
    ``bases_predict``) are copied aside once the download is done, before the server starts
    (``bases_save``; ``proof.saved``, see :mod:`dbops.ops.backup.basesave`): the bases of the next
    incremental's page deltas. ``byte_progress(done, total)``: the download's bytes, for a progress display. ``removals``: the
    scratch folder is removed in a thread put there (see :func:`dbops.runtime.scratch.scratch_folder`)."""
    after_copy: list[Callable[[], None]] = []  # the stopped server's container: removed once the copy is gone
    with scratch_folder(Path(cfg.backup.scratch_dir), run_id, cfg.os_user, removals=removals,
                        after=after_copy) as scratch, ExitStack() as stack:
        data, wal = scratch / "data", scratch / "wal"
        wal.mkdir()
        proc.chown_to(wal, cfg.os_user)
        ts = tbs.ScratchTablespaces(scratch, known={t.oid: t for t in m.tablespaces})
        ts.prepare(cfg.os_user)
        start_segment = segment_of_lsn(m.pg.timeline, m.pg.redo_lsn, m.pg.wal_segment_size)
        if callable(target) and phases.progress:
            phases.progress("capture")

        beside = Beside()

        def target_and_wal() -> Target:
            t0 = time.monotonic()
            if callable(target):  # the WAL archived so far downloads while the target is captured
                t = capture_fetching_ahead(cfg, store, layout, start_segment, m.pg.wal_segment_size, wal, target)
                phases.t["capture"] = round(time.monotonic() - t0, 3)
            else:
                t = target or own_target(m)
            beside.step()
            t_wal = time.monotonic()
            fetch_wal(cfg, store, layout, start_segment, t, wal)
            beside.step()
            t_scan = time.monotonic()
            phases.t["wal_fetch"] = round(t_scan - t_wal, 3)
            scan_wal(cfg, ts, wal)  # it needs the WAL only, not the download
            beside.step()
            t_predict = time.monotonic()
            phases.t["wal_scan"] = round(t_predict - t_scan, 3)
            if saver is not None:  # the pages of files already downloaded are copied here, the others as they come
                basesave.predict_into(saver, wal, None if cfg.runtime.image else cfg.runtime.bin_dir)
                phases.t["bases_predict"] = round(time.monotonic() - t_predict, 3)
            return t

        # The side file takes no more than what the scratch folder has beyond the copy (with its margins)
        # and the store's spool of packs, and never more than the most pages predicted.
        saver = Saver(data, str(scratch / "bases"), limit=min(
            basesave.MAX_PAGES * PAGE,
            room_beside_copy(Path(cfg.backup.scratch_dir), m.logical_size, cfg.backup.scratch_limit,
                             (2 + cfg.backup.parallel) * cfg.backup.pack_size))) if save_bases else None
        if saver is not None:
            stack.callback(saver.close)

        known = Known()

        def file_done(rel: str) -> None:  # the download's last write to it: its content is m's entry
            known.record(rel, str(data / rel))
            if saver is not None:
                saver.file_done(rel)

        runtime: list[Runtime] = []

        def open_runtime_beside() -> None:  # the engine's calls before a first start, beside the download
            try:
                rt = open_runtime(cfg.runtime)
                prepare = getattr(rt, "prepare", None)
                if prepare is not None:
                    prepare()
            except Exception:  # noqa: BLE001  recover_to_target opens (and prepares) it again, and says why not
                return
            runtime.append(rt)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="dbops-wal") as pool:
            beside.job = pool.submit(target_and_wal)
            runtime_job = pool.submit(open_runtime_beside)
            cached = scratch_cached(cfg.backup.scratch_cache, m.logical_size)
            with phases("download"):
                try:
                    restore_snapshot(store, layout, m, str(data), parallel=cfg.backup.parallel, owner=cfg.os_user,
                                     tablespace_dirs=ts.dirs(), durable=False, drop_cache=not cached,
                                     progress=beside.progress(byte_progress), on_file=file_done)
                    # durable=False: a scratch copy, a crash throws it away
                except _Stopped:
                    if beside.failed():
                        beside.result()  # the WAL job's own error (a failed capture, a gap, storage)
                    raise
                except (NotFoundError, StorageError) as e:
                    beside.stop.set()
                    if isinstance(e, StorageError) and not isinstance(e, NotFoundError):
                        raise
                    raise ValidationError(f"backup {m.backup_id} cannot be restored: {e.message}",
                                          detail=e.detail) from None
                except BaseException:
                    beside.stop.set()  # the WAL job stops at its next step
                    raise
            reached = beside.result()  # a failed capture, a gap or a storage error in the WAL download: here
            runtime_job.result()
        known.seal(str(scratch))  # before anything else writes to the copy
        saved = None
        if saver is not None:  # the folder is the backup just restored, checked; no server ran on it yet
            with phases("bases_save"):
                saved = basesave.finish(saver)
            if saved is not None:
                stack.callback(saved.close)
        val = recover_to_target(cfg, data, wal, reached, phases, name=name, tablespaces=ts,
                                stack=stack if background_checksums else None, wal_scanned=True, known=known,
                                runtime=runtime[0] if runtime else None, after_copy=after_copy)
        val.backup_id = m.backup_id
        val.scratch_cache = "kept" if cached else "dropped"
        yield Proof(data, reached, val, ts, saved, known)
