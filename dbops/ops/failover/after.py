"""After promotion: writes go to the new primary. The steps that settle it, shared by the planned
switchover (:mod:`dbops.ops.failover.switchover`) and ``--primary-lost``
(:mod:`dbops.ops.failover.emergency`): slots and CHECKPOINT on the new primary, the post-hooks,
repointing a standby, verification and its verdict. Each runs as a guarded phase
(:meth:`Phases.guarded`): a failure is recorded as a warning (the outcome is then "unknown"), never
stops the others (a connection lost included: it comes as a PostgresError).

:class:`AfterPromotion` is the switchover's sequence (a mixin of ``Switchover``, whose state it reads:
the plan, the report, the open connection to the new primary, the controllers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dbops.config import Config, Node
from dbops.errors import DbopsError, UnknownOutcomeError
from dbops.nodes import open_controller
from dbops.ops.failover import replication as repl
from dbops.ops.failover.hooks import env_for, run_hooks
from dbops.ops.failover.phases import Phases
from dbops.ops.failover.plan import FAIL
from dbops.ops.failover.report import attach
from dbops.ops.failover.verify import verify
from dbops.ops.topology import NodeState
from dbops.pg import conn
from dbops.pg.lsn import format_lsn, parse_history


def settle_new_primary(c: Any, slots: Iterable[str], timeline: int) -> tuple[str | None, int | None]:
    """Slots for the followers (before the checkpoint, so they keep the WAL since the switch), CHECKPOINT
    (pg_rewind must see the new timeline in the control file), forget the old upstream. Returns the new
    timeline's history file and the switch point it names (None when it cannot be read)."""
    for slot in slots:
        repl.ensure_slot(c, slot)
    c.execute("checkpoint")
    repl.clear_upstream(c)
    history = repl.read_history(c, timeline)
    entries = parse_history(history) if history else []
    return history, (entries[-1][1] if entries else None)


def post_hooks(ph: Phases, cfg: Config, old: Node, new: Node, *, timeline: int | None, switch_lsn: int | None,
               timeout: float) -> None:
    """failover.post_hooks, early after promotion: a VIP or DNS record should follow the writes at once."""
    if not cfg.failover.post_hooks:
        return
    with ph.phase("post-hooks") as p:
        env = env_for(cfg.cluster, old, new, timeline=str(timeline or ""),
                      switch_lsn=format_lsn(switch_lsn) if switch_lsn is not None else "")
        failed = run_hooks("post", cfg.failover.post_hooks, env, timeout)
        if failed:
            p.ok, p.detail = False, failed[0]
            ph.warnings.append(f"post-hook {failed[0]}")


def repoint(node: Node, new: Node, *, conninfo_template: str | None, slot: str | None, timeout: float) -> None:
    """A standby follows the new primary: its primary_conninfo (host and port changed, the rest kept) and
    slot, reloaded (restarted before PostgreSQL 13, where primary_conninfo was not reloadable)."""
    with conn.session(node) as c:
        current = c.execute("select current_setting('primary_conninfo')").fetchone()[0]
        repl.set_upstream(c, repl.follow_conninfo(current or conninfo_template, new, node.name), slot)
        version = int(c.execute("select current_setting('server_version_num')").fetchone()[0])
    if version < 130000:
        open_controller(node).restart("fast", timeout=timeout)


def verify_new_primary(ph: Phases, cfg: Config, report: Any, new: Node, followers: list[Node],
                       candidate: NodeState | None, timeout: float) -> None:
    """The new primary takes writes on the new timeline, the followers stream from it, the history file is
    archived: into report.verification."""
    with ph.phase("verify"):
        report.verification = verify(
            cfg, new, followers, timeline=report.timeline or 0, old_timeline=report.old_timeline or 0,
            timeout=timeout, archive_command=candidate.settings.get("archive_command", "") if candidate else "")


def unconfirmed(report: Any) -> DbopsError | None:
    """UnknownOutcomeError (with the report) when verification failed or a step left a warning."""
    bad = [f for f in report.verification if f.status == FAIL]
    if not bad and not report.warnings:
        return None
    report.outcome = "unknown"
    lines = [f"{f.check}: {f.message}" for f in bad] + report.warnings
    return attach(UnknownOutcomeError(
        f"{report.new_primary} is primary on timeline {report.timeline}, but not everything could be confirmed",
        detail="\n  " + "\n  ".join(lines), hint="see each item; `dbops status` shows the topology now"), report)


class AfterPromotion:
    """The switchover's steps after promotion: untune, settle, post-hooks, repoint, rejoin the old primary,
    verify."""

    def _after(self) -> None:
        followers = [self.old, *self.others]
        self.ph.guarded("untune candidate", self.tuning.undo)
        self.ph.guarded("new primary: slots, checkpoint", lambda: self._settle(followers))
        post_hooks(self.ph, self.cfg, self.old, self.new, timeline=self.report.timeline,
                   switch_lsn=self._switch_lsn, timeout=self.opts.timeout)
        for n in self.others:
            self.ph.guarded(f"repoint {n.name}", lambda n=n: repoint(
                n, self.new, conninfo_template=self._cand_conninfo, slot=self._slot_of(n) if self.uses_slots else None,
                timeout=self.opts.timeout))
        self.ph.guarded("rejoin old primary", self._rejoin_old)
        verify_new_primary(self.ph, self.cfg, self.report, self.new, followers, self.plan.candidate, self.opts.timeout)
        err = unconfirmed(self.report)
        if err is not None:
            raise err
        self.report.outcome = "succeeded"

    def _settle(self, followers: list[Node]) -> None:
        slots = [self._slot_of(n) for n in followers] if self.uses_slots else []
        self._history, self._switch_lsn = settle_new_primary(self._cand, slots, self.report.timeline or 0)
        if self._switch_lsn is not None:
            self.report.switch_lsn = format_lsn(self._switch_lsn)

    def _slot_of(self, node: Node) -> str:
        st = self.plan.topology.get(node.name)
        return repl.slot_name_for(node.name, st.settings.get("primary_slot_name"))

    def _rejoin_old(self) -> None:
        decision = repl.rejoin(self.ctl_old, self.new, conninfo_template=self._cand_conninfo,
                               slot=self._slot_of(self.old) if self.uses_slots else None, history=self._history,
                               new_timeline=self.report.timeline or 0, timeout=self.opts.timeout)
        self.report.rewind = {"needed": decision.needed, "reason": decision.reason}
        stale = {self._slot_of(n) for n in self.others} | ({self.candidate_slot} if self.candidate_slot else set())
        if stale:
            with conn.session(self.old) as c:
                repl.drop_inactive_slots(c, stale)


__all__ = ["AfterPromotion", "post_hooks", "repoint", "settle_new_primary", "unconfirmed", "verify_new_primary"]
