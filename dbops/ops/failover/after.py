"""A switchover after promotion: writes go to the new primary; now settle it, run the post-hooks,
repoint the other standbys, rejoin the old primary, verify. Every step gets its turn: a failure is
recorded as a warning (the outcome is then "unknown"), never stops the others.

A mixin of :class:`dbops.ops.failover.switchover.Switchover`, whose state it reads (the plan, the
report, the open connection to the new primary, the controllers).
"""

from __future__ import annotations

from collections.abc import Callable

from dbops.config import Node
from dbops.errors import DbopsError, UnknownOutcomeError
from dbops.nodes import open_controller
from dbops.ops.failover import replication as repl
from dbops.ops.failover.plan import FAIL
from dbops.ops.failover.report import attach
from dbops.ops.failover.verify import verify
from dbops.pg.lsn import format_lsn, parse_history


class AfterPromotion:
    def _after(self) -> None:
        followers = [self.old, *self.others]
        self._guarded("untune candidate", self.tuning.undo)
        self._guarded("new primary: slots, checkpoint", lambda: self._settle_new_primary(followers))
        if self.cfg.failover.post_hooks:  # early: a VIP or DNS record should follow the writes at once
            with self.phase("post-hooks") as ph:
                failed = self.run_hooks("post", self.cfg.failover.post_hooks)
                if failed:
                    ph.ok, ph.detail = False, failed[0]
                    self.report.warnings.append(f"post-hook {failed[0]}")
        for n in self.others:
            self._guarded(f"repoint {n.name}", lambda n=n: self._repoint(n))
        self._guarded("rejoin old primary", self._rejoin_old)
        with self.phase("verify"):
            cand = self.plan.candidate
            self.report.verification = verify(
                self.cfg, self.new, followers, timeline=self.report.timeline or 0,
                old_timeline=self.report.old_timeline or 0, timeout=self.opts.timeout,
                archive_command=cand.settings.get("archive_command", "") if cand else "")
        bad = [f for f in self.report.verification if f.status == FAIL]
        if bad or self.report.warnings:
            self.report.outcome = "unknown"
            lines = [f"{f.check}: {f.message}" for f in bad] + self.report.warnings
            raise attach(UnknownOutcomeError(
                f"{self.new.name} is primary on timeline {self.report.timeline}, but not everything could be "
                f"confirmed", detail="\n  " + "\n  ".join(lines),
                hint="see each item; `dbops status` shows the topology now"), self.report)
        self.report.outcome = "succeeded"

    def _guarded(self, name: str, fn: Callable[[], None]) -> None:
        """A post-promotion step: a failure is recorded (and shows in verification), never stops the others
        (a connection lost included: it comes as a PostgresError)."""
        try:
            with self.phase(name):
                fn()
        except DbopsError as e:
            self.report.warnings.append(f"{name}: {e.message}" + (f" ({e.detail})" if e.detail else ""))

    def _settle_new_primary(self, followers: list[Node]) -> None:
        """Slots for the followers (before the checkpoint, so they keep the WAL since the switch), CHECKPOINT
        (pg_rewind must see the new timeline in the control file), forget the old upstream, read the history."""
        if self.uses_slots:
            for n in followers:
                repl.ensure_slot(self._cand, self._slot_of(n))
        self._cand.execute("checkpoint")
        repl.clear_upstream(self._cand)
        self._history = repl.read_history(self._cand, self.report.timeline or 0)
        entries = parse_history(self._history) if self._history else []
        if entries:
            self.report.switch_lsn = format_lsn(entries[-1][1])

    def _slot_of(self, node: Node) -> str:
        st = self.plan.topology.get(node.name)
        return repl.slot_name_for(node.name, st.settings.get("primary_slot_name"))

    def _rejoin_old(self) -> None:
        from dbops.pg import conn

        decision = repl.rejoin(self.ctl_old, self.new, conninfo_template=self._cand_conninfo,
                               slot=self._slot_of(self.old) if self.uses_slots else None, history=self._history,
                               new_timeline=self.report.timeline or 0, timeout=self.opts.timeout)
        self.report.rewind = {"needed": decision.needed, "reason": decision.reason}
        stale = {self._slot_of(n) for n in self.others} | ({self.candidate_slot} if self.candidate_slot else set())
        if stale:
            with conn.session(self.old) as c:
                repl.drop_inactive_slots(c, stale)

    def _repoint(self, node: Node) -> None:
        from dbops.pg import conn

        slot = self._slot_of(node) if self.uses_slots else None
        with conn.session(node) as c:
            current = c.execute("select current_setting('primary_conninfo')").fetchone()[0]
            repl.set_upstream(c, repl.follow_conninfo(current or self._cand_conninfo, self.new, node.name), slot)
            version = int(c.execute("select current_setting('server_version_num')").fetchone()[0])
        if version < 130000:  # primary_conninfo became reloadable in PostgreSQL 13
            open_controller(node).restart("fast", timeout=self.opts.timeout)
