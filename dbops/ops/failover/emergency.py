"""`dbops failover --primary-lost`: promote a standby when the primary is gone.

The sequence (each phase timed; the plan is :mod:`dbops.ops.failover.assess`):

1. fence the old primary: through its node controller when it reaches the host (stop
   immediate, leave ``standby.signal``), and always the ``failover.fence_hooks``. A failing
   hook, or no way to fence at all, stops here (exit 11) unless ``--no-fence``;
2. the candidate stops trying to stream (``primary_conninfo = ''``) and retries every 10 ms.
   When the archive holds WAL it has not received, it replays from there (its own
   ``restore_command``, else ``dbops wal-fetch`` derived from its ``archive_command``); when it
   does not, ``restore_command`` is suspended (an archive client per retry would only delay
   the promotion). Everything is reloaded, nothing restarted;
3. catch up: wait until it has replayed what it received and, from the archive, the last
   record of the newest archived segment of its timeline (read again after the fence);
4. promote (``restore_command`` suspended, so the promotion runs no archive client);
5. PgBouncer repointed (and resumed, when a killed switchover left it paused); tuning undone; slots, CHECKPOINT; post-hooks; the other standbys
   repointed (``pg_rewind`` only for one that received WAL past the switch point); verify;
6. report what may be lost (:mod:`dbops.ops.failover.loss`).

The old primary is not touched further: ``dbops rejoin OLD`` rewinds it once it is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

from dbops import proc
from dbops.config import Config, Node
from dbops.errors import DbopsError, LossPossibleError, PostgresError, PreconditionError, UnknownOutcomeError
from dbops.nodes import open_controller
from dbops.ops.failover import replication as repl
from dbops.ops.failover.assess import ArchiveEnd, LostOptions, LostPlan, has_lsn, read_archive
from dbops.ops.failover.after import post_hooks, repoint, settle_new_primary, unconfirmed, verify_new_primary
from dbops.ops.failover.candidate import CandidateTuning
from dbops.ops.failover.hooks import env_for, run_hooks
from dbops.ops.failover.loss import LostReport, for_plan, iso, last_recovered_commit
from dbops.ops.failover.walgap import archive_gap, restore_command_for
from dbops.ops.failover.phases import Observer, Phases
from dbops.ops.failover.report import attach
from dbops.ops.failover.switchover import cluster_lock
from dbops.pg import conn
from dbops.pg.lsn import format_lsn, parse_lsn

POLL = 0.01
SETTLE = 0.3  # seconds replay must stand still below the received LSN (an incomplete last record)


class Emergency:
    def __init__(self, cfg: Config, plan: LostPlan, opts: LostOptions, observer: Observer | None = None):
        assert plan.old_primary is not None and plan.candidate is not None
        self.cfg, self.plan, self.opts, self.observer = cfg, plan, opts, observer
        self.old: Node = plan.old_primary.node
        self.new: Node = plan.candidate.node
        self.others: list[Node] = [s.node for s in plan.others]
        self.report = LostReport(self.old.name, self.new.name, old_timeline=plan.candidate.timeline)
        self.tuning = CandidateTuning(self.new)
        self.archive: ArchiveEnd = plan.archive
        self.uses_slots = bool(plan.candidate.settings.get("primary_slot_name"))
        self._t0 = opts.started if opts.started is not None else time.monotonic()
        self._restore_cmd: str | None = None  # the restore_command that replays the archive, when there is one
        self._restore_suspended = False
        self._version = 0
        self._history: str | None = None
        self._switch: int | None = None
        self._replayed_ts: float | None = None
        self._cand_conninfo: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-archive")
        self.ph = Phases(self.report.phases, self.report.warnings, observer)

    # -- the run ----------------------------------------------------------------------------------------

    def run(self, lock: Callable[[], Any]) -> LostReport:
        self.report.plan_seconds = round(time.monotonic() - self._t0, 3)
        try:
            with ExitStack() as held:
                try:
                    with self.ph.phase("lock"):
                        held.enter_context(lock())
                    self._fence()
                    archive: Future[ArchiveEnd] | None = None
                    if self.archive.dbops:  # read the archive's end again, after the fence
                        archive = self._pool.submit(read_archive, self.cfg, self.archive.timeline or 1,
                                                    store=self.plan.store, previous=self.plan.archive)
                    self._tune()
                    self._catch_up(archive)
                    self._promote()
                except BaseException as e:
                    if self.report.outcome == "running":
                        self.report.outcome = "cancelled"
                        self._untune()
                    if isinstance(e, DbopsError):
                        attach(e, self.report)
                    raise
                self._after()
        finally:
            self._pool.shutdown(wait=False)
            self.report.total_seconds = round(time.monotonic() - self._t0, 3)
        return self.report

    def _untune(self) -> None:
        self.ph.guarded("untune candidate", lambda: self.tuning.undo())

    def _fence(self) -> None:
        with self.ph.phase("fence old primary") as ph:
            ctl_ok, ctl_detail = self._fence_controller()
            hooks = self.cfg.failover.fence_hooks
            env = env_for(self.cfg.cluster, self.old, self.new)
            failed = run_hooks("fence", hooks, env, self.opts.timeout) if hooks else []
            fenced = not failed and (ctl_ok or bool(hooks))
            self.report.fence = {"controller_ok": ctl_ok, "controller": ctl_detail, "hooks": len(hooks),
                                 "hook_failure": failed[0] if failed else None, "fenced": fenced,
                                 "no_fence": self.opts.no_fence}
            ph.detail = f"controller: {ctl_detail}; hooks: " + (failed[0] if failed else f"{len(hooks)} ok")
            if fenced:
                return
            why = f"fence hook {failed[0]}" if failed else f"its controller could not stop it ({ctl_detail}) and " \
                                                            "no fence hooks are configured"
            if not self.opts.no_fence:
                raise PreconditionError(f"promotion stopped: {self.old.name} could not be fenced: {why}",
                                        detail=f"nothing was promoted; {self.new.name} is still a standby",
                                        hint="fix the fence (make sure the old primary cannot write), then run again; "
                                             "--no-fence promotes anyway, and then there may be two primaries")
            self.report.notes.append(f"{self.old.name} was NOT fenced ({why}; --no-fence): if it comes back it "
                                     f"may accept writes next to {self.new.name}")

    def _fence_controller(self) -> tuple[bool, str]:
        try:
            ctl = open_controller(self.old)
            ctl.clear_stale_pidfile()  # after a crash its pid may be another process's: never signal that one
            ctl.stop("immediate", timeout=min(self.opts.timeout, 30.0))
            if ctl.is_running():
                return False, "still running after an immediate stop"
            ctl.add_standby_signal()
            return True, "stopped (immediate); standby.signal left"
        except DbopsError as e:
            detail = (e.detail or "").strip().splitlines()
            return False, e.message + (f": {detail[-1]}" if detail else "")

    def _tune(self) -> None:
        with self.ph.phase("candidate: replay from the archive") as ph, conn.session(self.new) as c:
            restore, version, archive_cmd, self._cand_conninfo = c.execute(
                "select current_setting('restore_command'), current_setting('server_version_num')::int, "
                "current_setting('archive_command'), current_setting('primary_conninfo')").fetchone()
            self._version = version
            self._restore_cmd = restore or None
            if not restore:
                derived = restore_command_for(archive_cmd or "")
                if derived and version >= 140000:
                    self._restore_cmd = derived
                    self.report.restore_command_set = True
                else:
                    why = "PostgreSQL < 14 needs a restart for it" if derived else "archive_command is not dbops'"
                    self.report.notes.append(f"{self.new.name} has no restore_command ({why}): no archive replay")
            extra = {"primary_conninfo": ""}
            # An archive client run per retry would only delay the promotion when the archive holds nothing new
            if version >= 140000 and self._archive_needed(self.archive) is False:
                extra["restore_command"] = ""
                self._restore_suspended = True
            elif self._restore_cmd and self._restore_cmd != restore:
                extra["restore_command"] = self._restore_cmd
            ph.detail = self.tuning.apply(c, suspend_restore_command=False, extra=extra)

    def _archive_needed(self, a: ArchiveEnd) -> bool | None:
        """Does the archive hold a record the candidate has not? None: cannot tell (it keeps restore_command)."""
        if not a.dbops:
            return False
        if not a.checked or a.later_timelines:
            return None
        if a.last_record_lsn is None:
            return False
        cand = self.plan.candidate
        return a.last_record_lsn >= max(cand.receive_lsn or 0, cand.replay_lsn or 0) if cand else None

    def _resume_archive(self) -> None:
        """The archive grew past the candidate after all: let it replay from there."""
        if self._restore_suspended and self._restore_cmd and self._archive_needed(self.archive):
            with conn.session(self.new) as c:
                self.tuning.apply(c, suspend_restore_command=False, extra={"restore_command": self._restore_cmd})
            self._restore_suspended = False

    def _catch_up(self, archive: Future[ArchiveEnd] | None) -> None:
        with self.ph.phase("catch up") as ph:
            if archive is not None:
                self.archive = archive.result(timeout=self.opts.timeout)
                self._resume_archive()
            target = self.archive.last_record_lsn
            deadline = time.monotonic() + self.opts.timeout
            last, still_since, state = None, time.monotonic(), "no answer"
            while True:
                try:
                    with conn.session(self.new, connect_timeout=2) as c:
                        while True:
                            recv_s, replay_s, ts = c.execute(
                                "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, "
                                "extract(epoch from pg_last_xact_replay_timestamp())::float8").fetchone()
                            recv = parse_lsn(recv_s) if recv_s else None
                            replay = parse_lsn(replay_s) if replay_s else 0
                            now = time.monotonic()
                            if replay != last:
                                last, still_since = replay, now
                            state = f"received {recv_s}, replayed {replay_s}"
                            archive_ok = target is None or replay > target
                            own_ok = recv is None or replay >= recv or now - still_since >= SETTLE
                            if archive_ok and own_ok:
                                self._replayed_ts = ts
                                ph.detail = state + (f"; archive's last record {format_lsn(target)}" if target else "")
                                return
                            if now >= deadline:
                                break
                            time.sleep(POLL)
                except PostgresError as e:
                    state = f"{self.new.name} unreachable: {e.message}"
                if time.monotonic() >= deadline:
                    raise PreconditionError(
                        f"promotion stopped: {self.new.name} did not replay the archive's last record "
                        f"{format_lsn(target) if target else '-'} within {self.opts.timeout:.0f} s ({state})",
                        detail=f"nothing was promoted; newest archived segment {self.archive.segment}",
                        hint=f"check {self.new.name}'s server log (restore_command, dbops wal-fetch); "
                             "raise --timeout for a long archive; then run again")
                time.sleep(0.2)

    def _promote(self) -> None:
        with self.ph.phase("promote") as ph:
            try:
                with conn.session(self.new) as c:
                    # Every restore_command run (an archive client) would hold the promotion up; safe to drop
                    # when the archive holds no later timeline's history (promotion probes for one).
                    if self.archive.checked and not self.archive.later_timelines and not self._restore_suspended \
                            and self._version >= 140000:
                        self.tuning.apply(c, suspend_restore_command=True)
                        self._restore_suspended = True
                    if self._restore_suspended:
                        ph.detail = self._wait_restore_idle(c)
                    c.execute("select pg_promote(false)")
                    deadline = time.monotonic() + self.opts.timeout
                    while c.execute("select pg_is_in_recovery()").fetchone()[0]:
                        if time.monotonic() >= deadline:
                            raise PostgresError(f"{self.new.name} still in recovery after {self.opts.timeout:.0f} s")
                        time.sleep(POLL)
                    self.report.seconds_to_writable = round(time.monotonic() - self._t0, 3)
                    self.report.timeline = int(c.execute(
                        "select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
                ph.detail = f"timeline {self.report.timeline}" + (f" ({ph.detail})" if ph.detail else "")
                self.report.outcome = "promoted"
            except DbopsError as e:
                self.report.outcome = "unknown"
                self._untune()
                raise attach(UnknownOutcomeError(
                    f"promotion of {self.new.name} requested, outcome unknown: {e.message}", detail=e.detail,
                    hint=f"run `dbops status`: if {self.new.name} is primary, continue by hand (repoint the "
                         "standbys); if it is still a standby, run `dbops failover --primary-lost` again"),
                    self.report) from None

    def _wait_restore_idle(self, c: Any) -> str | None:
        """Until the startup process is out of a restore_command run begun before the reload: it rereads its
        configuration between retries, and promoting first would probe the archive with the old one (seconds)."""
        deadline, waited = time.monotonic() + min(self.opts.timeout, 10.0), False
        while c.execute("select count(*) from pg_stat_activity where backend_type = 'startup' "
                        "and wait_event = 'RestoreCommand'").fetchone()[0] and time.monotonic() < deadline:
            waited = True
            time.sleep(POLL)
        if waited:
            time.sleep(3 * POLL)  # one retry round (wal_retrieve_retry_interval = 10ms) rereads the configuration
            return "waited for a restore_command run to end"
        return None

    # -- after writes resumed -----------------------------------------------------------------------------

    def _after(self) -> None:
        fo = self.cfg.failover
        if fo.pgbouncer:
            from dbops.ops.failover.pgbouncer import PgBouncer

            bouncer = PgBouncer(fo.pgbouncer)
            self.ph.guarded("pgbouncer repoint",
                            lambda: "repointed " + (", ".join(bouncer.repoint(self.old, self.new)) or "nothing"))
            self.ph.guarded("pgbouncer resume", self._resume_pooler)
        self.ph.guarded("untune candidate", lambda: self.tuning.undo())
        self.ph.guarded("new primary: slots, checkpoint", self._settle)
        self.ph.guarded("archive WAL only the standbys had", self._archive_gap)
        post_hooks(self.ph, self.cfg, self.old, self.new, timeline=self.report.timeline, switch_lsn=self._switch,
                   timeout=self.opts.timeout)
        for n in self.others:
            self.ph.guarded(f"repoint {n.name}", lambda n=n: self._repoint(n))
        verify_new_primary(self.ph, self.cfg, self.report, self.new, self.others, self.plan.candidate,
                           self.opts.timeout)
        self.ph.guarded("loss report", self._loss)
        err = unconfirmed(self.report)
        if err is not None:
            raise err
        loss = self.report.loss
        if loss is not None and loss.possible:
            raise attach(LossPossibleError(
                f"{self.new.name} is primary on timeline {self.report.timeline}; commits may be lost",
                detail="\n  " + "\n  ".join(loss.reasons),
                hint=f"the report names the LSNs; when {self.old.name} is back, `dbops rejoin {self.old.name}` "
                     "lists the commits only it had"), self.report)

    def _settle(self) -> None:
        slots = [repl.slot_name_for(s.name, s.settings.get("primary_slot_name")) for s in self.plan.others] \
            if self.uses_slots else []
        with conn.session(self.new) as c:
            self._history, self._switch = settle_new_primary(c, slots, self.report.timeline or 0)

    def _archive_gap(self) -> str:
        cand = self.plan.candidate
        res, detail = archive_gap(self.archive, (cand.settings.get("archive_command") or "") if cand else "",
                                  self.new, self._switch, self.report.old_timeline or 1, self.opts.timeout)
        self.report.archived_from_standby = res.pushed
        self.report.notes += [f"! {name} is neither in the archive nor in {self.new.name}'s pg_wal: the archive has "
                              "a gap before the new timeline; take a full backup (`dbops backup --full`)"
                              for name in res.missing]
        self.report.warnings += [f"archiving {why}" for why in res.failed]
        return detail

    def _resume_pooler(self) -> str:
        """RESUME a pooler that a killed planned switchover left paused (its record in the bucket):
        clients held by that PAUSE would otherwise wait on the new primary forever."""
        from dbops.ops.failover.poolerpause import resume_leftover
        from dbops.storage import open_archive

        return resume_leftover(self.cfg, *open_archive(self.cfg.storage, self.plan.store)) or "not left paused"

    def _repoint(self, node: Node) -> None:
        st = self.plan.topology.get(node.name)
        slot = repl.slot_name_for(node.name, st.settings.get("primary_slot_name")) if self.uses_slots else None
        had = has_lsn(st)
        cand_had = has_lsn(self.plan.candidate) if self.plan.candidate else None
        # WAL past the switch point that the candidate did not hold too (the same incomplete last record is
        # overwritten by the new timeline's stream), or replayed past it: only pg_rewind makes it follow
        beyond = self._switch is not None and had is not None and had > max(self._switch, cand_had or 0)
        replayed_past = self._switch is not None and (st.replay_lsn or 0) > self._switch
        if beyond or replayed_past:
            decision = repl.RewindDecision(True, f"received WAL up to {format_lsn(had)}, past the switch point "
                                                 f"{format_lsn(self._switch)}")
            repl.rejoin(open_controller(node), self.new, conninfo_template=self._cand_conninfo, slot=slot,
                        history=self._history, new_timeline=self.report.timeline or 0, timeout=self.opts.timeout,
                        decision=decision)
            self.report.repointed[node.name] = f"pg_rewind: {decision.reason}"
            return
        repoint(node, self.new, conninfo_template=self._cand_conninfo, slot=slot, timeout=self.opts.timeout)
        self.report.repointed[node.name] = "primary_conninfo (reload)"

    def _loss(self) -> None:
        switch = self._switch
        if switch is None:
            with conn.session(self.new) as c:  # no history file readable: the end of the replayed WAL
                switch = parse_lsn(c.execute("select pg_current_wal_lsn()::text").fetchone()[0])
        self.report.loss = loss = for_plan(self.plan, self.archive, switch)
        loss.last_commit_time = iso(self._replayed_ts)
        try:
            found = last_recovered_commit(open_controller(self.new), switch, old_timeline=self.report.old_timeline or 1,
                                          new_timeline=self.report.timeline or 2, seg_size=self.archive.seg_size)
        except DbopsError as e:
            self.report.notes.append(f"last recovered commit not read with pg_waldump: {e.message}")
            return
        if found is not None:
            loss.last_commit_lsn, loss.last_commit_xid, loss.last_commit_time = (format_lsn(found.lsn), found.xid,
                                                                                 iso(found.time))


def execute(cfg: Config, plan: LostPlan, opts: LostOptions, *, observer: Observer | None = None,
            lock: Callable[[], Any] | None = None) -> LostReport:
    """Run a --primary-lost failover under the cluster lock. Raises with ``.report`` attached when it
    did not end with "promoted, nothing known lost"."""
    if not plan.ok:
        raise plan.refuse()
    em = Emergency(cfg, plan, opts, observer)
    with proc.sigterm_as_interrupt():
        return em.run(lock or (lambda: cluster_lock(cfg, plan.store, command="failover --primary-lost")))


__all__ = ["Emergency", "LostReport", "execute", "restore_command_for"]
