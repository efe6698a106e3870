"""Issue #13 items 2, 7 and 8 on a real lab (primary + one streaming replica, WAL archived to S3).

* the old primary is fenced before the candidate is promoted: started by hand while a post-hook
  runs, it comes up in recovery, and at no instant do two nodes accept writes;
* a rollback restarts the old primary only once the candidate is confirmed to be in recovery,
  and undoes the fence;
* SIGHUP unwinds a switchover like SIGTERM; a failing PgBouncer RESUME keeps the exit code (12).
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
from dbops import proc
from dbops.errors import PostgresError, RolledBackError, UnknownOutcomeError
from dbops.nodes import open_controller
from dbops.ops.failover import plan as failover_plan
from dbops.ops.failover import switchover
from dbops.pg import binaries, conn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import failover_lab  # noqa: E402
from oneprimary import OnePrimaryWatch  # noqa: E402
from switchkit import STEP_TIMEOUT, PrimaryView, settled, writer_lab  # noqa: E402


def restart(node) -> None:
    """The node this test stopped, started again for the next test (a slow machine's stop that is
    still finishing is waited for, not raced; a start that fails says why, with its log's end)."""
    ctl = open_controller(node)
    deadline = time.monotonic() + 60
    while ctl.is_running() and time.monotonic() < deadline:  # a stop that timed out may still be ending
        time.sleep(0.2)
    if ctl.is_running():  # it never went down: it is up for the next test
        return
    try:
        ctl.start(timeout=120)
    except PostgresError as e:
        log = Path(ctl.log_file())
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"{e.message}\n{e.detail}\n--- {log}:\n{tail}") from None


pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("private_lock_dir")]


@pytest.fixture(scope="module")
def slab(lab_factory):
    return writer_lab(lab_factory, "faults-fence", replicas=1)


