"""Temporary settings on a switchover candidate that keep its promotion within milliseconds.

Once the old primary stops, a standby's startup process alternates between the archive
(``restore_command``), pg_wal and a new walreceiver, sleeping ``wal_retrieve_retry_interval``
(5 s by default) between rounds. A promote request that arrives while it is about to take
that sleep is only acted on after it (measured here: 5 s of extra write downtime in one
switchover out of three), and every ``restore_command`` run (an archive client: hundreds of
milliseconds) delays the promotion as well, including the history-file probes promotion
itself makes.

So for the few hundred milliseconds of the switch the candidate gets a 10 ms retry
interval and, when it is safe (see the caller), an empty ``restore_command``; both are
reloadable (``restore_command`` since PostgreSQL 14). :meth:`CandidateTuning.undo` puts back
exactly what was there: a value from ``postgresql.auto.conf`` is set again, anything else
is reset so ``postgresql.conf`` rules again.

What was there is also written to ``dbops-switchover-tuning.json`` in the node's data folder
(through its node controller) before anything changes, and removed by the undo: a dbops killed
outright (kill -9) leaves that file behind, and the next switchover puts those values back
(:func:`put_back_leftover`) on every node it touches before it tunes anything.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from dbops import log
from dbops.config import Node
from dbops.nodes import NodeController
from dbops.pg import conn as pgconn

_log = log.get("failover")
MARKER = "dbops-switchover-tuning.json"

RETRY_INTERVAL = "10ms"


@dataclass(frozen=True)
class _Saved:
    value: str
    in_auto_conf: bool


class CandidateTuning:
    def __init__(self, node: Node, ctl: NodeController | None = None):
        self.node = node
        self.ctl = ctl
        self.saved: dict[str, _Saved] = {}

    def apply(self, conn: Any, *, suspend_restore_command: bool, extra: dict[str, str] | None = None) -> str:
        """Set the temporary values (plus `extra` settings) on an open connection; returns what was done.
        Applied again, it keeps the values saved first, so :meth:`undo` still restores the originals."""
        changes = {"wal_retrieve_retry_interval": RETRY_INTERVAL, **(extra or {})}
        if suspend_restore_command:
            changes["restore_command"] = ""
        rows = conn.execute("select name, current_setting(name), coalesce(sourcefile, '') from pg_settings"
                            " where name = any(%s)", (list(changes),)).fetchall()
        for name, value, sourcefile in rows:
            if name not in self.saved:
                self.saved[name] = _Saved(value, sourcefile.endswith("postgresql.auto.conf"))
        if self.ctl is not None:  # before anything changes: a killed run leaves it for the next one
            self.ctl.write_file(MARKER, json.dumps({k: [v.value, v.in_auto_conf] for k, v in self.saved.items()}))
        for name, value in changes.items():
            pgconn.alter_system(conn, name, value)
        pgconn.reload(conn)
        return ", ".join(f"{k}={v!r}" for k, v in changes.items())

    def undo(self) -> None:
        """Put the saved values back (idempotent)."""
        if not self.saved:
            return
        _restore(self.node, self.saved)
        if self.ctl is not None:
            self.ctl.remove_file(MARKER)
        self.saved.clear()


def _restore(node: Node, saved: dict[str, _Saved]) -> None:
    with pgconn.session(node) as c:
        for name, value in saved.items():
            pgconn.alter_system(c, name, value.value if value.in_auto_conf else None)
        pgconn.reload(c)


def put_back_leftover(node: Node, ctl: NodeController) -> str | None:
    """Undo the tuning a killed switchover left on `node` (see the module docstring); what was done, or None."""
    text = ctl.read_file(MARKER)
    if text is None:
        return None
    try:
        saved = {str(k): _Saved(str(v[0]), bool(v[1])) for k, v in json.loads(text).items()
                 if re.fullmatch(r"[a-z_]{1,63}", str(k))}
    except (ValueError, TypeError, AttributeError, IndexError):
        saved = {}
    _restore(node, saved)
    ctl.remove_file(MARKER)
    log.event(_log, logging.WARNING, "put back the settings an interrupted switchover left", node=node.name,
              settings=", ".join(saved) or "none")
    return f"{node.name}: put back {', '.join(saved) or 'nothing'} left by an interrupted switchover"
