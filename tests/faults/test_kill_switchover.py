"""Issue #13, the kill -9 part of the fault suite, for the switchover: `dbops failover` is killed with
SIGKILL right after each phase of the switch (found by its own log line), in a loop over the phases.

While it runs and after, a watcher polls both nodes (``pg_is_in_recovery()``) and a writer commits
through a read-write multi-host string. After each kill the documented recovery (docs/bad-days.md,
"dbops was killed during a switchover") is applied, then the invariants are asserted:

* at no instant did two nodes accept writes;
* afterwards exactly one node accepts writes and the other streams from it;
* no acknowledged commit is lost;
* the next `dbops failover` (the following normal run) takes over the dead run's lock and works,
  and the candidate's temporary tuning left by a killed run is put back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbops import config as cfgmod
from dbops.nodes import open_controller
from dbops.ops import topology
from dbops.pg import conn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from oneprimary import OnePrimaryWatch  # noqa: E402
from writer_probe import Writer, multi_host, prepare  # noqa: E402

pytestmark = pytest.mark.integration

# Killed right after these phases end: before the stop, stopped but not fenced, fenced but not
# promoted, promotion requested, promoted but not settled, settled but the old primary not rejoined.
KILL_AFTER = ["tune candidate", "checkpoint old primary", "stop old primary", "fence old primary",
              "candidate caught up", "promote", "new primary: slots, checkpoint", "rejoin old primary"]


@pytest.fixture(scope="module")
def klab(lab_factory):
    info = lab_factory.create("faults-kill", replicas=1)
    with conn.session(info.primary) as c:
        prepare(c)
    return info


def _settled(cfg, timeout: float = 60.0) -> topology.Topology:
    deadline = time.monotonic() + timeout
    while True:
        topo = topology.discover(cfg)
        p = topo.primary
        if p and len(topo.standbys) == 1 and all(s.streaming and s.upstream == p.name for s in topo.standbys):
            return topo
        assert time.monotonic() < deadline, f"not settled: {topo.as_dict()}"
        time.sleep(0.2)


def _failover(dbops_bin: str, cfg_path: str, lock_dir: Path, kill_after: str | None) -> tuple[int, str, str]:
    """Run `dbops failover`; SIGKILL it as soon as it logs the end of phase `kill_after`."""
    p = subprocess.Popen([dbops_bin, "-c", cfg_path, "--log-format", "json", "-v", "failover", "--yes", "--json",
                          "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "DBOPS_LOCK_DIR": str(lock_dir)})
    seen = []
    assert p.stderr is not None
    for line in p.stderr:
        seen.append(line)
        try:
            msg = json.loads(line).get("msg", "")
        except ValueError:
            continue
        if kill_after is not None and msg == f"phase {kill_after}":
            p.send_signal(signal.SIGKILL)
            break
    out, rest = p.communicate(timeout=120)
    return p.returncode, out, "".join(seen) + rest


def recover(cfg) -> str:
    """The documented recovery after dbops was killed during a switchover; returns the primary."""
    topo = topology.discover(cfg)
    writers = [s for s in topo.nodes if s.role == "primary"]
    assert len(writers) <= 1, topo.as_dict()
    for n in cfg.nodes:
        ctl = open_controller(n)
        deadline = time.monotonic() + 30  # a killed run's helpers (a stop in progress) finish on their own
        while ctl.is_running() and not topology.probe(n, cfg.nodes).reachable and time.monotonic() < deadline:
            time.sleep(0.2)
    topo = topology.discover(cfg)
    writers = [s.name for s in topo.nodes if s.role == "primary"]
    stopped = [n for n in cfg.nodes if not open_controller(n).is_running()]
    if writers:  # promoted: the stopped old primary carries dbops' fence and comes up as its standby
        for n in stopped:
            assert open_controller(n).has_standby_signal(), f"{n.name} is not fenced"
            open_controller(n).start(timeout=60)
        return writers[0]
    # not promoted: the old primary (stopped) holds every commit; lift the fence and start it
    assert len(stopped) == 1, [n.name for n in stopped]
    old = stopped[0]
    open_controller(old).remove_standby_signal()
    open_controller(old).start(timeout=60)
    return old.name


def test_kill_9_at_every_phase_of_a_switchover_leaves_at_most_one_writer(klab, dbops_bin, tmp_path):
    cfg_path = klab.config_path
    cfg = cfgmod.load(cfg_path)
    _settled(cfg)
    watch = OnePrimaryWatch(list(cfg.nodes))
    writer = Writer(multi_host(list(cfg.nodes), passfile=str(Path(klab.dir) / "pgpass")),
                    start_id=int(time.time() * 1000) * 1000)
    watch.start()
    writer.start()
    results = {}
    try:
        writer.wait_for_commits(20)
        for phase in KILL_AFTER:
            before = _settled(cfg).primary.name
            code, out, err = _failover(dbops_bin, cfg_path, tmp_path, phase)
            assert code == -signal.SIGKILL, (phase, code, err[-3000:])
            primary = recover(cfg)
            topo = _settled(cfg, timeout=90)
            assert topo.primary.name == primary
            results[phase] = ("switched" if primary != before else "not switched")
            writer.wait_for_commits(20)
            assert watch.overlaps() == [], (phase, watch.overlaps())
        # the following normal run: takes over the dead run's lock, switches, verifies
        before = _settled(cfg).primary.name
        code, out, err = _failover(dbops_bin, cfg_path, tmp_path, None)
        assert code == 0, err[-3000:]
        assert json.loads(out)["report"]["new_primary"] != before
        writer.wait_for_commits(20)
    finally:
        writer.stop()
        watch.stop()
    assert watch.overlaps() == [], watch.overlaps()
    assert watch.writers_now() == [_settled(cfg).primary.name]
    with conn.session(_settled(cfg).primary.node) as c:
        assert writer.lost(c) == []
        # no tuning left behind by the killed runs on any node
        for n in cfg.nodes:
            with conn.session(n) as cn:
                assert cn.execute("show wal_retrieve_retry_interval").fetchone()[0] == "5s", n.name
                assert cn.execute("show restore_command").fetchone()[0] != "", n.name
    print("kill -9 results:", results)
