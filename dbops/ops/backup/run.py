"""`dbops backup`: the validated chain.

Every run proves the previous backup before it builds the next one:

1. restore the newest usable backup from storage into a scratch folder, with every chunk
   checked against its hash;
2. meanwhile, capture a target on the primary: ``CHECKPOINT``, the WAL insert LSN and the
   time, then ``pg_switch_wal()`` so that the segment holding the target reaches the archive;
3. then (still beside the download) fetch the WAL from the backup's redo point to the target
   out of the archive, verified, into a folder that is mounted into a throwaway PostgreSQL;
4. start PostgreSQL on the restored copy in that throwaway instance, recovering up to the
   target in hot standby. Reaching consistency and replaying to the target proves both the
   backup and the archive between the two;
5. run the validation checks while it is up: connect to every database, read every table
   (or pg_amcheck it), and run the user's SQL assertions;
6. stop it at the target. The server shuts down in recovery, and that stopped folder is the
   new snapshot. Run ``pg_checksums --check`` on it;
7. store only the chunks that changed (while pg_checksums reads the same folder), write the
   manifest last, once pg_checksums passed, and record the previous backup as ``validated``
   together with the measured time of each phase.

The first run, with nothing in the catalog, takes a base backup from the source and carries
it through steps 2 to 7 in the same way, so even the first stored snapshot has been started
and checked.

When validation fails, the previous backup is marked ``failed`` with the reason. With
``heal`` (the default), a fresh full backup follows at once, storing all of its content
again, so the next good backup does not depend on a broken one. The run still exits with
the validation code. A gap in the WAL archive after the previous backup is the archive's
fault, not the backup's: see :mod:`dbops.ops.backup.gap`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from dbops import __version__, heap, log, proc
from dbops.config import Config, Node
from dbops.errors import DbopsError, LockedError, PostgresError, ValidationError
from dbops.ops.backup import basecopy, livecopy, prestore
from dbops.ops.backup import gap as walgap
from dbops.ops.backup import tablespaces as tbs
from dbops.ops.backup.target import (ArchiveStalledError, Target, capture_fetching_ahead, capture_target,
                                     fetch_wal)
from dbops.ops.backup.result import BackupResult
from dbops.ops.backup.validate import Validation, prove, recover_to_target, restore_seconds
from dbops.ops.wal.archive import WalGapError
from dbops.pg import conn as pgconn
from dbops.pg import controldata
from dbops.pg.inspect import find_primary
from dbops.pg.lsn import format_lsn
from dbops.phases import Phases
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.repo import pgstate
from dbops.repo import relmap as relmap_store
from dbops.repo.known import Known
from dbops.repo.savedpages import SavedPages
from dbops.repo.packs import PendingUploads
from dbops.repo.store import store_snapshot
from dbops.runtime.scratch import (check_scratch_space, clean_stale_scratch, join_removals, out_of_space,
                                   scratch_folder, scratch_full_error)
from dbops.storage import ObjectStore, open_archive, request_counts, requests_since
from dbops.storage.guard import GuardedStore
from dbops.storage.lock import BACKUP, ClusterLock

_log = log.get("backup")


# --------------------------------------------------------------------------- the source side


def source_node(cfg: Config, primary: Node) -> Node:
    return cfg.node(cfg.backup.source) if cfg.backup.source else primary


# --------------------------------------------------------------------------- the run


def in_background(fn: Callable[..., Any], *args: Any, name: str) -> Future:
    """fn(*args) in a daemon thread of its own; its result (or exception) in the Future returned. Unlike a
    pool's worker, a thread nobody waits for any more (the run failed meanwhile) never holds the exit."""
    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  handed to whoever asks for the result
            done.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


