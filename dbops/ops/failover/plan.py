"""Switchover planning: pick the candidate, run the preflight checks, describe every step.

Nothing here changes the cluster. Each failed check is a :class:`Finding` saying what
was seen and how to fix it; any ``fail`` finding blocks the switch (exit 11).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from typing import Any

from dbops import log
from dbops.config import Config
from dbops.errors import DbopsError, PreconditionError
from dbops.ops import topology as topo_mod
from dbops.ops.topology import STANDBY, NodeState, Topology
from dbops.pg.controldata import ControlData
from dbops.pg.lsn import format_lsn

_log = log.get("failover")

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Options:
    to: str | None = None
    max_lag: int = 16 * 1024 * 1024
    timeout: float = 60.0
    max_xact_age: float = 300.0

    @classmethod
    def from_config(cls, cfg: Config, *, to: str | None = None, max_lag: int | None = None,
                    timeout: float | None = None) -> Options:
        f = cfg.failover
        return cls(to=to, max_lag=f.max_lag if max_lag is None else max_lag,
                   timeout=f.timeout if timeout is None else timeout, max_xact_age=f.max_xact_age)


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # ok | warn | fail
    message: str
    fix: str | None = None
    node: str | None = None


class Judged:
    """A plan judged by its findings (a switchover's, --primary-lost's, a rejoin's): any ``fail``
    finding blocks it (exit 11)."""

    findings: list[Finding]

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.blocking

    def refusal(self, message: str, hint: str, *, nodes: bool = True) -> PreconditionError:
        """The error listing each blocking finding ([node] check: message, and its fix), the plan attached."""
        lines = [(f"[{f.node or '-'}] " if nodes else "") + f"{f.check}: {f.message}"
                 + (f"\n    fix: {f.fix}" if f.fix else "") for f in self.blocking]
        err = PreconditionError(message, detail="\n  " + "\n  ".join(lines), hint=hint)
        err.plan = self  # type: ignore[attr-defined]
        return err


@dataclass
class Plan(Judged):
    topology: Topology
    old_primary: NodeState | None
    candidate: NodeState | None
    others: list[NodeState]  # standbys to repoint from the old primary to the candidate
    findings: list[Finding]
    steps: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "old_primary": self.old_primary.name if self.old_primary else None,
            "candidate": self.candidate.name if self.candidate else None,
            "repoint": [s.name for s in self.others],
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "steps": self.steps,
            "topology": self.topology.as_dict(),
        }

    def refuse(self) -> PreconditionError:
        return self.refusal(f"switchover refused: {len(self.blocking)} preflight check(s) failed",
                            "fix each finding, then run `dbops failover` again")


def choose_candidate(topo: Topology, to: str | None) -> NodeState | None:
    """The named node, else the healthy streaming standby of the primary that has replayed most."""
    if to is not None:
        try:
            return topo.get(to)
        except KeyError:
            return None
    p = topo.primary
    if p is None:
        return None
    healthy = [s for s in topo.followers(p.name) if s.streaming and not s.replay_paused
               and s.system_identifier == p.system_identifier and s.timeline == p.timeline]
    if not healthy:
        return None
    return max(healthy, key=lambda s: (s.replay_lsn or 0, s.receive_lsn or 0, -_index(topo, s)))


def _index(topo: Topology, s: NodeState) -> int:
    return [x.name for x in topo.nodes].index(s.name)


def _others(topo: Topology, primary: NodeState, candidate: NodeState) -> list[NodeState]:
    """Standbys that stream (or are configured to stream) from the old primary, except the candidate."""
    return [s for s in topo.standbys if s.name != candidate.name
            and (s.upstream == primary.name or topo_mod.points_at(s.configured_upstream, primary.node))]


def preflight(cfg: Config, topo: Topology, opts: Options,
              control: Mapping[str, ControlData | DbopsError] | None = None) -> Plan:
    """Every check the switch needs, as findings, judged from what was observed: the topology (the
    servers' answers) and the control files read through the node controllers (`control`, by node
    name: see read_control); nothing is read or changed here."""
    f: list[Finding] = []
    prims = topo.primaries
    if len(prims) != 1:
        names = ", ".join(s.name for s in prims) or "none"
        f.append(Finding("one primary", FAIL, f"expected exactly one primary among the configured nodes, found "
                         f"{len(prims)} ({names})", "bring the cluster to one writable primary first "
                         "(`dbops status` shows the roles)"))
    for s in topo.unreachable:
        f.append(Finding("reachable", WARN, f"unreachable: {s.error}", "start it or fix its connection settings; "
                         "it will not be repointed", s.name))
    primary = topo.primary
    cand = choose_candidate(topo, opts.to)
    if cand is None:
        if opts.to is not None:
            f.append(Finding("candidate", FAIL, f"no node named {opts.to!r} in the configuration",
                             "known nodes: " + ", ".join(s.name for s in topo.nodes)))
        elif primary is not None:
            f.append(Finding("candidate", FAIL, f"no healthy standby streams from {primary.name}",
                             "start a replica streaming from the primary, or name one with --to"))
    if primary is None or cand is None:
        return Plan(topo, primary, cand, [], f)
    f += _candidate_checks(topo, primary, cand, opts)
    f += _primary_checks(primary, opts)
    others = _others(topo, primary, cand) if cand.role == STANDBY else []
    for s in others:
        f += _other_checks(topo, primary, s)
    if cand.role == STANDBY:
        f += _controller_checks(primary, cand, control or {})
    if cfg.failover.pgbouncer is not None:
        f += _pgbouncer_checks(cfg, primary)
    if not any(x.status != OK for x in f):
        f.append(Finding("preflight", OK, "all checks passed"))
    plan = Plan(topo, primary, cand, others, f)
    plan.steps = describe(cfg, plan, opts)
    return plan


def _candidate_checks(topo: Topology, p: NodeState, c: NodeState, opts: Options) -> list[Finding]:
    n = c.name
    if c.name == p.name:
        return [Finding("candidate", FAIL, f"{n} is already the primary", "name a standby with --to", n)]
    if c.role != STANDBY:
        return [Finding("candidate", FAIL, f"{n} is {c.role}: {c.error or ''}".strip(),
                        "start it and let it catch up, or name another standby", n)]
    f: list[Finding] = []
    if not c.streaming or c.upstream != p.name:
        status = c.receiver.status if c.receiver else "no WAL receiver"
        f.append(Finding("candidate streaming", FAIL, f"{n} is not streaming from {p.name} "
                         f"(receiver: {status}, upstream: {c.upstream or '-'})",
                         f"check primary_conninfo on {n} and its server log", n))
    if c.system_identifier != p.system_identifier:
        f.append(Finding("system identifier", FAIL, f"{n} belongs to another cluster ({c.system_identifier} "
                         f"vs {p.system_identifier})", "remove it from this cluster's configuration", n))
    if c.timeline != p.timeline:
        f.append(Finding("timeline", FAIL, f"{n} is on timeline {c.timeline}, the primary on {p.timeline}",
                         "let it follow the primary's timeline (recovery_target_timeline = 'latest')", n))
    if (c.version_num or 0) // 10000 != (p.version_num or 0) // 10000:
        f.append(Finding("version", FAIL, f"{n} runs PostgreSQL {c.version_num}, the primary {p.version_num}",
                         "switch over only between servers of the same major version", n))
    if c.replay_paused:
        f.append(Finding("replay", FAIL, f"WAL replay is paused on {n}",
                         f"resume it: psql -h {c.node.host} -p {c.node.port} -c 'select pg_wal_replay_resume()'", n))
    lag = topo.replay_lag(c)
    if lag is None or lag > opts.max_lag:
        f.append(Finding("lag", FAIL, f"{n} has not replayed {lag if lag is not None else '?'} bytes "
                         f"(limit {opts.max_lag})", "wait for it to catch up, or raise --max-lag", n))
    if c.settings.get("archive_mode") not in ("on", "always") or not c.settings.get("archive_command"):
        f.append(Finding("archiving after promotion", FAIL, f"{n} has archive_mode={c.settings.get('archive_mode')}"
                         " or no archive_command: as primary it would not archive WAL",
                         f"set archive_mode = on and archive_command on {n} (a standby ignores them until promoted)",
                         n))
    need = len(topo.standbys)  # every other node will stream from it
    for key in ("max_wal_senders", "max_replication_slots"):
        have = int(c.settings.get(key) or 0)
        if have < need:
            f.append(Finding(key, FAIL, f"{n} has {key}={have}, needs at least {need} for the nodes that will "
                             "follow it", f"raise {key} on {n} (needs a restart)", n))
    return f


def _primary_checks(p: NodeState, opts: Options) -> list[Finding]:
    n = p.name
    f: list[Finding] = []
    if p.settings.get("data_checksums") != "on" and p.settings.get("wal_log_hints") != "on":
        f.append(Finding("rewind possible", FAIL, f"{n} has neither data checksums nor wal_log_hints: "
                         "pg_rewind could not bring it back as a standby if needed",
                         f"set wal_log_hints = on on {n} and restart it", n))
    if p.settings.get("archive_mode") not in ("on", "always"):
        f.append(Finding("archiving", FAIL, f"archive_mode is {p.settings.get('archive_mode')} on {n}",
                         "turn archiving on: the switchover's history file must reach the archive", n))
    a = p.archiver
    if a is not None and a.failing:
        f.append(Finding("archiver", FAIL, f"archiving is failing on {n} (last failure: {a.last_failed_wal})",
                         "fix archive_command (see the server log) before moving the primary", n))
    elif a is not None and (a.ready_count or 0) > 16:
        f.append(Finding("archiver", WARN, f"{a.ready_count} WAL files wait to be archived on {n}",
                         "let the archiver catch up first", n))
    if p.oldest_xact and p.oldest_xact[2] > opts.max_xact_age:
        pid, app, age = p.oldest_xact
        f.append(Finding("long transaction", FAIL, f"a transaction has been open for {age:.0f} s on {n} "
                         f"(pid {pid}, application {app or '-'}); the fast stop would abort it",
                         f"let it finish or end it (select pg_cancel_backend({pid})); the limit is "
                         "failover.max_xact_age", n))
    return f


def _other_checks(topo: Topology, p: NodeState, s: NodeState) -> list[Finding]:
    f: list[Finding] = []
    if s.system_identifier != p.system_identifier:
        f.append(Finding("system identifier", FAIL, f"{s.name} belongs to another cluster",
                         "remove it from this cluster's configuration", s.name))
    elif not s.streaming:
        f.append(Finding("replica streaming", WARN, f"{s.name} is not streaming now; it will be repointed anyway",
                         f"check {s.name}'s server log", s.name))
    if s.replay_paused:
        f.append(Finding("replay", WARN, f"WAL replay is paused on {s.name}; it will lag behind", None, s.name))
    return f


def read_control(topo: Topology, opts: Options) -> dict[str, ControlData | DbopsError]:
    """The control files of the primary and the candidate standby, read through their node controllers
    (or the error each read raised), for preflight."""
    from dbops.nodes import open_controller

    p, c = topo.primary, choose_candidate(topo, opts.to)
    out: dict[str, ControlData | DbopsError] = {}
    if p is None or c is None or c.role != STANDBY:
        return out
    for s in (p, c):
        try:
            out[s.name] = open_controller(s.node).controldata()
        except DbopsError as e:
            out[s.name] = e
    return out


def _controller_checks(p: NodeState, c: NodeState, control: Mapping[str, ControlData | DbopsError]) -> list[Finding]:
    """The controllers must reach the nodes and read the very clusters the connections see."""
    f: list[Finding] = []
    for s, state in ((p, "in production"), (c, "in archive recovery")):
        cd = control.get(s.name)
        if cd is None:  # not read
            continue
        if isinstance(cd, DbopsError):
            e = cd
            f.append(Finding("node controller", FAIL, f"{s.node.controller} controller cannot read {s.name}'s "
                             f"control file: {e.message}", e.hint or "check data_dir and the controller settings",
                             s.name))
            continue
        if cd.system_identifier != s.system_identifier:
            f.append(Finding("node controller", FAIL, f"data_dir of {s.name} holds cluster {cd.system_identifier}, "
                             f"the server answering on {s.node.host}:{s.node.port} is {s.system_identifier}",
                             f"fix nodes[].data_dir (or host/port) for {s.name}", s.name))
        elif cd.state != state:
            f.append(Finding("node controller", FAIL, f"control file of {s.name} says {cd.state!r}, expected "
                             f"{state!r}", f"check data_dir for {s.name}", s.name))
    return f


def _pgbouncer_checks(cfg: Config, p: NodeState) -> list[Finding]:
    import os

    from dbops.ops.failover.pgbouncer import PgBouncer, repoint_ini

    s = cfg.failover.pgbouncer
    assert s is not None
    f: list[Finding] = []
    try:
        PgBouncer(s).check()
    except DbopsError as e:
        f.append(Finding("pgbouncer", FAIL, e.message, e.hint))
    if s.config_file:
        try:
            with open(s.config_file) as fh:
                text = fh.read()
        except OSError as e:
            f.append(Finding("pgbouncer", FAIL, f"cannot read {s.config_file}: {e.strerror}",
                             "set failover.pgbouncer.config_file to the pgbouncer.ini dbops should repoint"))
            return f
        if not os.access(s.config_file, os.W_OK) or not os.access(os.path.dirname(s.config_file) or ".", os.W_OK):
            f.append(Finding("pgbouncer", FAIL, f"cannot write {s.config_file} (or its folder)",
                             "run dbops as a user that may edit the PgBouncer configuration"))
        _, changed = repoint_ini(text, p.node, p.node, s.databases)
        if not changed:
            f.append(Finding("pgbouncer", WARN, f"no [databases] entry in {s.config_file} points at {p.name}",
                             "list the entries in failover.pgbouncer.databases"))
    return f


def describe(cfg: Config, plan: Plan, opts: Options) -> list[str]:
    p, c = plan.old_primary, plan.candidate
    assert p is not None and c is not None
    fo = cfg.failover
    steps = []
    if fo.pre_hooks:
        steps.append(f"run {len(fo.pre_hooks)} pre-hook(s); any non-zero exit cancels before anything changes")
    steps.append(f"CHECKPOINT on {p.name} (so its shutdown checkpoint is short)")
    if fo.pgbouncer:
        steps.append(f"PgBouncer {fo.pgbouncer.host}:{fo.pgbouncer.port}: PAUSE (clients wait, no errors)")
    steps.append(f"stop {p.name} (fast) through its {p.node.controller} controller: writes stop here")
    steps.append(f"read {p.name}'s shutdown checkpoint LSN (pg_controldata); wait up to {opts.timeout:.0f} s "
                 f"until {c.name} has received and replayed past it, else start {p.name} again as primary "
                 "and stop: rolled back")
    steps.append(f"promote {c.name} (new timeline {(p.timeline or 0) + 1}): writes resume here")
    if fo.pgbouncer:
        steps.append(f"PgBouncer: repoint at {c.name}, RESUME (RESUME is guaranteed, also on failure)")
    steps.append(f"CHECKPOINT on {c.name}; replication slots for its followers")
    if fo.post_hooks:
        steps.append(f"run {len(fo.post_hooks)} post-hook(s) (environment: old and new primary, timeline, switch LSN)")
    steps.append(f"rejoin {p.name} as standby of {c.name} (standby.signal + primary_conninfo; "
                 "pg_rewind only if the timeline check shows divergence)")
    for s in plan.others:
        steps.append(f"repoint {s.name} to {c.name} (primary_conninfo, reload)")
    steps.append(f"verify: {c.name} writable on the new timeline; "
                 f"{', '.join([p.name] + [s.name for s in plan.others])} streaming from it; history file archived")
    return steps


def make_plan(cfg: Config, opts: Options) -> Plan:
    """Discover the topology, choose the candidate, run preflight."""
    topo = topo_mod.discover(cfg)
    plan = preflight(cfg, topo, opts, read_control(topo, opts))
    if plan.candidate and plan.old_primary:
        lag = topo.replay_lag(plan.candidate)
        _log.info("plan: %s -> %s (replay lag %s bytes at %s)", plan.old_primary.name, plan.candidate.name, lag,
                  format_lsn(plan.old_primary.current_lsn or 0))
    return plan


__all__ = ["FAIL", "OK", "WARN", "Finding", "Judged", "Options", "Plan", "choose_candidate", "make_plan", "preflight", "read_control"]
