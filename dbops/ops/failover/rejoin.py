"""`dbops rejoin NODE`: bring a former primary back as a standby of the current primary.

After `dbops failover --primary-lost` the old primary may hold WAL the new timeline never
got: commits acknowledged to clients whose WAL reached neither a standby nor the archive.
Before `pg_rewind` throws that WAL away, it is read (``pg_waldump`` from the switch point in
the new timeline's history to the end of the node's WAL) and every transaction end found
there is listed: LSN, transaction id, commit time. ``pg_rewind``'s own "servers diverged at
WAL location ..." line is reported too. Then the node gets ``standby.signal`` and a
``primary_conninfo`` pointing at the primary, starts, and must stream on the new timeline.

Nothing is rewound or started unless the plan passes: exactly one other node is primary,
the node's data folder belongs to the same cluster, its timeline is an ancestor of the
primary's.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dbops.config import Config
from dbops.errors import DbopsError, PreconditionError, UnknownOutcomeError, UsageError
from dbops.nodes import NodeController, open_controller
from dbops.ops import topology as topo_mod
from dbops.ops.failover import replication as repl
from dbops.ops.failover.phases import Phase, Phases
from dbops.ops.failover.plan import FAIL, OK, WARN, Finding, Judged
from dbops.ops.failover.report import attach
from dbops.ops.topology import PRIMARY, STANDBY, NodeState, Topology
from dbops.pg import conn, waldump
from dbops.pg.controldata import ControlData
from dbops.pg.lsn import format_lsn, parse_history


MAX_LISTED = 1000  # transaction ends listed one by one; all are counted
_DIVERGED_RE = re.compile(r"servers diverged at WAL location ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")


@dataclass
class Divergence:
    """WAL the node has past the point where the primary's timeline left it."""

    timeline: int
    switch_lsn: str  # where the primary's history leaves the node's timeline
    end_lsn: str  # where the node's valid WAL ends
    bytes: int
    commits: int = 0
    aborts: int = 0
    first_commit_time: str | None = None
    last_commit_time: str | None = None
    transactions: list[dict[str, Any]] = field(default_factory=list)  # {lsn, xid, kind, time}, at most MAX_LISTED
    note: str | None = None


@dataclass
class RejoinPlan(Judged):
    node: NodeState
    primary: NodeState | None
    findings: list[Finding]
    already: bool = False  # streaming from the primary on its timeline already

    def refuse(self) -> PreconditionError:
        return self.refusal(f"rejoin of {self.node.name} refused; nothing changed", "fix each finding, then run it again",
                            nodes=False)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node.name, "primary": self.primary.name if self.primary else None,
                "already_following": self.already, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}


@dataclass
class RejoinReport:
    node: str
    primary: str
    outcome: str = "running"  # rejoined | already_following | unknown
    timeline: int | None = None
    rewound: bool = False
    rewind_reason: str | None = None
    rewind_diverged_at: str | None = None  # pg_rewind's "servers diverged at WAL location ..."
    divergence: Divergence | None = None
    phases: list[Phase] = field(default_factory=list)
    verification: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.outcome in ("rejoined", "already_following")
        return d


