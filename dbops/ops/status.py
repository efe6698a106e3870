"""`dbops status`: one screen about the cluster, built from independent sections.

Extension point: a section is a function ``(Config) -> Section``; add one with
:func:`register` (e.g. the last backup and its validation, the archive's lag) and both
the table view and ``--json`` pick it up. A section that fails shows its error instead
of hiding the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbops.config import Config
from dbops.errors import DbopsError
from dbops.pg.lsn import format_lsn


@dataclass
class Section:
    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    data: Any = None  # what --json prints for this section
    notes: list[str] = field(default_factory=list)
    error: str | None = None


SectionFn = Callable[[Config], Section]
_SECTIONS: list[tuple[str, SectionFn]] = []


def register(name: str, fn: SectionFn) -> None:
    """Add (or replace) a section; sections show in registration order."""
    for i, (n, _) in enumerate(_SECTIONS):
        if n == name:
            _SECTIONS[i] = (name, fn)
            return
    _SECTIONS.append((name, fn))


def collect(cfg: Config) -> list[tuple[str, Section]]:
    out = []
    for name, fn in _SECTIONS:
        try:
            out.append((name, fn(cfg)))
        except DbopsError as e:
            out.append((name, Section(title=name, error=e.message + (f" ({e.detail})" if e.detail else ""))))
    return out


def topology_section(cfg: Config) -> Section:
    from dbops.ops import topology

    topo = topology.discover(cfg)
    sec = Section(title="topology", headers=["NODE", "ADDRESS", "ROLE", "UPSTREAM", "TIMELINE", "LSN",
                                             "REPLAY LAG", "STATE"], data=topo.as_dict())
    for s in topo.nodes:
        lsn = s.current_lsn if s.role == topology.PRIMARY else s.replay_lsn
        lag = topo.replay_lag(s) if s.role == topology.STANDBY else None
        if s.role == topology.PRIMARY:
            a = s.archiver
            state = "archiver failing" if a and a.failing else "ok"
        elif s.role == topology.STANDBY:
            state = (s.receiver.status if s.receiver else "not streaming") + (", replay paused" if s.replay_paused
                                                                                else "")
        else:
            state = s.error or ""
        sec.rows.append([s.name, f"{s.node.host}:{s.node.port}", s.role, s.upstream or "", s.timeline or "",
                         format_lsn(lsn) if lsn is not None else "", "" if lag is None else lag, state])
    if len(topo.primaries) != 1:
        sec.notes.append(f"expected exactly one primary, found {len(topo.primaries)}")
    for s in topo.standbys:
        if topo.primary and s.system_identifier != topo.primary.system_identifier:
            sec.notes.append(f"{s.name} belongs to another cluster (system identifier {s.system_identifier})")
    return sec


register("topology", topology_section)
