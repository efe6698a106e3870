"""One probe of a node and of the cluster (one query round per node), used by check, topology
(failover, status), wal status and backup's choice of the primary.

For every node: reachable or not, role (``pg_is_in_recovery``), version, system identifier,
timeline, WAL positions (current / received / replayed), whether replay is paused, whom
it streams from (``pg_stat_wal_receiver`` matched against the configured nodes), and
for a primary its walsenders, archiver state (with the count of ``.ready`` files when the
role may read them) and oldest open transaction.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

from dbops import log
from dbops.config import Node
from dbops.errors import DbopsError, PostgresError, PreconditionError, QueryError
from dbops.pg.lsn import parse_lsn

_log = log.get("topology")

PRIMARY, STANDBY, UNREACHABLE = "primary", "standby", "unreachable"
CONNECT_TIMEOUT = 3

_NODE_SQL = """
select pg_is_in_recovery(),
       (select system_identifier::text from pg_control_system()),
       current_setting('server_version_num')::int, current_setting('server_version'),
       case when pg_is_in_recovery() then null else pg_current_wal_lsn()::text end,
       case when pg_is_in_recovery() then null else pg_walfile_name(pg_current_wal_lsn()) end,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       case when pg_is_in_recovery() then pg_is_wal_replay_paused() end,
       (select timeline_id from pg_control_checkpoint()),
       current_setting('data_checksums'), current_setting('wal_log_hints'),
       current_setting('archive_mode'), current_setting('archive_command'),
       current_setting('primary_slot_name'), current_setting('wal_level'),
       current_setting('max_wal_senders'), current_setting('max_replication_slots'),
       current_setting('primary_conninfo')
"""
_RECEIVER_SQL = """
select status, received_tli, flushed_lsn::text, sender_host, sender_port, slot_name
from pg_stat_wal_receiver
"""
_SENDERS_SQL = """
select application_name, client_addr::text, state, sent_lsn::text, flush_lsn::text, replay_lsn::text, sync_state
from pg_stat_replication order by application_name
"""
_ARCHIVER_SQL = """
select archived_count, last_archived_wal, extract(epoch from last_archived_time),
       failed_count, last_failed_wal, extract(epoch from last_failed_time)
from pg_stat_archiver
"""
_READY_SQL = "select count(*) from pg_ls_archive_statusdir() where name like '%.ready'"
_OLDEST_XACT_SQL = """
select pid, coalesce(application_name, ''), extract(epoch from now() - xact_start)
from pg_stat_activity
where xact_start is not null and backend_type = 'client backend' and pid <> pg_backend_pid()
order by xact_start limit 1
"""


@dataclass(frozen=True)
class Receiver:
    status: str
    timeline: int | None
    flushed_lsn: int | None
    sender_host: str | None
    sender_port: int | None
    slot_name: str | None


@dataclass(frozen=True)
class Sender:
    application_name: str
    client_addr: str | None
    state: str
    sent_lsn: int | None
    flush_lsn: int | None
    replay_lsn: int | None
    sync_state: str


@dataclass(frozen=True)
class Archiver:
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: float | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: float | None
    ready_count: int | None

    @property
    def failing(self) -> bool:
        """The last attempt failed (a failure newer than the last success)."""
        if not self.last_failed_time:
            return False
        return not self.last_archived_time or self.last_failed_time > self.last_archived_time


@dataclass(frozen=True)
class NodeState:
    node: Node
    role: str  # primary | standby | unreachable
    error: str | None = None
    version_num: int | None = None
    version: str | None = None  # server_version, as the server words it
    system_identifier: str | None = None
    timeline: int | None = None
    current_lsn: int | None = None  # primary: pg_current_wal_lsn()
    current_wal: str | None = None  # primary: the segment pg_current_wal_lsn() is in
    receive_lsn: int | None = None  # standby: last WAL received and flushed
    replay_lsn: int | None = None  # standby: last WAL replayed
    replay_paused: bool | None = None
    settings: dict[str, str] = field(default_factory=dict)
    receiver: Receiver | None = None
    upstream: str | None = None  # configured node name (or host:port) a standby streams from
    configured_upstream: tuple[str, int] | None = None  # host and port in its primary_conninfo
    senders: tuple[Sender, ...] = ()
    archiver: Archiver | None = None
    oldest_xact: tuple[int, str, float] | None = None  # pid, application_name, age in seconds

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def reachable(self) -> bool:
        return self.role != UNREACHABLE

    @property
    def streaming(self) -> bool:
        return self.receiver is not None and self.receiver.status == "streaming"

    @property
    def end_lsn(self) -> int | None:
        """How far this node's WAL goes: current LSN on a primary, received on a standby."""
        return self.current_lsn if self.role == PRIMARY else self.receive_lsn


def _lsn(v: str | None) -> int | None:
    return parse_lsn(v) if v else None