def plan(cfg: Config, name: str, topo: Topology | None = None) -> RejoinPlan:
    if name not in {n.name for n in cfg.nodes}:
        raise UsageError(f"no node named {name!r}", hint="known nodes: " + ", ".join(n.name for n in cfg.nodes))
    topo = topo or topo_mod.discover(cfg)
    st = topo.get(name)
    f: list[Finding] = []
    prims = [p for p in topo.primaries if p.name != name]
    primary = prims[0] if len(prims) == 1 else None
    if primary is None:
        f.append(Finding("primary", FAIL, f"expected exactly one other primary, found {len(prims)} "
                         f"({', '.join(p.name for p in prims) or 'none'})", "`dbops status` shows the roles"))
        return RejoinPlan(st, None, f)
    if st.role == PRIMARY:
        f.append(Finding("second primary", WARN, f"{name} accepts writes next to {primary.name} (timeline "
                         f"{st.timeline} vs {primary.timeline}): it is stopped first, and its writes since the "
                         "switch point are listed, then discarded by pg_rewind", None, name))
    if (st.role == STANDBY and st.streaming and st.upstream == primary.name
            and st.timeline == primary.timeline):
        f.append(Finding("already following", OK, f"{name} streams from {primary.name} on timeline {st.timeline}",
                         None, name))
        return RejoinPlan(st, primary, f, already=True)
    try:
        cd = open_controller(st.node).controldata()
    except DbopsError as e:
        f.append(Finding("data folder", FAIL, f"{name}'s {st.node.controller} controller cannot read its control "
                         f"file: {e.message}", e.hint or "bring its host and data folder back first", name))
        return RejoinPlan(st, primary, f)
    if primary.system_identifier and str(cd.system_identifier) != str(primary.system_identifier):
        f.append(Finding("system identifier", FAIL, f"{name}'s data folder holds cluster {cd.system_identifier}, "
                         f"{primary.name} is {primary.system_identifier}", "rebuild it from a backup instead", name))
    if cd.timeline > (primary.timeline or 0):
        f.append(Finding("timeline", FAIL, f"{name} is on timeline {cd.timeline}, past {primary.name}'s "
                         f"{primary.timeline}", "find out which node should be primary first", name))
    if not f:
        f.append(Finding("rejoin", OK, f"{name} (timeline {cd.timeline}, {cd.state}) can follow {primary.name}",
                         None, name))
    return RejoinPlan(st, primary, f)


def scan_divergence(ctl: NodeController, timeline: int, switch: int) -> Divergence:
    """Transaction ends in the node's own WAL from `switch` to the end of its valid WAL."""
    res = ctl.waldump("-t", str(timeline), "-s", format_lsn(switch), "-r", "Transaction", timeout=600)
    dump = waldump.parse(res.stdout + "\n" + res.stderr)
    ends = [x for x in waldump.xact_ends(dump.records) if x.lsn >= switch]
    stop = dump.stop_lsn or (max((r.end_guess for r in dump.records), default=None))
    note = None
    if stop is None:
        stop = switch
        if dump.error and "could not find a valid record" not in dump.error:
            note = f"pg_waldump: {dump.error}"
    commits = [x for x in ends if x.committed]
    times = [x.time for x in commits]
    from dbops.ops.failover.loss import iso

    return Divergence(timeline=timeline, switch_lsn=format_lsn(switch), end_lsn=format_lsn(max(stop, switch)),
                      bytes=max(0, stop - switch), commits=len(commits), aborts=len(ends) - len(commits),
                      first_commit_time=iso(min(times)) if times else None,
                      last_commit_time=iso(max(times)) if times else None,
                      transactions=[{"lsn": format_lsn(x.lsn), "xid": x.xid, "kind": x.kind, "time": iso(x.time)}
                                    for x in ends[:MAX_LISTED]], note=note)


