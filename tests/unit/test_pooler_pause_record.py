"""The PgBouncer pause record (issue 13): stored before PAUSE, deleted only once the pooler is resumed,
so a switchover killed with SIGKILL in between leaves it for the next failover or check."""

from __future__ import annotations

import pytest

from dbops.config import PgBouncerSettings
from dbops.errors import PostgresError
from dbops.ops.failover import poolerpause as pp
from dbops.ops.failover.pgbouncer import paused
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

L = Layout("p")


class _Node:
    def __init__(self, name: str) -> None:
        self.name = name


class _Pooler:
    """Stands in for PgBouncer's admin console: records PAUSE/RESUME, can fail RESUME."""

    def __init__(self, resume_fails: bool = False) -> None:
        self.settings = PgBouncerSettings()
        self.paused = False
        self.calls: list[str] = []
        self.resume_fails = resume_fails

    def pause(self, timeout: float) -> None:
        self.paused = True
        self.calls.append("PAUSE")

    def resume(self) -> None:
        self.calls.append("RESUME")
        if self.resume_fails:
            raise PostgresError("PgBouncer RESUME failed: clients stay paused")
        self.paused = False


def _record(store, pooler) -> pp.PauseRecord:
    return pp.PauseRecord(store, L, pooler, _Node("pg1"), _Node("pg2"))


def test_the_record_lives_from_before_pause_until_resume(tmp_path):
    store, pooler = LocalStore(tmp_path), _Pooler()
    rec = _record(store, pooler)
    rec.mark()
    with paused(pooler, 5, on_resumed=rec.clear):
        assert pp.read_record(store, L)["old_primary"] == "pg1"  # what a kill -9 here leaves
    assert pooler.calls == ["PAUSE", "RESUME"] and pp.read_record(store, L) is None


def test_an_error_inside_still_resumes_and_deletes_the_record(tmp_path):
    store, pooler = LocalStore(tmp_path), _Pooler()
    rec = _record(store, pooler)
    rec.mark()
    with pytest.raises(RuntimeError), paused(pooler, 5, on_resumed=rec.clear):
        raise RuntimeError("rolled back")
    assert pooler.calls == ["PAUSE", "RESUME"] and pp.read_record(store, L) is None


def test_a_failed_resume_keeps_the_record_for_the_next_run(tmp_path):
    store, pooler = LocalStore(tmp_path), _Pooler(resume_fails=True)
    rec = _record(store, pooler)
    rec.mark()
    with pytest.raises(RuntimeError), paused(pooler, 5, on_resumed=rec.clear):
        raise RuntimeError("rolled back")
    assert pp.read_record(store, L) is not None  # still paused: the next failover or check resumes it
