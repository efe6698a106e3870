"""`dbops failover --primary-lost`: what is known before anything changes, and the plan.

Nothing here changes the cluster. The assessment answers:

* is the primary really lost? Any node that accepts connections and writes means no
  (refused, exit 11: the planned path `dbops failover` is the one to use);
* which configured node was the primary: the unreachable node the standbys are configured
  to stream from;
* each standby's received and replayed WAL position, and how far each is behind the best;
* the candidate: ``--to``, else the standby that received the most WAL;
* where the WAL archive ends: the newest archived segment of the standbys' timeline and
  the last valid record in it (``pg_waldump``), and whether a later timeline already
  exists there (then someone promoted a node already: refused);
* how the old primary can be fenced: its node controller, the ``failover.fence_hooks``.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dbops import log
from dbops.config import Config
from dbops.errors import DbopsError, PreconditionError
from dbops.ops import topology as topo_mod
from dbops.ops.failover.plan import FAIL, OK, WARN, Finding, Judged
from dbops.ops.topology import NodeState, Topology
from dbops.pg.lsn import DEFAULT_SEGMENT_SIZE, HISTORY_RE, SEGMENT_RE, format_lsn

_log = log.get("failover")


@dataclass(frozen=True)
class LostOptions:
    to: str | None = None
    timeout: float = 60.0
    no_fence: bool = False
    started: float | None = None  # time.monotonic() when the command started (the report's clock)

    @classmethod
    def from_config(cls, cfg: Config, *, to: str | None = None, timeout: float | None = None,
                    no_fence: bool = False, started: float | None = None) -> LostOptions:
        return cls(to=to, timeout=cfg.failover.timeout if timeout is None else timeout, no_fence=no_fence,
                   started=started)


@dataclass
class ArchiveEnd:
    """The end of the WAL archive on one timeline, as far as it could be read."""

    checked: bool  # False: not a dbops archive, or unreadable (see error)
    timeline: int | None = None
    dbops: bool = True  # the nodes archive with `dbops wal-push`: this archive should be read
    error: str | None = None
    seg_size: int = DEFAULT_SEGMENT_SIZE
    segment: str | None = None  # newest archived segment on the timeline
    last_record_lsn: int | None = None  # start of the last valid record in it
    end_lsn: int | None = None  # just past that record
    later_timelines: list[int] = field(default_factory=list)  # history files of later timelines

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_record_lsn"] = _fmt(self.last_record_lsn)
        d["end_lsn"] = _fmt(self.end_lsn)
        return d


@dataclass
class LostPlan(Judged):
    topology: Topology
    old_primary: NodeState | None
    candidate: NodeState | None
    standbys: list[NodeState]  # reachable standbys of the lost primary (candidate included)
    archive: ArchiveEnd
    findings: list[Finding]
    fence_controller: str | None = None  # why the controller cannot fence, or None when it can
    steps: list[str] = field(default_factory=list)
    store: Any = field(default=None, repr=False)  # the object store, opened once (archive reads, the lock)

    @property
    def others(self) -> list[NodeState]:
        return [s for s in self.standbys if self.candidate is None or s.name != self.candidate.name]

    def known_ends(self) -> dict[str, int]:
        """Every place the old primary's WAL is known to have reached: standbys and the archive."""
        ends = {s.name: lsn for s in self.standbys if (lsn := has_lsn(s)) is not None}
        if self.archive.end_lsn is not None:
            ends["archive"] = self.archive.end_lsn
        return ends

    def standby_rows(self) -> list[dict[str, Any]]:
        best = max(self.known_ends().values(), default=None)
        rows = []
        for s in self.standbys:
            have = has_lsn(s)
            rows.append({"name": s.name, "receive_lsn": _fmt(s.receive_lsn), "replay_lsn": _fmt(s.replay_lsn),
                         "timeline": s.timeline, "behind_best_bytes": None if best is None or have is None
                         else max(0, best - have), "candidate": self.candidate is not None
                         and s.name == self.candidate.name})
        return rows

    def as_dict(self) -> dict[str, Any]:
        ends = self.known_ends()
        return {
            "mode": "primary-lost",
            "old_primary": self.old_primary.name if self.old_primary else None,
            "candidate": self.candidate.name if self.candidate else None,
            "repoint": [s.name for s in self.others],
            "standbys": self.standby_rows(),
            "archive": self.archive.as_dict(),
            "known_end": {k: format_lsn(v) for k, v in ends.items()},
            "fence_controller": self.fence_controller or "reachable",
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "steps": self.steps,
            "topology": self.topology.as_dict(),
        }

    def refuse(self) -> PreconditionError:
        return self.refusal(f"failover --primary-lost refused: {len(self.blocking)} check(s) failed; nothing changed",
                            "fix each finding, then run it again")


