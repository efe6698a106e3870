"""A backup looks for the primary while it takes its lock and lists the catalog: in a daemon thread, so a
run that fails meanwhile (the lock held elsewhere) neither waits for it nor is held at its exit."""

from __future__ import annotations

import threading

import pytest

from dbops.errors import PostgresError


def test_the_primary_is_looked_for_in_a_thread_that_never_holds_the_exit():
    from dbops.ops.backup.run import in_background

    release = threading.Event()
    found = in_background(lambda x: (release.wait(10), x)[1], "pg1", name="dbops-primary")
    t = [t for t in threading.enumerate() if t.name == "dbops-primary"]
    assert t and t[0].daemon and not found.done()  # a daemon: a run that failed meanwhile exits at once
    release.set()
    assert found.result(10) == "pg1"

    def fails() -> None:
        raise PostgresError("no reachable primary among the configured nodes")

    with pytest.raises(PostgresError, match="no reachable primary"):
        in_background(fails, name="dbops-primary").result(10)