@lru_cache(maxsize=64)
def _addresses(host: str) -> frozenset[str]:
    if host in ("localhost", "127.0.0.1", "::1"):
        return frozenset({"loopback"})
    try:
        return frozenset(ai[4][0] for ai in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset({host})


def same_endpoint(host: str | None, port: int | None, node: Node) -> bool:
    """Does (host, port) from pg_stat_wal_receiver name this configured node?"""
    if host is None or port != node.port:
        return False
    return host == node.host or bool(_addresses(host) & _addresses(node.host))


def conninfo_endpoint(conninfo: str | None) -> tuple[str, int] | None:
    """(host, port) of a primary_conninfo; nothing else of it is kept (it may hold a password)."""
    if not conninfo:
        return None
    from dbops.pg import conninfo as ci

    try:
        d = ci.parse(conninfo)
    except ci.ConninfoError:
        return None
    host = str(d.get("host") or "").split(",")[0]
    try:
        port = int(str(d.get("port") or "5432").split(",")[0])
    except ValueError:
        return None
    return (host, port) if host else None


def points_at(endpoint: tuple[str, int] | None, node: Node) -> bool:
    return endpoint is not None and same_endpoint(endpoint[0], endpoint[1], node)


def upstream_name(receiver: Receiver | None, nodes: tuple[Node, ...]) -> str | None:
    if receiver is None or receiver.sender_host is None:
        return None
    for n in nodes:
        if same_endpoint(receiver.sender_host, receiver.sender_port, n):
            return n.name
    return f"{receiver.sender_host}:{receiver.sender_port}"


def probe(node: Node, nodes: tuple[Node, ...] = ()) -> NodeState:
    """One node's state (never raises for an unreachable node: its role says so)."""
    from dbops.pg import conn

    try:
        c = conn.connect(node, connect_timeout=CONNECT_TIMEOUT)
    except DbopsError as e:
        return NodeState(node=node, role=UNREACHABLE, error=(e.detail or e.message).strip().splitlines()[0])
    try:
        return _probe(c, node, nodes)
    except QueryError as e:  # a query failing mid-way: report the node as unreachable, with why
        _log.debug("probe of %s failed", node.name, exc_info=True)
        return NodeState(node=node, role=UNREACHABLE, error=e.detail or e.message)
    finally:
        c.close()


def _ready_count(c: Any) -> int | None:
    """.ready files on the primary (needs superuser or pg_monitor; None without)."""
    try:
        row = c.execute(_READY_SQL).fetchone()
    except PostgresError:
        return None
    return int(row[0]) if row and row[0] is not None else None


def _probe(c: Any, node: Node, nodes: tuple[Node, ...]) -> NodeState:
    row = c.execute(_NODE_SQL).fetchone()
    (in_recovery, sysid, version_num, version, current, walfile, received, replayed, paused, ckpt_tli,
     checksums, hints, archive_mode, archive_command, slot, wal_level, senders_max, slots_max, upstream_conninfo) = row
    settings = {"data_checksums": checksums, "wal_log_hints": hints, "archive_mode": archive_mode,
                "archive_command": archive_command, "primary_slot_name": slot, "wal_level": wal_level,
                "max_wal_senders": senders_max, "max_replication_slots": slots_max}
    if not in_recovery:
        archiver = None
        arow = c.execute(_ARCHIVER_SQL).fetchone()
        if arow:
            archiver = Archiver(int(arow[0]), arow[1], float(arow[2]) if arow[2] else None, int(arow[3]), arow[4],
                                float(arow[5]) if arow[5] else None, _ready_count(c))
        senders = tuple(Sender(r[0], r[1], r[2], _lsn(r[3]), _lsn(r[4]), _lsn(r[5]), r[6])
                        for r in c.execute(_SENDERS_SQL).fetchall())
        xrow = c.execute(_OLDEST_XACT_SQL).fetchone()
        return NodeState(node=node, role=PRIMARY, version_num=version_num, version=version, system_identifier=sysid,
                         timeline=int(walfile[:8], 16), current_lsn=_lsn(current), current_wal=walfile,
                         settings=settings,
                         senders=senders, archiver=archiver,
                         oldest_xact=(int(xrow[0]), xrow[1], float(xrow[2])) if xrow else None)
    rrow = c.execute(_RECEIVER_SQL).fetchone()
    receiver = None
    if rrow:
        receiver = Receiver(rrow[0], rrow[1], _lsn(rrow[2]), rrow[3], rrow[4], rrow[5])
    timeline = receiver.timeline if receiver and receiver.timeline else ckpt_tli
    return NodeState(node=node, role=STANDBY, version_num=version_num, version=version, system_identifier=sysid,
                     timeline=timeline,
                     receive_lsn=_lsn(received) or (receiver.flushed_lsn if receiver else None),
                     replay_lsn=_lsn(replayed), replay_paused=bool(paused), settings=settings, receiver=receiver,
                     upstream=upstream_name(receiver, nodes), configured_upstream=conninfo_endpoint(upstream_conninfo))


def probe_all(nodes: Sequence[Node]) -> list[NodeState]:
    """Probe every node at once (in the order given)."""
    nodes = tuple(nodes)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(nodes)))) as ex:
        return list(ex.map(lambda n: probe(n, nodes), nodes))


def find_primary(nodes: Sequence[Node]) -> Node:
    """The node that is not in recovery (exactly one must be)."""
    states = probe_all(nodes)
    primaries = [s.node for s in states if s.role == PRIMARY]
    if len(primaries) == 1:
        return primaries[0]
    if not primaries:
        errors = [f"{s.name}: {s.error}" for s in states if s.role == UNREACHABLE]
        raise PostgresError("no reachable primary among the configured nodes",
                            detail="; ".join(errors) or None, hint="dbops check shows each node's state")
    raise PreconditionError("more than one primary: " + ", ".join(n.name for n in primaries),
                            hint="split brain: stop all but one primary")