def _fmt(v: int | None) -> str | None:
    return format_lsn(v) if v is not None else None


def has_lsn(s: NodeState) -> int | None:
    """How far a standby's WAL goes: what it received (or replayed, when it received nothing since start)."""
    vals = [v for v in (s.receive_lsn, s.replay_lsn) if v is not None]
    return max(vals) if vals else None


def lost_primary(topo: Topology) -> NodeState | None:
    """The unreachable node most standbys are configured to stream from (or the only unreachable node)."""
    votes: Counter[str] = Counter()
    for s in topo.standbys:
        for u in topo.unreachable:
            if s.upstream == u.name or topo_mod.points_at(s.configured_upstream, u.node):
                votes[u.name] += 1
    if votes:
        ranked = votes.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            return None
        return topo.get(ranked[0][0])
    return topo.unreachable[0] if len(topo.unreachable) == 1 else None


def choose(standbys: list[NodeState], to: str | None) -> NodeState | None:
    if to is not None:
        return next((s for s in standbys if s.name == to), None)
    if not standbys:
        return None
    order = [s.name for s in standbys]
    return max(standbys, key=lambda s: (s.timeline or 0, has_lsn(s) or 0, s.replay_lsn or 0, -order.index(s.name)))


def read_archive(cfg: Config, timeline: int, *, store: Any = None, previous: ArchiveEnd | None = None) -> ArchiveEnd:
    """The newest archived segment on `timeline` and its last valid record; later timelines' history files.
    With `previous` (an earlier read), the segment is fetched and read only when a newer one appeared."""
    from dbops.ops.restore import wal as rwal
    from dbops.ops.wal.archive import WalArchive
    from dbops.storage import open_archive

    try:
        store, layout = open_archive(cfg.storage, store)
        arc = WalArchive(store, layout)
        if previous is not None and previous.checked:
            seg = previous.seg_size
        else:
            ident = arc.read_identity()
            seg = ident.wal_segment_size if ident else DEFAULT_SEGMENT_SIZE
        later = sorted(int(n[:8], 16) for o in store.list(layout.history_prefix())
                       if HISTORY_RE.match(n := o.key.rsplit("/", 1)[-1]) and int(n[:8], 16) > timeline)
        names = [n for o in store.list(layout.wal_prefix(timeline)) if SEGMENT_RE.match(n := o.key.rsplit("/", 1)[-1])]
        end = ArchiveEnd(True, timeline, seg_size=seg, later_timelines=later)
        if not names:
            return end
        end.segment = max(names)
        if previous is not None and previous.checked and previous.segment == end.segment:
            end.last_record_lsn, end.end_lsn = previous.last_record_lsn, previous.end_lsn
            return end
        with tempfile.TemporaryDirectory(prefix="dbops-lost-") as tmp:
            found = rwal.scan_end(arc, [end.segment], Path(tmp), seg_size=seg)
        if found is not None:
            end.last_record_lsn, end.end_lsn = found.last_lsn, found.end_lsn
        return end
    except DbopsError as e:
        return ArchiveEnd(False, timeline, error=e.message + (f" ({e.detail.strip().splitlines()[0]})"
                                                              if e.detail and e.detail.strip() else ""))


def archive_is_dbops(states: list[NodeState]) -> bool:
    return any("wal-push" in (s.settings.get("archive_command") or "") for s in states)


def fence_reach(cfg: Config, old: NodeState) -> str | None:
    """None when the old primary's node controller reaches its data folder, else why not."""
    from dbops.nodes import open_controller

    try:
        open_controller(old.node).status()
        return None
    except DbopsError as e:
        why = e.message
        if e.detail and e.detail.strip():
            why += f": {e.detail.strip().splitlines()[-1]}"
        return why


_TIMELINE_SQL = r"""
select max(('x' || substr(name, 1, 8))::bit(32)::int) from pg_ls_waldir() where name ~ '^[0-9A-F]{8}\.history$'
"""


def with_recovery_timelines(topo: Topology) -> Topology:
    """Standbys' timelines as far as they know them: with no WAL receiver left, the topology falls back
    on the last restartpoint's timeline, which lags a timeline switch until the next restartpoint; the
    newest history file in pg_wal is the timeline recovery follows."""
    from dataclasses import replace

    from dbops.pg import conn

    out = []
    for s in topo.nodes:
        if s.role == topo_mod.STANDBY:
            try:
                with conn.session(s.node, connect_timeout=topo_mod.CONNECT_TIMEOUT) as c:
                    newest = c.execute(_TIMELINE_SQL).fetchone()[0]
                if newest and newest > (s.timeline or 0):
                    s = replace(s, timeline=newest)
            except DbopsError:
                pass
        out.append(s)
    return Topology(tuple(out))