class BackupRun:
    def __init__(self, cfg: Config, *, store: ObjectStore | None = None, progress: Callable[[str], None] | None = None,
                 byte_progress: Callable[[int, int], None] | None = None):
        self.cfg = cfg
        self.store, self.layout = open_archive(cfg.storage, store)
        self.run_id = catalog.new_backup_id().split("-", 1)[1] + f"{os.getpid():x}"
        self.progress = progress
        self.byte_progress = byte_progress  # (done, total) bytes of the phase running now (download, store)
        self.scratch_root = Path(cfg.backup.scratch_dir)
        self.phases: Phases | None = None  # of the part running now (full or incremental)
        self.removals: list[threading.Thread] = []  # scratch folders being removed (joined before run() ends)

    # -- public

    def run(self, *, full: bool = False) -> BackupResult:
        requests_before = request_counts(self.store)
        try:
            res = self._run(full=full)
        finally:
            join_removals(self.removals)
        res.s3_requests = requests_since(self.store, requests_before)  # the lock's release included
        return res

    def _run(self, *, full: bool) -> BackupResult:
        raw = self.store
        # The primary is looked for (a session on each node, 0.1-0.3 s) while the lock is taken and the
        # catalog listed; a run that does not get the lock does not wait for it (a daemon thread).
        primary = in_background(find_primary, self.cfg.nodes, name="dbops-primary")
        with proc.sigterm_as_interrupt(), ClusterLock(raw, self.layout, BACKUP, command="backup",
                                                      ttl=self.cfg.storage.lock_ttl, os_user=self.cfg.os_user) as lock:
            self.store = GuardedStore(raw, lock)  # every write and delete checks the lock is still ours
            try:
                return self._locked(full, primary)
            finally:
                self.store = raw

    def _locked(self, full: bool, primary_found: Future) -> BackupResult:
        clean_stale_scratch(self.scratch_root)
        backups = catalog.list_backups(self.store, self.layout)
        primary = primary_found.result()
        prev = next((b for b in reversed(backups) if b.usable), None)
        try:
            if prev is None or full:
                res = self._full(primary, reason="first backup" if prev is None else "--full requested")
            else:
                res = self._validate_and_build(primary, prev)
        except (OSError, DbopsError) as e:
            if out_of_space(e):
                raise scratch_full_error(self.scratch_root, self.phases and self.phases.current, e) from None
            raise
        if self.cfg.backup.retention.auto:
            res.pruned = self._auto_prune(res)
        return res

    def _auto_prune(self, res: BackupResult) -> dict[str, Any]:
        """backup.retention.auto: apply the policy now, under the lock this run holds."""
        from dbops.ops.catalogview import apply_retention

        if self.progress:
            self.progress("prune")
        try:
            return apply_retention(self.store, self.layout, self.cfg.backup.retention)
        except DbopsError as e:
            e.message = f"backup {res.backup_id} was stored, but applying the retention policy failed: {e.message}"
            e.hint = e.hint or "the backup is fine; `dbops backup prune --confirm` applies the policy once fixed"
            raise

    def _validate_and_build(self, primary: Node, prev: catalog.BackupInfo) -> BackupResult:
        """The next link; a failed validation marks prev failed and (with heal) takes a fresh full backup."""
        try:
            return self._incremental(primary, prev)
        except WalGapError as gap:  # the archive's fault: prove what the backup itself can do
            try:
                val, reach, timings = walgap.prove_before_gap(self.cfg, self.store, self.layout, prev.backup_id, gap,
                                                              run_id=self.run_id, progress=self.progress,
                                                              byte_progress=self.byte_progress)
            except ValidationError as e:
                return self._failed(primary, prev, e)
            walgap.record(self.store, self.layout, prev.backup_id, val, reach, timings, run_id=self.run_id)
            healed = None
            if self.cfg.backup.validation.heal:
                healed = self._full(primary, reason=f"the WAL archive has a gap after {prev.backup_id} "
                                                    f"({reach.missing} missing)").backup_id
            raise walgap.gap_error(prev.backup_id, reach, healed) from None
        except ValidationError as e:
            return self._failed(primary, prev, e)

    def _failed(self, primary: Node, prev: catalog.BackupInfo, e: ValidationError) -> BackupResult:
        """prev failed validation: mark it failed and (with heal) take a fresh full backup; raises."""
        if isinstance(e, ArchiveStalledError) or out_of_space(e):
            raise e  # not the previous backup's fault
        self._mark_failed(prev.backup_id, e)
        if not self.cfg.backup.validation.heal:
            raise e
        log.event(_log, logging.WARNING, "validation failed; healing with a fresh full backup",
                  backup=prev.backup_id, reason=e.message)
        healed = self._full(primary, reason=f"healing after {prev.backup_id} failed validation")
        healed.healed_after = prev.backup_id
        raise ValidationError(
            f"backup {prev.backup_id} failed validation: {e.message}",
            detail=(e.detail + "\n" if e.detail else "")
            + f"the chain was healed: new full backup {healed.backup_id} stored and validated at start",
            hint="the failed backup stays listed as failed; investigate the storage or archive it names",
        ) from None

    # -- phases

    def _full(self, primary: Node, *, reason: str) -> BackupResult:
        heap.map_large_buffers()  # the uploads' 1 MiB read buffers given back when freed (dbops.heap)
        heap.few_arenas()  # its pools one after another: memory freed by one thread is reused by the next
        with heap.fewer_collections():  # the stores' block records are walked less often (dbops.heap)
            return self._full_backup(primary, reason)

    def _full_backup(self, primary: Node, reason: str) -> BackupResult:
        cfg = self.cfg
        join_removals(self.removals)  # a failed validation's copy: its space is needed again
        source = source_node(cfg, primary)
        phases = self.phases = Phases(self.progress)
        with pgconn.session(source) as c:
            size = int(pgconn.scalar(c, "SELECT sum(pg_database_size(oid))::bigint FROM pg_database") or 0)
        check_scratch_space(self.scratch_root, size, cfg.backup.scratch_limit, owner=cfg.os_user)
        log.event(_log, logging.INFO, "full backup", reason=reason, source=source.name)
        # The copy is removed in a thread while the status is recorded (joined before run() returns).
        after_copy: list[Callable[[], None]] = []  # the stopped server's container: removed once the copy is gone
        with scratch_folder(self.scratch_root, self.run_id, cfg.os_user, removals=self.removals,
                            after=after_copy) as scratch, ExitStack() as stack:
            data, wal = scratch / "data", scratch / "wal"
            wal.mkdir()
            proc.chown_to(wal, cfg.os_user)
            ts = tbs.ScratchTablespaces(scratch, known={t.oid: t for t in tbs.query(source)})
            ts.prepare(cfg.os_user)
            backup_id = catalog.new_backup_id()
            # Copy and store overlap: the direct copy is stored as it is made (each range once the copy
            # wrote it, see livecopy.Copied), pg_basebackup's once it is complete; the store goes on while
            # the target is captured, its WAL fetched and the throwaway server replays, checks and stops;
            # the final store then reuses every block recovery did not touch.
            cancel = threading.Event()
            uploads: list[PendingUploads] = []  # the prestore's last packs, finished before the manifest
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-prestore") as pool, \
                    ExitStack() as pending:
                pending.callback(lambda: [u.abort() for u in uploads])  # unless finished by the final store
                pre: list[Future] = []
                known: list[Known] = []  # the files as the copy wrote them (and the prestore read them)

                def store_first(plan: livecopy.CopyPlan | None = None, copied: livecopy.Copied | None = None) -> None:
                    t_pre = time.monotonic()
                    known.append(copied.known if copied is not None else prestore.known_folder(data, ts))
                    pre.append(pool.submit(prestore.prestore, cfg, self.store, self.layout, data, backup_id, cancel,
                                           ts, plan, copied, uploads))
                    pre[0].add_done_callback(
                        lambda _f: phases.t.__setitem__("prestore", round(time.monotonic() - t_pre, 3)))

                try:
                    basecopy.take(cfg, source, data, ts, phases, run_id=self.run_id, follow=store_first)
                    ts.relink(data)  # a tablespace created since the query went elsewhere: refused here
                    start_segment, start_lsn = basecopy.label_start_segment(data), basecopy.label_start_lsn(data)
                    if not pre:  # pg_basebackup: stored from the moment it is complete
                        store_first()
                    for k in known:  # before the throwaway server writes: the clock past the copy's writes
                        k.seal(str(scratch))
                    with phases("capture"):  # the WAL archived so far downloads meanwhile
                        target = capture_fetching_ahead(cfg, self.store, self.layout, start_segment,
                                                        controldata.read(str(data)).wal_segment_size, wal,
                                                        self._capture)
                    with phases("wal_fetch"):
                        fetch_wal(cfg, self.store, self.layout, start_segment, target, wal)
                    # pg_checksums runs on beside the final store (which lists nothing before it passed).
                    val = recover_to_target(cfg, data, wal, target, phases, name=f"backup-{self.run_id}",
                                            tablespaces=ts, stack=stack, known=known[0] if known else None,
                                            after_copy=after_copy)
                except BaseException:
                    cancel.set()
                    raise
                finally:
                    reuse = pre[0].result() if pre else None
                manifest = self._store(data, target, val, phases, parents=(), parent_id=None, kind="full",
                                       backup_id=backup_id, reuse=reuse, unchanged_lsn=start_lsn,
                                       tablespaces=ts.snapshot(data, val.tablespace_names), uploads=uploads,
                                       known=known[0] if known else None)
        # Started and checked before it was stored; `validated` comes when a later run restores it from storage.
        catalog.record_status(self.store, self.layout, manifest.backup_id, catalog.STORED, run_id=self.run_id,
                              phase="first-start", timings=dict(phases.t),
                              detail={"checks": val.checks, "kind": "full", "reason": reason})
        return BackupResult(manifest.backup_id, "full", None, self.run_id, None, manifest, phases.t)

    def _incremental(self, primary: Node, prev: catalog.BackupInfo) -> BackupResult:
        cfg = self.cfg
        phases = self.phases = Phases(self.progress)
        prev_m = mf.load(self.store, self.layout, prev.backup_id, keep_listing=True)  # restored next
        check_scratch_space(self.scratch_root, prev_m.logical_size, cfg.backup.scratch_limit,
                            owner=cfg.os_user)
        # Captured on the primary while the previous backup downloads (the WAL up to it follows).
        with prove(cfg, self.store, self.layout, prev_m, phases, run_id=self.run_id, name=f"backup-{self.run_id}",
                   target=self._capture, byte_progress=self.byte_progress, background_checksums=True,
                   save_bases=True, removals=self.removals) as proof:
            val, target = proof.validation, proof.target
            try:  # after a failover the new primary may keep a tablespace elsewhere: record where
                proof.tablespaces.current = {t.oid: t for t in tbs.query(primary)}
            except PostgresError:  # gone since the run began: the locations already recorded stay
                pass
            # pg_checksums reads the copy while it is stored: the manifest waits for it to pass, a failure
            # stops the store (its packs, in no manifest, are orphans that retention removes).
            manifest = self._store(proof.data, target, val, phases, parents=(prev_m,), parent_id=prev.backup_id,
                                   kind="incremental", unchanged_lsn=prev_m.pg.redo_lsn, saved=proof.saved,
                                   known=proof.known,
                                   tablespaces=proof.tablespaces.snapshot(proof.data, val.tablespace_names))
        val.timings = {k: v for k, v in phases.t.items() if k in ("download", "wal_fetch", "start", "replay",
                                                                  "checks", "stop", "checksums")}
        catalog.record_status(self.store, self.layout, prev.backup_id, catalog.VALIDATED, run_id=self.run_id,
                              phase="validate", timings=val.timings,
                              detail={"checks": val.checks, "by_backup": manifest.backup_id,
                                      "restore_seconds": restore_seconds(val.timings),
                                      "replayed_to": format_lsn(val.replayed_lsn or 0)})
        return BackupResult(manifest.backup_id, "incremental", prev.backup_id, self.run_id, val, manifest, phases.t)

    def _capture(self) -> Target:
        """The target, captured on the primary (:func:`capture_target`)."""
        return capture_target(self.cfg, archive_wait=self.cfg.archive.push_timeout * 2, store=self.store,
                              layout=self.layout)

    def _store(self, data: Path, target: Target, val: Validation, phases: Phases, *, parents, parent_id,
               kind: str, tablespaces: dict, unchanged_lsn: int | None = None, backup_id: str | None = None,
               reuse: mf.Manifest | None = None, saved: SavedPages | None = None,
               uploads: Sequence[PendingUploads] = (), known: Known | None = None) -> mf.Manifest:
        cfg = self.cfg
        backup_id = backup_id or catalog.new_backup_id()
        # Consistent at the captured target: everything before it is in the snapshot, and the
        # segment holding it is archived (the replay went on to the end of the switch record).
        pg = pgstate.read(str(data), consistent_lsn=target.lsn, consistent_time=target.time)
        checking = val.checksums  # still running: the store stops when it fails, the manifest waits for it

        def settle() -> None:  # before the manifest: every pack it names is stored, pg_checksums passed
            for u in uploads:
                u.finish()
            val.settle()

        with phases("store"), val.verdict_first():
            if val.relation_map is not None:  # before the manifest: a listed backup has its map
                relmap_store.save(self.store, self.layout, backup_id, val.relation_map)
            manifest = store_snapshot(
                self.store, self.layout, str(data), backup_id=backup_id, parent_manifests=parents,
                compression=cfg.compression, chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size,
                parallel=cfg.backup.parallel, pg=pg, parent_id=parent_id, timings=phases.t,
                unchanged_lsn=unchanged_lsn if (parents or reuse) else None, tmp_dir=str(data.parent), reuse=reuse,
                progress=self.byte_progress,
                meta={"kind": kind, "run_id": self.run_id, "target_lsn": format_lsn(target.lsn),
                      "replayed_lsn": format_lsn(val.replayed_lsn or target.lsn),
                      "target_time": target.time, "last_commit_time": val.last_commit_time,
                      "host": socket.gethostname(), "dbops_version": __version__, "checks": val.checks},
                tablespaces=tablespaces, cancel=checking.failed if checking else None, before_manifest=settle,
                saved=saved, known=known,
            )
        log.event(_log, logging.INFO, "backup stored", backup=backup_id, kind=kind,
                  stored_bytes=manifest.stored_bytes, logical_size=manifest.logical_size)
        return manifest

    def _mark_failed(self, backup_id: str, e: ValidationError) -> None:
        try:
            catalog.record_status(self.store, self.layout, backup_id, catalog.FAILED, run_id=self.run_id,
                                  phase="validate", reason=e.message, detail={"detail": (e.detail or "")[-4000:]})
        except LockedError:
            raise  # the lock is gone: stop here, write nothing more
        except DbopsError as e2:  # the validation error is what matters; say that recording failed too
            log.event(_log, logging.ERROR, "could not record the failed validation", error=e2.message)


def run_backup(cfg: Config, *, full: bool = False, progress: Callable[[str], None] | None = None,
               store: ObjectStore | None = None, byte_progress: Callable[[int, int], None] | None = None) -> BackupResult:
    return BackupRun(cfg, store=store, progress=progress, byte_progress=byte_progress).run(full=full)
