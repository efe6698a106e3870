"""Streaming-replication plumbing the switchover uses: conninfo, slots, repointing, rewind check.

Pure helpers (conninfo rewriting, slot names, the timeline/divergence decision) plus a
few SQL actions on an open connection. Connection strings may carry a password: they
are passed to PostgreSQL as SQL literals or on stdin, never logged nor put in argv.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dbops import secrets
from dbops.config import Node
from dbops.errors import PostgresError
from dbops.nodes import NodeController
from dbops.pg.controldata import ControlData
from dbops.pg.lsn import format_lsn, parse_history

_SLOT_RE = re.compile(r"[^a-z0-9_]")
NODE_CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")


def slot_name_for(node_name: str, current: str | None = None) -> str:
    """The physical slot a node streams through: its configured one, else ``slot_<name>``."""
    if current:
        return current
    return "slot_" + _SLOT_RE.sub("_", node_name.lower())[:58]


def follow_conninfo(template: str | None, primary: Node, application_name: str) -> str:
    """A primary_conninfo for following `primary`: the template's settings (user, passfile,
    sslmode, ...) kept, host and port replaced, application_name set to the follower's name."""
    from dbops.pg import conninfo

    params: dict[str, Any] = {}
    if template:
        params = {k: v for k, v in conninfo.parse(template).items() if v is not None}
    else:
        params = conninfo.parse(primary.public_conninfo_string())
    params.pop("hostaddr", None)
    params.pop("dbname", None)
    params.update({"host": primary.host, "port": str(primary.port), "application_name": application_name})
    if params.get("password"):
        secrets.register(str(params["password"]))
    return conninfo.make(**params)


def split_password(conninfo: str) -> tuple[str, str | None]:
    """(conninfo without password, the password) so the password can travel in the environment."""
    from dbops.pg import conninfo as ci

    params = ci.parse(conninfo)
    password = params.pop("password", None)
    return ci.make(**{k: v for k, v in params.items() if v is not None}), password


def rewind_source(primary: Node) -> tuple[str, str | None]:
    """libpq string for pg_rewind --source-server (a normal connection to the new primary)."""
    parts = [primary.public_conninfo_string(), f"dbname={primary.dbname}"]
    return " ".join(parts), primary.password


@dataclass(frozen=True)
class RewindDecision:
    needed: bool
    reason: str


def needs_rewind(old: ControlData, history_text: str | None, new_timeline: int) -> RewindDecision:
    """Does the stopped old primary hold WAL the new timeline does not? (then pg_rewind)

    The new timeline's history file names where each ancestor timeline ends (its switch
    point). A cleanly shut down node whose last record (its shutdown checkpoint) lies before
    the switch point of its own timeline holds nothing the new timeline lacks: it can
    simply follow. Anything else (a crash, WAL past the switch point, an unrelated
    timeline) needs pg_rewind.
    """
    if old.timeline == new_timeline:
        return RewindDecision(False, f"already on timeline {new_timeline}")
    if history_text is None:
        return RewindDecision(True, f"history of timeline {new_timeline} unavailable")
    entries = {tli: lsn for tli, lsn, _ in parse_history(history_text)}
    if old.timeline not in entries:
        return RewindDecision(True, f"timeline {old.timeline} is not an ancestor of timeline {new_timeline}")
    switch = entries[old.timeline]
    if not old.state.startswith("shut down"):
        return RewindDecision(True, f"not cleanly shut down (state: {old.state})")
    if old.checkpoint_lsn >= switch:
        return RewindDecision(True, f"its WAL ends at {format_lsn(old.checkpoint_lsn)} or later, past the switch "
                                    f"point {format_lsn(switch)} of timeline {old.timeline}")
    return RewindDecision(False, f"shut down at {format_lsn(old.checkpoint_lsn)}, before the switch point "
                                 f"{format_lsn(switch)}")


def rejoin(ctl: NodeController, primary: Node, *, conninfo_template: str | None, slot: str | None,
           history: str | None, new_timeline: int, timeout: float,
           decision: RewindDecision | None = None) -> RewindDecision:
    """Make a former primary (stopped, or still exiting) a streaming standby of `primary`.

    pg_rewind runs only when :func:`needs_rewind` says its WAL diverged from the new timeline;
    `primary` must have checkpointed since its promotion (pg_rewind reads its timeline from
    the control file). Then standby.signal and primary_conninfo, and a start. A `decision` made by
    the caller (e.g. from a standby's received LSN, which its control file does not record) is used as is.
    """
    ctl.stop("fast", timeout=timeout)  # a fenced postmaster may still be archiving its last segment
    if decision is None:
        decision = needs_rewind(ctl.controldata(), history, new_timeline)
    if decision.needed:
        # pg_rewind copies the source's configuration files too (port, conninfo, ...): keep the node's own.
        saved = {name: ctl.read_file(name) for name in NODE_CONFIG_FILES}
        source, password = rewind_source(primary)
        ctl.rewind(source, password=password, restore_target_wal=bool(ctl.setting("restore_command")),
                   timeout=max(timeout, 600))
        for name, text in saved.items():
            if text is not None:
                ctl.write_file(name, text)
    ctl.write_standby_config(follow_conninfo(conninfo_template, primary, ctl.node.name), slot)
    ctl.start(timeout=timeout)
    return decision


# ------------------------------------------------------------------------------ SQL actions


def ensure_slot(conn: Any, name: str) -> bool:
    """Create a physical slot reserving WAL now (True) unless it exists (False)."""
    if conn.execute("select 1 from pg_replication_slots where slot_name = %s", (name,)).fetchone():
        return False
    conn.execute("select pg_create_physical_replication_slot(%s, true)", (name,))
    return True


def drop_inactive_slots(conn: Any, names: set[str]) -> list[str]:
    """Drop the named physical slots that no walsender uses (stale after the primary moved)."""
    dropped = []
    rows = conn.execute("select slot_name from pg_replication_slots where slot_type = 'physical' and not active"
                        " and slot_name = any(%s)", (sorted(names),)).fetchall()
    for (name,) in rows:
        conn.execute("select pg_drop_replication_slot(%s)", (name,))
        dropped.append(name)
    return dropped


def set_upstream(conn: Any, conninfo: str, slot: str | None) -> None:
    """ALTER SYSTEM primary_conninfo / primary_slot_name on a running standby, then reload
    (both are reloadable since PostgreSQL 13; older servers need a restart)."""
    from dbops.pg import conn as pgconn

    pgconn.alter_system(conn, "primary_conninfo", conninfo)
    pgconn.alter_system(conn, "primary_slot_name", slot or None)
    pgconn.reload(conn)


def clear_upstream(conn: Any) -> None:
    """On a promoted node: forget the old upstream (ignored by a primary, but misleading)."""
    conn.execute("alter system reset primary_conninfo")
    conn.execute("alter system reset primary_slot_name")
    conn.execute("select pg_reload_conf()")


def read_history(conn: Any, timeline: int) -> str | None:
    """The timeline history file from the server's pg_wal (superuser or pg_read_server_files)."""
    try:
        return conn.execute("select pg_read_file(%s)", (f"pg_wal/{timeline:08X}.history",)).fetchone()[0]
    except PostgresError:  # no privilege or no file: the caller decides (rewind when unsure)
        return None
