"""Failover hooks: operator commands run at fixed points, blocking, in order.

A hook is a command line split like a shell would split it and run without a shell
(write ``sh -c '...'`` for pipes and such). Its environment carries ``DBOPS_*`` values
naming the cluster, the old and the new primary; ``DBOPS_HOOK`` says which kind runs.
"""

from __future__ import annotations

import logging
import shlex

from dbops import log, proc
from dbops.config import Node
from dbops.errors import DbopsError

_log = log.get("failover")


def env_for(cluster: str, old: Node, new: Node, **extra: str) -> dict[str, str]:
    env = {
        "DBOPS_CLUSTER": cluster,
        "DBOPS_OLD_PRIMARY": old.name, "DBOPS_OLD_PRIMARY_HOST": old.host, "DBOPS_OLD_PRIMARY_PORT": str(old.port),
        "DBOPS_NEW_PRIMARY": new.name, "DBOPS_NEW_PRIMARY_HOST": new.host, "DBOPS_NEW_PRIMARY_PORT": str(new.port),
    }
    env.update({f"DBOPS_{k.upper()}": v for k, v in extra.items()})
    return env


def run_hooks(kind: str, hooks: tuple[str, ...], env: dict[str, str], timeout: float) -> list[str]:
    """Run hooks in order; returns the first failure ("'hook' exited with status N: stderr tail"), else []."""
    env = {**env, "DBOPS_HOOK": kind}
    for hook in hooks:
        try:
            res = proc.run(shlex.split(hook), env=env, timeout=timeout, check=False, what=f"{kind}-hook")
        except (DbopsError, ValueError) as e:  # not found, timed out, unbalanced quotes
            return [f"{hook!r} failed: {getattr(e, 'message', None) or e}"]
        log.event(_log, logging.INFO, f"{kind}-hook finished", hook=hook, status=res.returncode)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout or "").strip()[-500:]
            return [f"{hook!r} exited with status {res.returncode}" + (f": {tail}" if tail else "")]
    return []


__all__ = ["env_for", "run_hooks"]
