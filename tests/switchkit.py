"""What the switchover and failover tests share (tests/integration/test_failover.py, tests/faults/
test_switch_fence.py, test_kill_switchover.py): a lab ready for the writer probe, waiting until the
topology has settled, and the lab as bench/failover_lab.start_pgbouncer sees it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dbops import config as cfgmod
from dbops.config import Config
from dbops.ops import topology
from dbops.pg import conn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from writer_probe import prepare  # noqa: E402

# failover --timeout for the runs whose candidate dies mid-switch: the catch-up wait runs out after it
# (the test's cost), and the old primary's stop and restart must fit in it on a loaded machine.
STEP_TIMEOUT = 15


def writer_lab(lab_factory, name: str, replicas: int):
    """A private lab (until the session ends) with the writer probe's table on its primary."""
    info = lab_factory.create(name, replicas=replicas)
    with conn.session(info.primary) as c:
        prepare(c)
    return info


def settled(cfg: Config | str, standbys: int = 1, timeout: float = 60.0) -> topology.Topology:
    """Wait until there is one primary and `standbys` other nodes streaming from it (after a test
    broke or moved things); the configuration as an object or a file's path (read afresh each time)."""
    deadline = time.monotonic() + timeout
    while True:
        topo = topology.discover(cfgmod.load(cfg) if isinstance(cfg, str) else cfg)
        p = topo.primary
        if p and len(topo.standbys) == standbys and all(s.streaming and s.upstream == p.name for s in topo.standbys):
            return topo
        assert time.monotonic() < deadline, f"lab not settled within {timeout:.0f} s: {topo.as_dict()}"
        time.sleep(0.2)


class PrimaryView:
    """The lab as bench/failover_lab.start_pgbouncer sees it, with the current primary."""

    def __init__(self, lab, primary):
        self.dir, self.primary = lab.dir, primary
