"""Planned switchover: move the primary role to a standby with no lost commit and a short write gap.

The sequence (each phase timed; see :func:`dbops.ops.failover.plan.describe`):

1. pre-hooks (blocking; a non-zero exit cancels before anything changes), a re-check,
   candidate tuning (:mod:`dbops.ops.failover.candidate`: 10 ms WAL retry interval, restore_command
   suspended, so its promotion is not held up by archive clients or a 5 s retry sleep);
2. CHECKPOINT on the old primary *while it still takes writes*, so the shutdown
   checkpoint has little to flush; PgBouncer PAUSE;
3. stop: fast stop of the old primary through its node controller, returning as soon as
   its control file records the shutdown checkpoint: no WAL follows it, and its
   walsenders stream it out; the postmaster may still be archiving its last segment;
   fence: at once, ``standby.signal`` and a ``primary_conninfo`` naming the candidate are
   written into its data folder, so whoever starts it from now on gets a standby
   (:mod:`dbops.ops.failover.fencing`); a postmaster that raced the fence rolls back;
4. gate: the candidate must have received *and* replayed past that checkpoint within the
   timeout, else the fence is undone and the old primary is started again as primary
   (rolled back, exit 12), once the candidate is confirmed to be still in recovery
   (else exit 8, nothing started). Until promotion nothing is lost by rolling back;
5. promote (``pg_promote(wait => false)`` and a 10 ms poll of ``pg_is_in_recovery()``:
   ``pg_promote``'s own wait loop sleeps 100 ms). Writes resume here;
6. PgBouncer repoint + RESUME, then everything that need not hold writes back:
   tuning undone, slots for the followers, CHECKPOINT on the new primary (before any
   pg_rewind), post-hooks (a VIP or DNS moves now), other standbys repointed (reload),
   the old primary rejoins as a standby (pg_rewind only if its WAL diverged);
7. verify: the new primary takes writes on the new timeline, every follower streams
   from it, the timeline history file is archived.

After the fence the outcome is never reported as "failed": it is rolled back (exit 12),
succeeded, or :class:`UnknownOutcomeError` (exit 8) when it cannot be confirmed.
SIGTERM and SIGHUP unwind like Ctrl-C (further signals are ignored while unwinding), so a
PgBouncer PAUSE is always followed by RESUME. A dbops killed outright (kill -9) leaves at most
one writer: see docs/bad-days.md for what each phase leaves behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dbops import proc
from dbops.config import Config, Node
from dbops.errors import (
    DbopsError,
    PostgresError,
    QueryError,
    PreconditionError,
    RolledBackError,
    UnknownOutcomeError,
)
from dbops.nodes import Fence, NodeController, open_controller
from dbops.ops.failover.candidate import CandidateTuning, put_back_leftover
from dbops.ops.failover import fencing
from dbops.ops.failover.plan import Options, Plan, make_plan
from dbops.ops.failover.pgbouncer import PgBouncer, paused
from dbops.ops.failover.after import AfterPromotion
from dbops.ops.failover.hooks import env_for, run_hooks
from dbops.ops.failover.phases import Observer, Phase, Phases
from dbops.ops.failover.poolerpause import PauseRecord, resume_leftover
from dbops.ops.failover.report import Report, attach
from dbops.pg.lsn import format_lsn, parse_lsn


POLL = 0.01  # seconds between polls on the critical path


class Switchover(AfterPromotion):
    """One switchover run. Holds the connections it keeps open on the critical path."""

    def __init__(self, cfg: Config, plan: Plan, opts: Options, observer: Observer | None = None):
        assert plan.old_primary is not None and plan.candidate is not None
        self.cfg, self.plan, self.opts = cfg, plan, opts
        self.old: Node = plan.old_primary.node
        self.new: Node = plan.candidate.node
        self.others: list[Node] = [s.node for s in plan.others]
        self.report = Report(old_primary=self.old.name, new_primary=self.new.name,
                             old_timeline=plan.old_primary.timeline)
        self.ph = Phases(self.report.phases, self.report.warnings, observer)
        self.phase = self.ph.phase
        self.ctl_old: NodeController = open_controller(self.old)
        self.bouncer = PgBouncer(cfg.failover.pgbouncer) if cfg.failover.pgbouncer else None
        self._store_layout: tuple[Any, Any] | None = None
        self.uses_slots = bool(plan.candidate.settings.get("primary_slot_name"))
        self.candidate_slot = plan.candidate.settings.get("primary_slot_name") or None
        self.lock_check: Callable[[], None] = lambda: None  # ClusterLock.check of the switch lock (execute)
        self._cand: Any = None  # connection to the candidate, open from before the fence to the end
        self._cand_conninfo: str | None = None
        self._checkpoint_lsn: int | None = None
        self._t_fence: float | None = None
        self._history: str | None = None
        self._switch_lsn: int | None = None
        self._postmaster: str | None = None  # the old primary's postmaster before the stop (postmaster.pid)
        self._fence: Fence | None = None
        self.tuning = CandidateTuning(self.new, open_controller(self.new))

    # -- the run ----------------------------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        try:
            self._prepare()
            self._switch()
            self._after()
        except DbopsError as e:
            if self.report.outcome == "running":
                if self._t_fence is None:
                    self.report.outcome = "cancelled"
                    with proc.unwinding():
                        self.ph.guarded("untune candidate", self.tuning.undo)
                else:  # an unforeseen error after the fence: never call that "failed"
                    self.report.outcome = "unknown"
                    e = UnknownOutcomeError(f"switchover interrupted, outcome unknown: {e.message}",
                                            detail=e.detail, hint="run `dbops status` before acting again")
            raise attach(e, self.report) from None
        except KeyboardInterrupt:
            if self._t_fence is None:  # nothing changed yet but the candidate's tuning
                self.report.outcome = "cancelled"
                with proc.unwinding():
                    self.ph.guarded("untune candidate", self.tuning.undo)
                raise
            if self.report.outcome != "running":
                raise  # rolled back already
            self.report.outcome = "unknown"
            raise attach(UnknownOutcomeError(
                "interrupted after the old primary was stopped: outcome unknown",
                hint="run `dbops status`; the new primary may be promoted"), self.report) from None
        finally:
            self._close()
            self.report.total_seconds = round(time.monotonic() - t0, 3)
        return self.report

    def _close(self) -> None:
        if self._cand is not None:
            self._cand.close()
            self._cand = None

    def _prepare(self) -> None:
        fo = self.cfg.failover
        if fo.pre_hooks:
            with self.phase("pre-hooks") as ph:
                failed = run_hooks("pre", fo.pre_hooks, env_for(self.cfg.cluster, self.old, self.new, timeline="",
                                                                switch_lsn=""), self.opts.timeout)
                if failed:
                    ph.ok, ph.detail = False, failed[0]
                    self.report.outcome = "cancelled"
                    raise attach(PreconditionError(f"pre-hook {failed[0]}; switchover cancelled, nothing changed",
                                                    hint="fix what the hook reported, then run again"), self.report)
        with self.phase("recheck"):
            plan = make_plan(self.cfg, Options(to=self.new.name, max_lag=self.opts.max_lag,
                                               timeout=self.opts.timeout, max_xact_age=self.opts.max_xact_age))
            if not plan.ok or plan.old_primary is None or plan.old_primary.name != self.old.name:
                self.report.outcome = "cancelled"
                err = plan.refuse() if not plan.ok else PreconditionError(
                    "the primary changed since the plan; nothing changed")
                raise attach(err, self.report)
            self.plan = plan
        from dbops.pg import conn

        self._cand = conn.connect(self.new, connect_timeout=5)
        self._cand_conninfo = self._cand.execute("select current_setting('primary_conninfo')").fetchone()[0]
        with self.phase("tune candidate") as ph:
            done = [d for d in (put_back_leftover(self.old, self.ctl_old), put_back_leftover(self.new, self.tuning.ctl),
                                resume_leftover(self.cfg, *self._store())) if d]
            ph.detail = "; ".join([*done, self._tune_candidate()])
        with self.phase("checkpoint old primary"), conn.session(self.old) as c:
            c.execute("checkpoint")
            self._postmaster = self.ctl_old.postmaster()

    def _store(self) -> tuple[Any, Any]:
        from dbops.storage import open_archive

        if self._store_layout is None:
            self._store_layout = open_archive(self.cfg.storage)
        return self._store_layout

    def _tune_candidate(self) -> str:
        """Short retry interval and (when safe) no restore_command until promotion; see dbops.ops.failover.candidate."""
        value, version = self._cand.execute("select current_setting('restore_command'), "
                                            "current_setting('server_version_num')::int").fetchone()
        suspend = bool(value) and version >= 140000 and self._next_timeline_free()
        detail = self.tuning.apply(self._cand, suspend_restore_command=suspend)
        if value and not suspend:
            detail += "; restore_command kept (PostgreSQL < 14, or the archive holds the next timeline's history " \
                      "or cannot be checked)"
        return detail

    def _next_timeline_free(self) -> bool:
        cmd = self.plan.candidate.settings.get("archive_command", "") if self.plan.candidate else ""
        if "wal-push" not in cmd:
            return False
        name = f"{(self.report.old_timeline or 1) + 1:08X}.history"
        try:
            store, layout = self._store()
            return store.head(layout.wal_key(name)) is None
        except DbopsError:
            return False

    def _switch(self) -> None:
        """From PAUSE to RESUME: the part that holds writes back."""
        record = PauseRecord(*self._store(), self.bouncer, self.old, self.new) if self.bouncer else None
        if record is not None:
            record.mark()  # a run killed from now on leaves it: the next failover or check resumes the pooler
        t_pause = time.monotonic()
        with paused(self.bouncer, self.opts.timeout, on_resumed=record.clear if record else None) as bouncer:
            self._t_fence = t_pause
            if bouncer is not None:
                self.report.phases.append(Phase("pgbouncer pause", round(time.monotonic() - t_pause, 4)))
            self._fence_and_gate()
            self._promote()
            if bouncer is not None:
                self.ph.guarded("pgbouncer repoint", lambda: self._repoint_bouncer(bouncer))
                self.ph.guarded("pgbouncer resume", bouncer.resume)
        self.report.write_unavailable_seconds = round(time.monotonic() - t_pause, 4)

    def _repoint_bouncer(self, bouncer: PgBouncer) -> str:
        return "repointed " + (", ".join(bouncer.repoint(self.old, self.new)) or "nothing")

    def _fence_and_gate(self) -> None:
        try:
            with self.phase("stop old primary") as ph:
                # Returns once the shutdown checkpoint is on disk: no WAL follows it, while the
                # postmaster may still be archiving its last segment (waited for before the rejoin).
                cd = self.ctl_old.fence("fast", timeout=self.opts.timeout)
                if cd.state != "shut down":
                    raise PostgresError(f"{self.old.name} did not shut down cleanly (state: {cd.state})")
                self._checkpoint_lsn = cd.checkpoint_lsn
                self.report.shutdown_checkpoint_lsn = format_lsn(cd.checkpoint_lsn)
                ph.detail = f"shutdown checkpoint {self.report.shutdown_checkpoint_lsn}"
            with self.phase("fence old primary") as ph:
                # no slot yet: the new primary creates it after promotion (the rejoin sets it)
                self._fence = fencing.fence_old_primary(self.ctl_old, self.new,
                                                        conninfo_template=self._cand_conninfo, slot=None)
                if fencing.raced(self._fence, self._postmaster):
                    raise PreconditionError(f"{self.old.name} was started again by someone else during the "
                                            f"switchover ({self._fence.postmaster}); not promoting {self.new.name}")
                ph.detail = f"standby.signal, primary_conninfo -> {self.new.name}"
            with self.phase("candidate caught up") as ph:
                ph.detail = self._wait_caught_up()
        except BaseException as e:
            self._rollback(e)
            raise  # _rollback raises; kept for the type checker

    def _wait_caught_up(self) -> str:
        """Poll the candidate until it has received and replayed past the shutdown checkpoint."""
        from dbops.pg import conn

        target = self._checkpoint_lsn
        assert target is not None
        deadline = time.monotonic() + self.opts.timeout
        last = "no answer"
        while True:
            try:
                if self._cand is None or self._cand.closed:
                    self._cand = conn.connect(self.new, connect_timeout=2)
                recv, replay = self._cand.execute(
                    "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text").fetchone()
                recv_i = parse_lsn(recv) if recv else 0
                replay_i = parse_lsn(replay) if replay else 0
                last = f"received {recv}, replayed {replay}"
                if recv_i > target and replay_i > target:
                    return last
            except DbopsError as e:
                last = f"candidate unreachable: {_why(e)}"
                if self._cand is not None and not self._cand.closed:
                    self._cand.close()
                self._cand = None
            if time.monotonic() >= deadline:
                raise PreconditionError(f"{self.new.name} did not receive and replay past the shutdown checkpoint "
                                        f"{format_lsn(target)} within {self.opts.timeout:.0f} s ({last})")
            time.sleep(POLL)

    def _rollback(self, cause: BaseException) -> None:
        """Before promotion: bring the old primary back as primary (it holds every commit)."""
        why = cause.message if isinstance(cause, DbopsError) else f"interrupted ({type(cause).__name__})"
        with proc.unwinding(), self.phase("rollback") as ph:
            not_confirmed = fencing.candidate_still_standby(self.new)
            if not_confirmed:
                ph.ok, ph.detail = False, not_confirmed
                self.report.outcome = "unknown"
                fenced = "fenced as a standby" if self._fence else "stopped"
                raise attach(UnknownOutcomeError(
                    f"switchover failed ({why}); rollback refused: cannot confirm {self.new.name} is still a "
                    f"standby", detail=f"{not_confirmed}; {self.old.name} was left {fenced}, not restarted "
                    "(two primaries are worse than none)",
                    hint=f"run `dbops status`: if {self.new.name} is primary, start {self.old.name} (it follows "
                         f"{self.new.name}); if not, remove standby.signal from {self.old.name} and start it"),
                    self.report) from None
            try:
                if self.ctl_old.is_running():
                    self.ctl_old.stop("fast", timeout=self.opts.timeout)  # a stop may still be in progress
                if self._fence is not None:
                    self.ctl_old.unfence(self._fence)
                else:
                    self.ctl_old.remove_standby_signal()
                self.ctl_old.start(timeout=self.opts.timeout)
                self._assert_writable(self.old)
                self.ph.guarded("untune candidate", self.tuning.undo)
            except DbopsError as e:
                ph.ok, ph.detail = False, e.message
                self.report.outcome = "unknown"
                raise attach(UnknownOutcomeError(
                    f"switchover failed ({why}) and the rollback failed too: {e.message}",
                    detail=e.detail, hint=f"{self.new.name} was NOT promoted; start {self.old.name} as primary "
                    f"(its data is complete) and check its server log"), self.report) from None
        self.report.outcome = "rolled_back"
        if not isinstance(cause, DbopsError):
            raise cause
        raise attach(RolledBackError(f"switchover failed, rolled back: {why}",
                                      detail=f"{self.old.name} is primary again and takes writes; "
                                             f"{self.new.name} was not promoted",
                                      hint=f"check {self.new.name} (dbops status, its server log), then retry"),
                      self.report) from None

    def _assert_writable(self, node: Node) -> None:
        from dbops.pg import conn

        with conn.session(node) as c:
            if c.execute("select pg_is_in_recovery()").fetchone()[0]:
                raise PostgresError(f"{node.name} is in recovery, not writable")

    def _promote(self) -> None:
        with self.phase("promote") as ph:
            self.lock_check()  # a run that lost the switch lock (stopped past its TTL) never promotes
            try:
                self._cand.execute("select pg_promote(false)")
                deadline = time.monotonic() + self.opts.timeout
                while self._cand.execute("select pg_is_in_recovery()").fetchone()[0]:
                    if time.monotonic() >= deadline:
                        raise PostgresError(f"{self.new.name} still in recovery after {self.opts.timeout:.0f} s")
                    time.sleep(POLL)
                self.report.timeline = int(self._cand.execute(
                    "select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
                ph.detail = f"timeline {self.report.timeline}"
            except DbopsError as e:
                self.report.outcome = "unknown"
                msg = _why(e)
                self.ph.guarded("untune candidate", self.tuning.undo)
                raise attach(UnknownOutcomeError(
                    f"promotion of {self.new.name} requested, outcome unknown: {msg}",
                    detail=f"{self.old.name} is stopped (clean shutdown at {self.report.shutdown_checkpoint_lsn}) "
                           f"and fenced as a standby of {self.new.name}; {self.new.name} may be promoting",
                    hint=f"run `dbops status`: if {self.new.name} is primary, start {self.old.name} (it follows "
                         f"{self.new.name}); if it is still a standby, remove standby.signal from {self.old.name} "
                         "and start it again"), self.report) from None


def execute(cfg: Config, plan: Plan, opts: Options, *, observer: Observer | None = None,
            lock: Callable[[], Any] | None = None) -> Report:
    """Run a planned switchover under the cluster lock. Raises with ``.report`` attached on failure."""
    if not plan.ok:
        raise plan.refuse()
    sw = Switchover(cfg, plan, opts, observer)
    with proc.sigterm_as_interrupt(), (lock or (lambda: cluster_lock(cfg)))() as held:
        sw.lock_check = getattr(held, "check", None) or sw.lock_check  # before promoting: still ours?
        return sw.run()


def _why(e: DbopsError) -> str:
    """The server's (or driver's) own words for a failed statement, else the message."""
    return e.detail.strip() if isinstance(e, QueryError) and e.detail else e.message


def cluster_lock(cfg: Config, store: Any = None, *, command: str = "failover") -> Any:
    """The switch lock (a failover of either kind, a rejoin), on `store` when the
    caller opened it already."""
    from dbops.storage import open_archive
    from dbops.storage.lock import SWITCH, ClusterLock

    return ClusterLock(*open_archive(cfg.storage, store), SWITCH, command=command, ttl=cfg.storage.lock_ttl,
                       os_user=cfg.os_user)


__all__ = ["Options", "Plan", "Report", "Switchover", "cluster_lock", "execute", "make_plan"]
