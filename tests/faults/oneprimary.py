"""A background watcher for the invariant "at no instant two nodes accept writes".

It polls every node with ``select pg_is_in_recovery()`` over one connection per node, in a loop.
A primary never goes back into recovery within one postmaster's life, so two answers "not in
recovery" from the *same* connection (of node A, at t1 and t3) prove A accepted writes during the
whole of [t1, t3]; node B answering "not in recovery" at t2 inside that window is a proven overlap.
A connection that breaks starts a new window. Polls are a few milliseconds apart, so an overlap
longer than a poll round is caught.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dbops.config import Node


@dataclass
class Window:
    node: str
    first: float
    last: float


@dataclass(eq=False)
class OnePrimaryWatch(threading.Thread):
    nodes: list[Node]
    interval: float = 0.005
    windows: list[Window] = field(default_factory=list)
    samples: int = 0
    _halt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, name="one-primary-watch", daemon=True)

    def run(self) -> None:
        import psycopg

        conns: dict[str, object] = {}
        open_window: dict[str, Window | None] = {n.name: None for n in self.nodes}
        while not self._halt.is_set():
            for n in self.nodes:
                c = conns.get(n.name)
                try:
                    if c is None:
                        c = psycopg.connect(**n.conninfo(None, connect_timeout=1), autocommit=True)
                        conns[n.name] = c
                    writable = not c.execute("select pg_is_in_recovery()").fetchone()[0]
                except psycopg.Error:
                    if c is not None:
                        c.close()
                    conns.pop(n.name, None)
                    open_window[n.name] = None  # a new connection proves nothing about the old window
                    continue
                now = time.monotonic()
                self.samples += 1
                w = open_window[n.name]
                if not writable:
                    open_window[n.name] = None
                elif w is None:
                    w = Window(n.name, now, now)
                    open_window[n.name] = w
                    self.windows.append(w)
                else:
                    w.last = now
            time.sleep(self.interval)
        for c in conns.values():
            c.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def overlaps(self) -> list[tuple[Window, Window]]:
        """Pairs of windows of different nodes that overlap in time (each proves two writers)."""
        out = []
        ws = sorted(self.windows, key=lambda w: w.first)
        for i, a in enumerate(ws):
            for b in ws[i + 1:]:
                if b.node != a.node and a.first <= b.first <= a.last and b.first < a.last:
                    out.append((a, b))
        return out

    def writers_now(self) -> list[str]:
        """Nodes that accept writes now (a fresh connection to each; a loaded machine may need seconds to
        answer, and a node missed here would read as no writer)."""
        import psycopg

        out = []
        for n in self.nodes:
            try:
                with psycopg.connect(**n.conninfo(None, connect_timeout=10), autocommit=True) as c:
                    if not c.execute("select pg_is_in_recovery()").fetchone()[0]:
                        out.append(n.name)
            except psycopg.Error:
                pass
        return out
