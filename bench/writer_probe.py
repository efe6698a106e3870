"""A writer that commits continuously and records every acknowledged commit.

Used by the failover benchmark and tests: each commit inserts a unique id in autocommit
mode; an id counts as acknowledged only once the INSERT returned. Connection errors are
recorded and the writer reconnects at once (5 ms pause), as an application using a libpq
multi-host string with ``target_session_attrs=read-write`` would.

    w = Writer(conninfo); w.start(); ...; w.stop()
    w.max_gap()           longest time between two acknowledged commits (the write gap)
    w.lost(conn)          acknowledged ids missing from the database
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

TABLE = "dbops_probe"


def prepare(conn: Any) -> None:
    conn.execute(f"create table if not exists {TABLE} (id bigint primary key, at timestamptz default now())")


def multi_host(nodes: list[Any], *, dbname: str = "postgres", passfile: str | None = None,
               connect_timeout: int = 2) -> str:
    """A libpq string listing every node, connecting only to the writable one."""
    hosts = ",".join(n.host for n in nodes)
    ports = ",".join(str(n.port) for n in nodes)
    s = (f"host={hosts} port={ports} user={nodes[0].user} dbname={dbname} target_session_attrs=read-write "
         f"connect_timeout={connect_timeout} application_name=writer_probe")
    if passfile:
        s += f" passfile={passfile}"
    return s


class Writer(threading.Thread):
    def __init__(self, conninfo: str, *, start_id: int = 1, retry_pause: float = 0.005):
        super().__init__(name="writer-probe", daemon=True)
        self.conninfo = conninfo
        self.next_id = start_id
        self.retry_pause = retry_pause
        self.acked: list[tuple[int, float]] = []  # (id, monotonic time of the acknowledgement)
        self.acked_wall: list[float] = []  # wall-clock time of each acknowledgement (same order as acked)
        self.sent: list[float] = []  # monotonic time each acknowledged commit was sent (same order as acked)
        self.errors: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        import psycopg

        conn = None
        while not self._halt.is_set():
            try:
                if conn is None:
                    # No server-side prepared statements: PgBouncer's transaction pooling cannot carry them.
                    conn = psycopg.connect(self.conninfo, autocommit=True, prepare_threshold=None)
                i = self.next_id
                self.next_id += 1
                sent = time.monotonic()
                conn.execute(f"insert into {TABLE} (id) values (%s)", (i,))
                self.acked.append((i, time.monotonic()))
                self.sent.append(sent)
                self.acked_wall.append(time.time())
            except psycopg.Error as e:
                self.errors.append((time.monotonic(), str(e).strip().splitlines()[0] if str(e).strip() else
                                    type(e).__name__))
                if conn is not None:
                    conn.close()
                    conn = None
                time.sleep(self.retry_pause)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def wait_for_commits(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.acked) + n
        while len(self.acked) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer acknowledged {len(self.acked)} commits, wanted {target}")
            time.sleep(0.01)

    def max_gap(self, since: float | None = None) -> float:
        """Longest interval between consecutive acknowledgements (after `since`, monotonic)."""
        times = [t for _, t in self.acked if since is None or t >= since]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def errors_since(self, since: float) -> list[str]:
        return [m for t, m in self.errors if t >= since]

    def lost(self, conn: Any) -> list[int]:
        """Acknowledged ids that the database (the new primary) does not have."""
        ids = [i for i, _ in self.acked]
        if not ids:
            return []
        present = {r[0] for r in conn.execute(f"select id from {TABLE} where id = any(%s)", (ids,)).fetchall()}
        return [i for i in ids if i not in present]