def assess(cfg: Config, opts: LostOptions, *, topo: Topology | None = None, archive: ArchiveEnd | None = None,
           reach: Callable[[Config, NodeState], str | None] = fence_reach) -> LostPlan:
    """The plan; `topo`, `archive` and `reach` (can the controller fence? None = yes) come from the
    cluster unless given."""
    from concurrent.futures import ThreadPoolExecutor

    from dbops.storage import open_store

    store = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbops-store") as pool:
        # boto3's import and client, beside the topology probes (not when the archive's end is given)
        store_f = pool.submit(open_store, cfg.storage) if archive is None else None
        topo = topo or with_recovery_timelines(topo_mod.discover(cfg))
        try:
            store = store_f.result() if store_f is not None else None
        except DbopsError:
            store = None
    f: list[Finding] = []
    for p in topo.primaries:
        f.append(Finding("primary answers", FAIL, f"{p.name} accepts connections and writes (timeline {p.timeline}):"
                         " the primary is not lost", "use the planned path: `dbops failover` (it loses nothing); "
                         "--primary-lost never bypasses a primary that answers", p.name))
    old = lost_primary(topo)
    if old is None and not topo.primaries:
        f.append(Finding("lost primary", FAIL, "cannot tell which node was the primary: no unreachable node is named "
                         "by the standbys' primary_conninfo" if not topo.unreachable else
                         "the standbys point at different unreachable nodes",
                         "check primary_conninfo on the standbys (`dbops status`)"))
    elif old is not None:
        f.append(Finding("lost primary", OK, f"{old.name} does not answer: {old.error}", None, old.name))
    standbys = [s for s in topo.standbys if old is None or s.upstream in (None, old.name)
                or topo_mod.points_at(s.configured_upstream, old.node)]
    sysids = Counter(s.system_identifier for s in standbys)
    if len(sysids) > 1:
        main = sysids.most_common(1)[0][0]
        for s in standbys:
            if s.system_identifier != main:
                f.append(Finding("system identifier", WARN, f"{s.name} belongs to another cluster; left alone",
                                 "remove it from this cluster's configuration", s.name))
        standbys = [s for s in standbys if s.system_identifier == main]
    for s in topo.unreachable:
        if old is None or s.name != old.name:
            f.append(Finding("reachable", WARN, f"unreachable: {s.error}; it will not be repointed",
                             "start it; then repoint it (or `dbops rejoin` it)", s.name))
    cand = choose(standbys, opts.to)
    if cand is None:
        if opts.to is not None:
            f.append(Finding("candidate", FAIL, f"{opts.to!r} is not a reachable standby of the lost primary",
                             "standbys: " + (", ".join(s.name for s in standbys) or "none"), opts.to))
        elif old is not None:
            f.append(Finding("candidate", FAIL, "no reachable standby to promote", "start a standby"))
    elif cand.settings.get("archive_mode") not in ("on", "always") or not cand.settings.get("archive_command"):
        f.append(Finding("archiving after promotion", WARN, f"{cand.name} has archive_mode="
                         f"{cand.settings.get('archive_mode')} or no archive_command: as primary it will not archive",
                         f"set archive_mode = on and archive_command on {cand.name}", cand.name))
    if cand is not None and opts.to is not None:
        best = choose(standbys, None)
        if best is not None and (has_lsn(best) or 0) > (has_lsn(cand) or 0):
            f.append(Finding("candidate", WARN, f"{best.name} received more WAL than {cand.name} "
                             f"({_fmt(has_lsn(best))} vs {_fmt(has_lsn(cand))}): promoting {cand.name} loses "
                             "the difference", f"leave out --to to promote {best.name}", cand.name))
    if archive is None:
        if cand is not None and archive_is_dbops(standbys):
            archive = read_archive(cfg, cand.timeline or 1, store=store)
        else:
            archive = ArchiveEnd(False, cand.timeline if cand else None, dbops=False,
                                 error="archive_command is not `dbops wal-push`: the archive is not read")
    if archive.checked and archive.later_timelines:
        f.append(Finding("later timeline", FAIL, f"the archive holds history files of timeline(s) "
                         f"{', '.join(map(str, archive.later_timelines))}: a node was promoted already",
                         "find that node (`dbops status`, the archive's history files) before promoting another"))
    elif not archive.checked and archive_is_dbops(standbys):
        f.append(Finding("archive", WARN, f"the WAL archive cannot be read: {archive.error}; WAL archived beyond "
                         "the candidate cannot be recovered, and the loss cannot be measured",
                         "check storage settings and the S3 endpoint"))
    plan = LostPlan(topo, old, cand, standbys, archive, f, store=store)
    if old is not None:
        plan.fence_controller = reach(cfg, old)
        hooks = cfg.failover.fence_hooks
        if plan.fence_controller is not None and not hooks:
            f.append(Finding("fence", WARN if opts.no_fence else FAIL,
                             f"{old.name} cannot be fenced: its {old.node.controller} controller cannot reach it "
                             f"({plan.fence_controller}) and no failover.fence_hooks are configured",
                             "configure a fence hook (e.g. a cloud API call that stops the instance), or pass "
                             "--no-fence: then there may be two primaries if it comes back", old.name))
    if not plan.blocking:
        f.append(Finding("assessment", OK, "ready to promote"))
    if plan.old_primary and plan.candidate:
        plan.steps = describe(cfg, plan, opts)
    return plan


