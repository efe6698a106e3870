"""Issue #13, the kill -9 part of the fault suite, for the switchover: `dbops failover` is killed with
SIGKILL right after each phase of the switch (found by its own log line), in a loop over the phases.

While it runs and after, a watcher polls both nodes (``pg_is_in_recovery()``) and a writer commits
through a read-write multi-host string. After each kill the documented recovery (docs/bad-days.md,
"dbops was killed during a switchover") is applied, then the invariants are asserted:

* at no instant did two nodes accept writes;
* afterwards exactly one node accepts writes and the other streams from it;
* no acknowledged commit is lost;
* the next `dbops failover` (the following normal run) takes over the dead run's lock and works,
  and the candidate's temporary tuning left by a killed run is put back;
* PgBouncer (a real one in front of the lab, named in failover.pgbouncer) is not left paused: a kill
  between PAUSE and RESUME leaves the pause record, and `dbops check` (after every other kill) or the
  next `dbops failover` (the others) repoints it at the writer and resumes it.
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
from dbops.ops.failover.pgbouncer import PgBouncer
from dbops.ops.failover.poolerpause import read_record
from dbops.pg import conn
from dbops.storage import open_store
from dbops.storage.layout import Layout

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import failover_lab  # noqa: E402
from killrun import run_killed  # noqa: E402
from oneprimary import OnePrimaryWatch  # noqa: E402
from switchkit import settled, writer_lab  # noqa: E402
from writer_probe import Writer, multi_host  # noqa: E402

pytestmark = pytest.mark.integration

LEFT_PAUSED = "left paused by an interrupted switchover"

# Killed right after these phases end: before the stop, stopped but not fenced, fenced but not
# promoted, promotion requested, promoted but not settled, settled but the old primary not rejoined.
KILL_AFTER = ["tune candidate", "checkpoint old primary", "stop old primary", "fence old primary",
              "candidate caught up", "promote", "new primary: slots, checkpoint", "rejoin old primary"]


@pytest.fixture(scope="module")
def klab(lab_factory):
    return writer_lab(lab_factory, "faults-kill", replicas=1)


@pytest.fixture(scope="module")
def bouncer(klab):
    """A real PgBouncer in front of the lab, named in failover.pgbouncer (dbops pauses and repoints it)."""
    b = failover_lab.start_pgbouncer(Path(klab.dir) / "pgbouncer", klab)
    yield b
    b.stop()


def pooler_serves_writes(bouncer, timeout: float = 60.0) -> bool:
    """A query through PgBouncer reaches a writable node (a paused pooler holds it until the timeout; a
    loaded machine may need many seconds to connect)."""
    import threading

    import psycopg

    answer: list[bool] = []

    def ask() -> None:
        try:
            with psycopg.connect(bouncer.conninfo(), autocommit=True) as c:
                answer.append(bool(c.execute("select not pg_is_in_recovery()").fetchone()[0]))
        except psycopg.Error:
            answer.append(False)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout)
    return answer == [True]


def _failover(dbops_bin: str, cfg_path: str, lock_dir: Path, kill_after: str | None) -> tuple[int, str, str]:
    """Run `dbops failover`; SIGKILL it as soon as it logs the end of phase `kill_after`."""
    k = run_killed(dbops_bin, {**os.environ, "DBOPS_LOCK_DIR": str(lock_dir)},
                   ["-c", cfg_path, "failover", "--yes", "--json", "--timeout", "120"],
                   None if kill_after is None else f"phase {kill_after}", exact=True, timeout=120)
    return k.returncode, k.stdout, k.stderr


def recover(cfg) -> str:
    """The documented recovery after dbops was killed during a switchover; returns the primary."""
    topo = topology.discover(cfg)
    writers = [s for s in topo.nodes if s.role == "primary"]
    assert len(writers) <= 1, topo.as_dict()
    for n in cfg.nodes:
        ctl = open_controller(n)
        deadline = time.monotonic() + 120  # a killed run's helpers (a stop in progress) finish on their own
        while ctl.is_running() and not topology.probe(n, cfg.nodes).reachable:
            assert time.monotonic() < deadline, f"{n.name} neither stopped nor reachable within 120 s"
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


def test_kill_9_at_every_phase_of_a_switchover_leaves_at_most_one_writer(klab, bouncer, dbops_bin, tmp_path):
    cfg_path = failover_lab.failover_config(klab, bouncer, name="dbops-kill-bouncer.yaml")
    cfg = cfgmod.load(cfg_path)
    pooler = PgBouncer(cfg.failover.pgbouncer)
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    settled(cfg)
    watch = OnePrimaryWatch(list(cfg.nodes))
    writer = Writer(multi_host(list(cfg.nodes), passfile=str(Path(klab.dir) / "pgpass")),
                    start_id=int(time.time() * 1000) * 1000)
    watch.start()
    writer.start()
    results = {}
    resume_due = None  # a kill left PgBouncer paused; the next `dbops failover` must resume it
    try:
        writer.wait_for_commits(20)
        for i, phase in enumerate(KILL_AFTER):
            before = settled(cfg).primary.name
            code, out, err = _failover(dbops_bin, cfg_path, tmp_path, phase)
            assert code == -signal.SIGKILL, (phase, code, err[-3000:])
            if resume_due:
                assert LEFT_PAUSED in err, (resume_due, err[-3000:])
                resume_due = None
            primary = recover(cfg)
            topo = settled(cfg, timeout=90)
            assert topo.primary.name == primary
            results[phase] = ("switched" if primary != before else "not switched")
            if pooler.paused_databases():  # dbops paused it and died: its record says so
                assert read_record(store, layout) is not None, phase
                if i % 2 == 0:  # the following normal run: `dbops check` resumes it
                    r = subprocess.run([dbops_bin, "-c", cfg_path, "check", "--skip-runtime"], capture_output=True,
                                       text=True, timeout=120, env={**os.environ, "DBOPS_LOCK_DIR": str(tmp_path)})
                    assert LEFT_PAUSED in r.stdout, (phase, r.stdout, r.stderr[-2000:])
                    assert pooler.paused_databases() == [] and pooler_serves_writes(bouncer), phase
                    results[phase] += "; PgBouncer left paused, resumed by dbops check"
                else:  # or the next `dbops failover`, first thing
                    resume_due = phase
                    results[phase] += "; PgBouncer left paused, resumed by the next dbops failover"
            writer.wait_for_commits(20)
            assert watch.overlaps() == [], (phase, watch.overlaps())
        # the following normal run: takes over the dead run's lock, switches, verifies
        before = settled(cfg).primary.name
        code, out, err = _failover(dbops_bin, cfg_path, tmp_path, None)
        assert code == 0, err[-3000:]
        assert json.loads(out)["report"]["new_primary"] != before
        if resume_due:
            assert LEFT_PAUSED in err, (resume_due, err[-3000:])
        writer.wait_for_commits(20)
    finally:
        writer.stop()
        watch.stop()
    assert watch.overlaps() == [], watch.overlaps()
    assert watch.writers_now() == [settled(cfg).primary.name]
    assert pooler.paused_databases() == [] and read_record(store, layout) is None
    assert pooler_serves_writes(bouncer)  # not paused, and pointed at the primary
    with conn.session(settled(cfg).primary.node) as c:
        assert writer.lost(c) == []
        # no tuning left behind by the killed runs on any node
        for n in cfg.nodes:
            with conn.session(n) as cn:
                assert cn.execute("show wal_retrieve_retry_interval").fetchone()[0] == "5s", n.name
                assert cn.execute("show restore_command").fetchone()[0] != "", n.name
    print("kill -9 results:", results)
