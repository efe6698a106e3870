"""The replication topology: every configured node probed at once (:mod:`dbops.pg.inspect`), and
what follows from them together (the primary, who follows whom, the lag of each standby)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dbops.config import Config
from dbops.pg.inspect import (  # the probe's names, for the workflows that read a topology
    CONNECT_TIMEOUT,
    PRIMARY,
    STANDBY,
    UNREACHABLE,
    Archiver,
    NodeState,
    Receiver,
    Sender,
    conninfo_endpoint,
    points_at,
    probe,
    probe_all,
    same_endpoint,
    upstream_name,
)
from dbops.pg.lsn import format_lsn

@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeState, ...]

    def get(self, name: str) -> NodeState:
        for s in self.nodes:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def primaries(self) -> list[NodeState]:
        return [s for s in self.nodes if s.role == PRIMARY]

    @property
    def standbys(self) -> list[NodeState]:
        return [s for s in self.nodes if s.role == STANDBY]

    @property
    def unreachable(self) -> list[NodeState]:
        return [s for s in self.nodes if s.role == UNREACHABLE]

    @property
    def primary(self) -> NodeState | None:
        p = self.primaries
        return p[0] if len(p) == 1 else None

    def followers(self, name: str) -> list[NodeState]:
        return [s for s in self.standbys if s.upstream == name]

    def replay_lag(self, standby: NodeState) -> int | None:
        """Bytes of WAL the primary has that the standby has not replayed yet."""
        p = self.primary
        if p is None or p.current_lsn is None or standby.replay_lsn is None:
            return None
        return max(0, p.current_lsn - standby.replay_lsn)

    def receive_lag(self, standby: NodeState) -> int | None:
        p = self.primary
        if p is None or p.current_lsn is None or standby.receive_lsn is None:
            return None
        return max(0, p.current_lsn - standby.receive_lsn)

    def as_dict(self) -> dict[str, Any]:
        out = []
        for s in self.nodes:
            d: dict[str, Any] = {
                "name": s.name, "host": s.node.host, "port": s.node.port, "role": s.role, "error": s.error,
                "version_num": s.version_num, "system_identifier": s.system_identifier, "timeline": s.timeline,
                "current_lsn": _fmt(s.current_lsn), "receive_lsn": _fmt(s.receive_lsn),
                "replay_lsn": _fmt(s.replay_lsn), "replay_paused": s.replay_paused, "upstream": s.upstream,
                "streaming": s.streaming if s.role == STANDBY else None,
            }
            if s.role == STANDBY:
                d["replay_lag_bytes"] = self.replay_lag(s)
                d["receive_lag_bytes"] = self.receive_lag(s)
            if s.archiver is not None:
                a = s.archiver
                d["archiver"] = {"archived_count": a.archived_count, "last_archived_wal": a.last_archived_wal,
                                 "failed_count": a.failed_count, "last_failed_wal": a.last_failed_wal,
                                 "failing": a.failing, "ready_count": a.ready_count}
            if s.senders:
                d["senders"] = [{"application_name": x.application_name, "client_addr": x.client_addr,
                                 "state": x.state, "replay_lsn": _fmt(x.replay_lsn)} for x in s.senders]
            out.append(d)
        return {"nodes": out, "primary": self.primary.name if self.primary else None}


def _fmt(v: int | None) -> str | None:
    return format_lsn(v) if v is not None else None


def discover(cfg: Config) -> Topology:
    """Probe every configured node at once."""
    return Topology(tuple(probe_all(cfg.nodes)))


__all__ = ["CONNECT_TIMEOUT", "PRIMARY", "STANDBY", "UNREACHABLE", "Archiver", "NodeState", "Receiver", "Sender",
           "Topology", "conninfo_endpoint", "discover", "points_at", "probe", "same_endpoint", "upstream_name"]
