"""One writer at every instant: fencing the old primary, and what a rollback must confirm first.

A clean fast stop alone does not fence a primary: anyone (an operator, an enabled systemd
unit, a container restart policy) may start it again, and it comes up writable while the
candidate is promoted. So, right after its shutdown checkpoint is on disk and before the
candidate is promoted, the old primary's data folder gets ``standby.signal`` and a
``primary_conninfo`` pointing at the candidate (fsynced, through its node controller).
From then on any start, by anyone, comes up in recovery.

A start that raced the fence is found by the postmaster that ``postmaster.pid`` names once
the fence is in place: a postmaster creates that file before its startup process reads the
signal files, so a postmaster absent then (or still the one being stopped) reads the fence.

A rollback undoes the fence and starts the old primary again, but only after confirming
that the candidate is still in recovery; when that cannot be confirmed nothing is started
(exit 8): two primaries are worse than none.
"""

from __future__ import annotations

from dbops.config import Node
from dbops.errors import DbopsError
from dbops.nodes import Fence, NodeController, open_controller
from dbops.ops.failover.replication import follow_conninfo

# Control-file states of a node that is not, and will not come up as, a primary (with standby.signal).
_STANDBY_STATES = ("in archive recovery", "shut down in recovery")


def fence_old_primary(ctl: NodeController, new: Node, *, conninfo_template: str | None,
                      slot: str | None) -> Fence:
    """Write the fence on the stopped old primary; see the module docstring."""
    return ctl.fence_as_standby(follow_conninfo(conninfo_template, new, ctl.node.name), slot)


def raced(fence: Fence, before: str | None) -> bool:
    """Whether a postmaster other than the one being stopped ran once the fence was in place."""
    return fence.postmaster is not None and fence.postmaster != before


def candidate_still_standby(cand: Node) -> str | None:
    """None once `cand` is confirmed not to be a primary, else why that cannot be confirmed.

    Asked over a new connection (``pg_is_in_recovery()``); a node that does not answer is
    confirmed through its controller: not running, ``standby.signal`` present and its control
    file in recovery (a start brings it back as a standby).
    """
    from dbops.pg import conn

    try:
        with conn.session(cand, connect_timeout=3) as c:
            if c.execute("select pg_is_in_recovery()").fetchone()[0]:
                return None
            return f"{cand.name} is out of recovery: it was promoted"
    except DbopsError as e:
        asked = e.message
    try:
        ctl = open_controller(cand)
        if ctl.is_running():
            return f"{cand.name} runs but does not answer ({asked})"
        if not ctl.has_standby_signal():
            return f"{cand.name} is stopped and has no standby.signal: a start would make it a primary"
        state = ctl.controldata().state
    except DbopsError as e:
        return f"{cand.name} does not answer ({asked}) and its controller cannot tell ({e.message})"
    if state not in _STANDBY_STATES:
        return f"{cand.name} is stopped, its control file says {state!r}"
    return None