def describe(cfg: Config, plan: LostPlan, opts: LostOptions) -> list[str]:
    old, c = plan.old_primary, plan.candidate
    assert old is not None and c is not None
    fo, a = cfg.failover, plan.archive
    steps = []
    if plan.fence_controller is None:
        steps.append(f"fence {old.name}: stop PostgreSQL (immediate) through its {old.node.controller} controller "
                     "and leave standby.signal, so it cannot come back as a primary")
    else:
        steps.append(f"fence {old.name}: its {old.node.controller} controller cannot reach it "
                     f"({plan.fence_controller}); tried again at once")
    if fo.fence_hooks:
        steps.append(f"run {len(fo.fence_hooks)} fence hook(s) (environment: the old primary's name, host, port); "
                     + ("a failure is reported and ignored (--no-fence)" if opts.no_fence
                        else "a failing hook stops here: nothing is promoted"))
    if opts.no_fence or (plan.fence_controller is not None and not fo.fence_hooks):
        steps.append(f"WITHOUT FENCING THERE MAY BE TWO PRIMARIES: if {old.name} comes back unfenced it accepts "
                     f"writes next to {c.name}, and those writes are lost or must be merged by hand")
    steps.append(f"on {c.name}: stop streaming attempts (primary_conninfo = ''), wal_retrieve_retry_interval = 10ms, "
                 "restore_command from the archive when it has none (reloaded)")
    have = has_lsn(c)
    if a.checked and a.segment:
        beyond = a.last_record_lsn is not None and (c.replay_lsn or 0) <= a.last_record_lsn
        steps.append(f"replay on {c.name} everything it received (up to {_fmt(have)}) and, from the archive, up to "
                     f"the last record of the newest archived segment {a.segment} ({_fmt(a.last_record_lsn)})"
                     + ("; the archive holds WAL it has not replayed yet" if beyond else "")
                     + f"; wait up to {opts.timeout:.0f} s, else stop before promoting")
    else:
        steps.append(f"replay on {c.name} everything it received (up to {_fmt(have)})"
                     + ("" if a.checked else f"; the archive is not read ({a.error})"))
    steps.append(f"promote {c.name} (new timeline {(c.timeline or 0) + 1}): writes resume here")
    if fo.pgbouncer:
        steps.append(f"PgBouncer {fo.pgbouncer.host}:{fo.pgbouncer.port}: repoint at {c.name}, RELOAD")
    steps.append(f"CHECKPOINT on {c.name}; replication slots for its followers")
    if fo.post_hooks:
        steps.append(f"run {len(fo.post_hooks)} post-hook(s)")
    for s in plan.others:
        steps.append(f"repoint {s.name} to {c.name} (reload; pg_rewind only if it received WAL past the switch point)")
    steps.append(f"verify: {c.name} writable on the new timeline"
                 + (f"; {', '.join(s.name for s in plan.others)} streaming from it" if plan.others else "")
                 + "; history file archived")
    steps.append("report what may be lost: the last recovered commit, the last LSN the old primary is known to "
                 f"have reached, the difference; later, `dbops rejoin {old.name}` lists commits only it had")
    return steps


__all__ = ["ArchiveEnd", "LostOptions", "LostPlan", "archive_is_dbops", "assess", "choose", "describe", "has_lsn",
           "lost_primary", "read_archive", "with_recovery_timelines"]
