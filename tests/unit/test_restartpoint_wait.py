"""The CHECKPOINT run beside the checks: the wait for it after the checks is bounded, so a restart
point stalled on a slow scratch disk leaves the run free to go on to the stop (which waits for it
itself) and to remove the throwaway, instead of hanging before them."""

from __future__ import annotations

import threading

from dbops.errors import PostgresError
from dbops.ops.backup.replay import restartpoint_beside


class StalledInstance:
    """A throwaway whose CHECKPOINT does not come back until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.asked = threading.Event()

    def node(self):
        self.asked.set()
        self.release.wait(30)
        raise PostgresError("the throwaway went away")


def test_a_stalled_restart_point_does_not_hold_the_run():
    inst = StalledInstance()
    with restartpoint_beside(inst, 0.2):
        assert inst.asked.wait(10)
    # the block ended and the wait gave up while the CHECKPOINT still runs
    alive = [t for t in threading.enumerate() if t.name == "dbops-restartpoint"]
    assert alive and alive[0].is_alive()
    inst.release.set()
    alive[0].join(10)
    assert not alive[0].is_alive()


def test_a_failed_restart_point_is_only_logged():
    inst = StalledInstance()
    inst.release.set()
    with restartpoint_beside(inst, 10):
        pass
    assert inst.asked.is_set()
    assert not [t for t in threading.enumerate() if t.name == "dbops-restartpoint"]
