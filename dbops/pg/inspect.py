"""Probing the configured nodes: which one is the primary."""

from __future__ import annotations

from typing import Sequence

from dbops.config import Node
from dbops.errors import DbopsError, PostgresError, PreconditionError
from dbops.pg import conn as pgconn


def find_primary(nodes: Sequence[Node]) -> Node:
    """The node that is not in recovery (exactly one must be)."""
    primaries, errors = [], []
    for n in nodes:
        try:
            with pgconn.session(n) as c:
                if not pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
                    primaries.append(n)
        except DbopsError as e:
            errors.append(f"{n.name}: {e.message}")
    if len(primaries) == 1:
        return primaries[0]
    if not primaries:
        raise PostgresError("no reachable primary among the configured nodes",
                            detail="; ".join(errors) or None, hint="dbops check shows each node's state")
    raise PreconditionError("more than one primary: " + ", ".join(n.name for n in primaries),
                            hint="split brain: stop all but one primary")
