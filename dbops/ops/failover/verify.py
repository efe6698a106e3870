"""Verification after a switchover: what "succeeded" means, checked on the servers themselves.

* the new primary accepts a new session and assigns a transaction id, on the new timeline;
* every follower (the old primary, the repointed standbys) streams from it on that timeline;
* the new timeline's history file was archived (``archive_status/*.done``) and, when the
  archive is dbops', the object is in the store.

Each check waits up to the timeout and becomes a :class:`Finding`; nothing here raises.
"""

from __future__ import annotations

import time

from dbops.config import Config, Node
from dbops.errors import DbopsError
from dbops.ops.failover.plan import FAIL, OK, Finding


def verify(cfg: Config, new: Node, followers: list[Node], *, timeline: int, old_timeline: int,
           archive_command: str, timeout: float) -> list[Finding]:
    deadline = time.monotonic() + timeout
    return [writable(new, timeline, old_timeline), *streaming(cfg, new, followers, timeline, deadline),
            archived(cfg, new, timeline, archive_command, deadline)]


def writable(new: Node, timeline: int, old_timeline: int) -> Finding:
    from dbops.pg import conn

    try:
        with conn.session(new) as c:  # a new session: proves it accepts connections, too
            in_rec, walfile, _ = c.execute("select pg_is_in_recovery(), pg_walfile_name(pg_current_wal_lsn()),"
                                           " txid_current()").fetchone()
    except DbopsError as e:
        return Finding("new primary writable", FAIL, f"{new.name}: {e.message}", node=new.name)
    now = int(walfile[:8], 16)
    ok = not in_rec and now == timeline and timeline > old_timeline
    return Finding("new primary writable", OK if ok else FAIL, f"{new.name} takes writes on timeline {now}",
                   node=new.name)


def streaming(cfg: Config, new: Node, followers: list[Node], timeline: int, deadline: float) -> list[Finding]:
    from dbops.ops import topology

    out: list[Finding] = []
    pending = {n.name: n for n in followers}
    last: dict[str, str] = {}
    while pending:
        for name, n in list(pending.items()):
            st = topology.probe(n, cfg.nodes)
            if st.streaming and st.upstream == new.name and st.timeline == timeline:
                out.append(Finding("streaming from new primary", OK, f"{name} streams from {new.name} on "
                                   f"timeline {timeline}", node=name))
                del pending[name]
            elif st.reachable:
                last[name] = (f"{st.role}, receiver {st.receiver.status if st.receiver else '-'}, "
                              f"upstream {st.upstream or '-'}, timeline {st.timeline}")
            else:
                last[name] = f"unreachable: {st.error}"
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for name in pending:
        out.append(Finding("streaming from new primary", FAIL, f"{name} is not streaming from {new.name} "
                           f"on timeline {timeline} ({last.get(name)})", f"check {name}'s server log", node=name))
    return out


def archived(cfg: Config, new: Node, timeline: int, archive_command: str, deadline: float) -> Finding:
    from dbops.pg import conn

    name = f"{timeline:08X}.history"
    done = False
    try:
        with conn.session(new) as c:
            while not done and time.monotonic() < deadline:
                done = bool(c.execute("select count(*) from pg_ls_archive_statusdir() where name = %s",
                                      (name + ".done",)).fetchone()[0])
                if not done:
                    time.sleep(0.1)
    except DbopsError as e:
        return Finding("history archived", FAIL, f"cannot check {name} on {new.name}: {e.message}", node=new.name)
    if not done:
        return Finding("history archived", FAIL, f"{name} not archived by {new.name} yet",
                       f"check archive_command and pg_stat_archiver on {new.name}", new.name)
    if "wal-push" not in archive_command:
        return Finding("history archived", OK, f"{name} archived by {new.name} (archive_command)", node=new.name)
    from dbops.storage import open_archive

    try:
        store, layout = open_archive(cfg.storage)
        key = layout.wal_key(name)
        found = store.head(key) is not None
    except DbopsError as e:
        return Finding("history archived", FAIL, f"cannot check the archive for {name}: {e.message}", e.hint)
    return Finding("history archived", OK if found else FAIL, f"{name} {'is' if found else 'is NOT'} in the "
                   f"archive ({key})", None if found else "archive_command reported success but the object is "
                   "missing: check the WAL archive", new.name)
