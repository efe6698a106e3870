"""A PgBouncer that a switchover paused must not stay paused, even when dbops was killed with SIGKILL.

Before PAUSE, the switchover stores a record in the bucket (``locks/switch.pgbouncer-paused``:
which pooler, the old primary, the candidate, who paused it); after RESUME it deletes it. A run
killed in between cannot resume, so the record stays, and:

* the next ``dbops failover`` (it takes the dead run's switch lock over) repoints the pooler at
  whichever node accepts writes now and runs RESUME before anything else, and says so;
  ``dbops failover --primary-lost`` does it right after repointing the pooler at its new primary;
* ``dbops check`` does the same, as finding ``pgbouncer paused`` (it also reports a pooler that
  is paused with no such record, without touching it: someone paused it on purpose).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from dbops import log
from dbops.config import Config, Node
from dbops.errors import DbopsError, NotFoundError
from dbops.ops.failover.pgbouncer import PgBouncer
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("pgbouncer")


def record_key(layout: Layout) -> str:
    return layout.root + "locks/switch.pgbouncer-paused"


class PauseRecord:
    """The record of a PAUSE that a RESUME has not answered yet."""

    def __init__(self, store: ObjectStore, layout: Layout, bouncer: PgBouncer, old: Node, new: Node) -> None:
        self.store, self.key = store, record_key(layout)
        self.body = {"pgbouncer": f"{bouncer.settings.host}:{bouncer.settings.port}", "old_primary": old.name,
                     "candidate": new.name, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}

    def mark(self) -> None:
        self.store.put(self.key, json.dumps(self.body).encode())

    def clear(self) -> None:
        try:
            self.store.delete(self.key)
        except DbopsError as e:  # RESUME went through; a stale record only makes the next run RESUME again
            log.event(_log, logging.WARNING, "could not delete the PgBouncer pause record", error=e.message)


def read_record(store: ObjectStore, layout: Layout) -> dict[str, Any] | None:
    try:
        raw = store.get(record_key(layout))
    except NotFoundError:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    return rec if isinstance(rec, dict) else {}


def resume_leftover(cfg: Config, store: ObjectStore, layout: Layout) -> str | None:
    """RESUME a PgBouncer that a killed switchover left paused (per its record); what was done, or None.

    Before RESUME, the pooler is pointed at the node that accepts writes now (when exactly one
    does and it is not the one the killed run found as primary): a run killed after promotion
    but before the repoint left it aimed at the old primary."""
    rec = read_record(store, layout)
    if rec is None:
        return None
    if cfg.failover.pgbouncer is None:  # no longer configured: nothing dbops can reach
        return f"a PgBouncer pause record of an interrupted switchover names {rec.get('pgbouncer')}, " \
               "but failover.pgbouncer is not configured: run RESUME on its admin console"
    from dbops.ops import topology

    bouncer = PgBouncer(cfg.failover.pgbouncer)
    done = []
    writers = [s for s in topology.discover(cfg).nodes if s.role == "primary"]
    old = next((n for n in cfg.nodes if n.name == rec.get("old_primary")), None)
    if len(writers) == 1 and old is not None and writers[0].name != old.name:
        changed = bouncer.repoint(old, cfg.node(writers[0].name))
        if changed:
            done.append(f"repointed {', '.join(changed)} at {writers[0].name}")
    bouncer.resume()
    done.append("RESUME")
    store.delete(record_key(layout))
    msg = (f"PgBouncer {rec.get('pgbouncer')} was left paused by an interrupted switchover "
           f"(pid {rec.get('pid')} on {rec.get('host')}): {', '.join(done)}")
    log.event(_log, logging.WARNING, msg)
    return msg


def check(cfg: Config, report: Any) -> None:
    """`dbops check`: resume a pooler a killed switchover left paused; report one paused otherwise."""
    from dbops.ops.check import FAIL, OK, WARN
    from dbops.storage import open_archive

    if cfg.failover.pgbouncer is None:
        return
    s = cfg.failover.pgbouncer
    where = f"PgBouncer {s.host}:{s.port}"
    try:
        done = resume_leftover(cfg, *open_archive(cfg.storage))
        held = PgBouncer(s).paused_databases()
    except DbopsError as e:
        report.add("pgbouncer", "paused", FAIL, f"{where}: {e.message}", e.hint)
        return
    if held:
        report.add("pgbouncer", "paused", WARN, f"{where} holds {', '.join(held)} paused (not by dbops)",
                   "run RESUME on its admin console when the pause is not wanted")
    elif done:
        report.add("pgbouncer", "paused", WARN, done, "nothing more to do; see docs/bad-days.md")
    else:
        report.add("pgbouncer", "paused", OK, f"{where} is not paused")