class Rejoin:
    def __init__(self, cfg: Config, p: RejoinPlan, *, timeout: float):
        assert p.primary is not None
        self.cfg, self.plan, self.timeout = cfg, p, timeout
        self.node, self.primary = p.node.node, p.primary.node
        self.ctl = open_controller(self.node)
        self.report = RejoinReport(self.node.name, self.primary.name, timeline=p.primary.timeline)
        self.ph = Phases(self.report.phases, [])

    def phase(self, name: str, fn: Any) -> Any:
        with self.ph.phase(name) as ph:
            return fn(ph)

    def run(self) -> RejoinReport:
        tli = self.report.timeline or 0
        self.phase("stop", lambda ph: (self.ctl.clear_stale_pidfile(), self.ctl.stop("fast", timeout=self.timeout)))
        cd: ControlData = self.ctl.controldata()
        history, template, followers = self._from_primary(tli)
        entries = {t: lsn for t, lsn, _ in parse_history(history)} if history else {}
        if cd.timeline != tli and cd.timeline in entries:
            self.report.divergence = self.phase("diverged WAL", lambda ph: self._scan(ph, cd.timeline,
                                                                                   entries[cd.timeline]))
        decision = repl.needs_rewind(cd, history, tli)
        self.report.rewind_reason = decision.reason
        slot = None
        if any(s.settings.get("primary_slot_name") for s in followers):
            slot = repl.slot_name_for(self.node.name)
            with conn.session(self.primary) as c:
                repl.ensure_slot(c, slot)
        if decision.needed:
            self.phase("pg_rewind", lambda ph: self._rewind(ph))
        self.phase("start as standby", lambda ph: self._start(template, slot))
        self.phase("drop stale slots", lambda ph: self._drop_slots(followers))
        from dbops.ops.failover.verify import streaming

        self.report.verification = self.phase(
            "verify", lambda ph: streaming(self.cfg, self.primary, [self.node], tli, time.monotonic() + self.timeout))
        if any(f.status == FAIL for f in self.report.verification):
            self.report.outcome = "unknown"
            raise attach(UnknownOutcomeError(
                f"{self.node.name} was started as a standby of {self.primary.name} but does not stream from it",
                detail=self.report.verification[0].message, hint=f"check {self.node.name}'s server log"), self.report)
        self.report.outcome = "rejoined"
        return self.report

    def _from_primary(self, tli: int) -> tuple[str | None, str | None, list[NodeState]]:
        """The new timeline's history, a follower's primary_conninfo (user, passfile, ...), the followers."""
        topo = topo_mod.discover(self.cfg)
        followers = [s for s in topo.followers(self.primary.name) if s.name != self.node.name]
        with conn.session(self.primary) as c:
            history = repl.read_history(c, tli)
        template = None
        for s in followers:
            try:
                with conn.session(s.node) as c:
                    template = c.execute("select current_setting('primary_conninfo')").fetchone()[0] or None
                if template:
                    break
            except DbopsError:
                continue
        return history, template, followers

    def _scan(self, ph: Phase, timeline: int, switch: int) -> Divergence:
        d = scan_divergence(self.ctl, timeline, switch)
        ph.detail = f"{d.commits} commit(s) in {d.switch_lsn}..{d.end_lsn} ({d.bytes} bytes)"
        return d

    def _rewind(self, ph: Phase) -> None:
        # pg_rewind first finishes crash recovery in single-user mode, which refuses standby.signal
        self.ctl.remove_standby_signal()
        saved = {name: self.ctl.read_file(name) for name in repl.NODE_CONFIG_FILES}
        source, password = repl.rewind_source(self.primary)
        res = self.ctl.rewind(source, password=password,
                              restore_target_wal=bool(self.ctl.setting("restore_command")), timeout=max(self.timeout, 600))
        for name, text in saved.items():
            if text is not None:
                self.ctl.write_file(name, text)
        out = (res.stdout or "") + "\n" + (res.stderr or "")
        m = _DIVERGED_RE.search(out)
        if m:
            self.report.rewind_diverged_at = f"{m.group(1)} on timeline {m.group(2)}"
        self.report.rewound = "no rewind required" not in out
        lines = out.strip().splitlines()
        ph.detail = (f"diverged at {self.report.rewind_diverged_at}" if m else (lines[-1] if lines else None))

    def _start(self, template: str | None, slot: str | None) -> None:
        self.ctl.write_standby_config(repl.follow_conninfo(template, self.primary, self.node.name), slot)
        self.ctl.start(timeout=self.timeout)

    def _drop_slots(self, followers: list[NodeState]) -> None:
        names = {repl.slot_name_for(n.name) for n in self.cfg.nodes if n.name != self.node.name}
        names |= {s.settings["primary_slot_name"] for s in followers if s.settings.get("primary_slot_name")}
        with conn.session(self.node) as c:
            repl.drop_inactive_slots(c, names)


def execute(cfg: Config, p: RejoinPlan, *, timeout: float) -> RejoinReport:
    if not p.ok:
        raise p.refuse()
    assert p.primary is not None
    if p.already:
        return RejoinReport(p.node.name, p.primary.name, outcome="already_following", timeline=p.primary.timeline)
    from dbops import proc
    from dbops.ops.failover.switchover import cluster_lock

    with proc.sigterm_as_interrupt(), cluster_lock(cfg):
        return Rejoin(cfg, p, timeout=timeout).run()


__all__ = ["Divergence", "Rejoin", "RejoinPlan", "RejoinReport", "execute", "plan", "scan_divergence"]