def hand_start(node) -> None:
    """What an operator (or an enabled systemd unit) does: pg_ctl start on the data folder."""
    r = proc.run([binaries.binary("pg_ctl"), "-D", node.data_dir, "-w", "-t", "60", "-l",
                  str(Path(node.data_dir) / "hand-start.log"), "start"], user="postgres", timeout=90, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_old_primary_started_by_hand_during_the_post_hook_comes_up_as_a_standby(slab, dbops_bin, tmp_path):
    inside, go = tmp_path / "in-hook", tmp_path / "go"
    hook = f"sh -c 'touch {inside}; i=0; while [ ! -f {go} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done'"
    cfg_path = failover_lab.failover_config(slab, extra={"post_hooks": [hook]}, name="dbops-fence.yaml")
    start = settled(cfg_path)
    old = start.primary.node
    watch = OnePrimaryWatch(list(cfgmod.load(cfg_path).nodes))
    watch.start()
    run = subprocess.Popen([dbops_bin, "-c", cfg_path, "failover", "--yes", "--json", "--timeout", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "DBOPS_LOCK_DIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 120
        while not inside.exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "post-hook never ran"
            time.sleep(0.05)
        assert open_controller(old).has_standby_signal()
        hand_start(old)
        with conn.session(old) as c:
            assert c.execute("select pg_is_in_recovery()").fetchone()[0] is True
        go.touch()
        out, err = run.communicate(timeout=180)
    finally:
        go.touch()
        if run.poll() is None:
            run.kill()
        watch.stop()
    assert run.returncode == 0, err
    report = json.loads(out)["report"]
    names = [p["name"] for p in report["phases"]]
    assert names.index("stop old primary") < names.index("fence old primary") < names.index("promote")
    assert watch.samples > 100 and watch.overlaps() == [], watch.overlaps()
    topo = settled(cfg_path)
    assert topo.primary.name == report["new_primary"] != old.name


def test_a_start_racing_the_fence_rolls_back(slab, tmp_path):
    """The old primary started by someone between its stop and the fence: no promotion, rolled back."""
    cfg = cfgmod.load(slab.config_path)
    start = settled(slab.config_path)
    old = start.primary.node
    opts = failover_plan.Options.from_config(cfg, timeout=20)
    plan = failover_plan.make_plan(cfg, opts)
    assert plan.ok, plan.findings

    def start_behind_our_back(phase: str, when: str) -> None:
        if phase == "stop old primary" and when == "end":
            ctl = open_controller(old)
            ctl.stop("fast", timeout=30)  # the fenced postmaster finishes exiting
            hand_start(old)

    watch = OnePrimaryWatch(list(cfg.nodes))
    watch.start()
    try:
        with pytest.raises(RolledBackError) as ei:
            switchover.execute(cfg, plan, opts, observer=start_behind_our_back)
    finally:
        watch.stop()
    assert "started again by someone else" in ei.value.message
    assert watch.overlaps() == []
    ctl = open_controller(old)
    assert not ctl.has_standby_signal()
    with conn.session(old) as c:
        assert c.execute("select pg_is_in_recovery()").fetchone()[0] is False
        assert c.execute("select current_setting('primary_conninfo')").fetchone()[0] == ""
    assert settled(slab.config_path).primary.name == old.name


def test_rollback_refuses_to_restart_the_old_primary_once_the_candidate_is_promoted(slab, tmp_path):
    cfg = cfgmod.load(slab.config_path)
    start = settled(slab.config_path)
    old, cand = start.primary.node, start.standbys[0].node
    opts = failover_plan.Options.from_config(cfg, timeout=STEP_TIMEOUT)
    plan = failover_plan.make_plan(cfg, opts)
    assert plan.ok, plan.findings

    def promote_behind_our_back(phase: str, when: str) -> None:
        # someone promotes the candidate and stops it: the gate cannot see it, the rollback must not
        # start the old primary (the candidate would come back as a second primary)
        if phase == "candidate caught up" and when == "start":
            with conn.session(cand) as c:
                c.execute("select pg_promote(true)")
            open_controller(cand).stop("fast", timeout=30)

    try:
        with pytest.raises(UnknownOutcomeError) as ei:
            switchover.execute(cfg, plan, opts, observer=promote_behind_our_back)
        assert ei.value.exit_code == 8
        assert "rollback refused" in ei.value.message, ei.value.message
        assert "no standby.signal" in (ei.value.detail or ""), ei.value.detail
        assert not open_controller(old).is_running()  # not started: two primaries are worse than none
        assert open_controller(old).has_standby_signal()  # and still fenced
        assert ei.value.report.phases[-1].name == "rollback" and not ei.value.report.phases[-1].ok
    finally:
        restart(cand)
        _rebuild_as_standby(slab, old, cand)


def _rebuild_as_standby(slab, old, new) -> None:
    """Put the lab back together: `old` follows `new` (pg_rewind when needed)."""
    from dbops.ops.failover import replication as repl

    ctl = open_controller(old)
    with conn.session(new) as c:
        c.execute("checkpoint")
        tli = int(c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
        history = repl.read_history(c, tli)
        repl.ensure_slot(c, repl.slot_name_for(old.name))
    repl.rejoin(ctl, new, conninfo_template=None, slot=repl.slot_name_for(old.name), history=history,
                new_timeline=tli, timeout=60)
    settled(slab.config_path, timeout=90)


def test_sighup_cancels_like_sigterm(slab, dbops_bin, tmp_path):
    inside = tmp_path / "in-pre-hook"
    cfg_path = failover_lab.failover_config(slab, extra={"pre_hooks": [f"sh -c 'touch {inside}; sleep 30'"]},
                                            name="dbops-sighup.yaml")
    before = settled(cfg_path).primary.name
    run = subprocess.Popen([dbops_bin, "-c", cfg_path, "failover", "--yes"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "DBOPS_LOCK_DIR": str(tmp_path)})
    deadline = time.monotonic() + 60
    while not inside.exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    run.send_signal(signal.SIGHUP)
    time.sleep(0.02)
    run.send_signal(signal.SIGTERM)  # a second signal while unwinding is ignored
    out, err = run.communicate(timeout=60)
    assert run.returncode == 14, (run.returncode, err)
    assert "SIGHUP received" in err and "SIGTERM ignored" in err, err
    assert settled(cfg_path).primary.name == before


def test_failing_pgbouncer_resume_keeps_the_rollback_exit_code(slab, tmp_path):
    start = settled(slab.config_path)
    cand = start.standbys[0].node
    bouncer = failover_lab.start_pgbouncer(Path(slab.dir) / "pgbouncer", PrimaryView(slab, start.primary.node))
    try:
        cfg_path = failover_lab.failover_config(slab, bouncer, name="dbops-bouncer-dies.yaml")
        cfg = cfgmod.load(cfg_path)
        opts = failover_plan.Options.from_config(cfg, timeout=STEP_TIMEOUT)
        plan = failover_plan.make_plan(cfg, opts)
        assert plan.ok, plan.findings

        def kill_candidate_and_pooler(phase: str, when: str) -> None:
            if phase == "stop old primary" and when == "start":
                os.kill(bouncer.pid, signal.SIGKILL)
                open_controller(cand).stop("immediate", timeout=30)

        with pytest.raises(RolledBackError) as ei:
            switchover.execute(cfg, plan, opts, observer=kill_candidate_and_pooler)
        assert ei.value.exit_code == 12
        assert "PgBouncer RESUME failed" in (ei.value.detail or ""), ei.value.detail
        assert "RESUME" in (ei.value.hint or "")
    finally:
        bouncer.stop()
        restart(cand)
    assert settled(slab.config_path).primary.name == start.primary.name
