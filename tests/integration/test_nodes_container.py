"""The container node controller with real podman: a lab's standby moved into a container
(the host's root filesystem as a throwaway overlay, as ENVIRONMENT.md describes), then
operated through the controller: exec while running, a helper container while stopped."""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import replace

import pytest

from dbops import proc
from dbops.config import ContainerNodeSettings
from dbops.nodes import open_controller
from dbops.nodes.container import ContainerController
from dbops.ops import topology
from dbops.pg import binaries

pytestmark = [pytest.mark.integration, pytest.mark.container]


@pytest.fixture(scope="module")
def podman_standby(lab_factory):
    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    info = lab_factory.create("container", replicas=1)
    conf = str(info.dir / "containers.conf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTAINERS_CONF", conf)
        node = info.replicas[0]
        open_controller(node).stop("fast")
        name = f"dbops-test-{uuid.uuid4().hex[:8]}"
        d = node.data_dir
        proc.run(["podman", "run", "-d", "--name", name, "--user", "postgres", "--network", "host",
                  "-v", f"{info.dir}:{info.dir}", "--rootfs", "/:O", binaries.binary("postgres"), "-D", d],
                 timeout=120)
        cnode = replace(node, controller="container", container=ContainerNodeSettings(engine="podman", name=name))
        try:
            yield cnode, info
        finally:  # a clean stop first, so no postmaster.pid (naming the container's PID 1) stays behind
            ContainerController(cnode).stop("fast", timeout=60)
            proc.run(["podman", "rm", "-f", "-t", "5", name], timeout=120, check=False)


def test_container_controller_operations(podman_standby):
    node, info = podman_standby
    ctl = open_controller(node)
    assert isinstance(ctl, ContainerController)
    ctl.start(timeout=60)  # already running: waits until it accepts connections
    assert ctl.status().running
    assert ctl.controldata().state == "in archive recovery"
    res = ctl.run(["sh", "-c", 'printf %s "$DBOPS_TEST_VALUE"'], env={"DBOPS_TEST_VALUE": "from the environment"})
    assert res.stdout == "from the environment"
    cd = ctl.fence("fast", timeout=60)
    if cd.state != "shut down in recovery":  # say why: the server's own log is in the container's
        logs = proc.run(["podman", "logs", "--tail", "40", node.container.name], timeout=60, check=False)
        pytest.fail(f"fence left {cd.state!r}; the server's last lines:\n{logs.stdout}{logs.stderr}")
    assert not ctl.is_running()
    # while stopped: a helper container on the same volumes
    assert ctl.controldata().checkpoint_lsn == cd.checkpoint_lsn
    ctl.write_file("dbops-test.txt", "line\n'q' $x\n")
    assert ctl.read_file("dbops-test.txt") == "line\n'q' $x\n"
    ctl.remove_file("dbops-test.txt")
    assert ctl.has_standby_signal()
    ctl.start(timeout=60)
    st = topology.probe(node, info.config.nodes)
    assert st.role == "standby"


def test_a_diverged_old_primary_in_a_container_is_rewound_and_follows(make_lab, monkeypatch):
    """The rejoin of a failover that needs pg_rewind, with the old primary in a podman container:
    pg_rewind runs in a helper container that must reach the new primary (and the archive, for
    --restore-target-wal). With `--network none` it could not connect at all."""
    from dbops.ops.failover import replication as repl
    from dbops.pg import conn

    if not shutil.which("podman"):
        pytest.skip("podman is not installed")
    info = make_lab(replicas=1)
    monkeypatch.setenv("CONTAINERS_CONF", str(info.dir / "containers.conf"))
    old, new = info.primary, info.replicas[0]
    open_controller(old).stop("fast")
    name = f"dbops-test-{uuid.uuid4().hex[:8]}"
    proc.run(["podman", "run", "-d", "--name", name, "--user", "postgres", "--network", "host",
              "-v", f"{info.dir}:{info.dir}", "--rootfs", "/:O", binaries.binary("postgres"), "-D", old.data_dir],
             timeout=120)
    cold = replace(old, controller="container", container=ContainerNodeSettings(engine="podman", name=name))
    ctl = ContainerController(cold)
    try:
        ctl.start(timeout=60)
        # Split brain on purpose: the replica is promoted while the old primary keeps writing.
        with conn.session(new) as c:
            c.execute("select pg_promote(true)")
            c.execute("checkpoint")
            tli = int(c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
            history = repl.read_history(c, tli)
        with conn.session(cold) as c:
            c.execute("create table diverged as select g from generate_series(1, 1000) g")
            c.execute("checkpoint")
        decision = repl.rejoin(ctl, new, conninfo_template=None, slot=None, history=history, new_timeline=tli,
                               timeout=60)
        assert decision.needed, decision
        deadline = time.monotonic() + 30
        while True:
            st = topology.probe(cold, info.config.nodes)
            if st.streaming and st.upstream == new.name and st.timeline == tli:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        with conn.session(cold) as c:
            assert c.execute("select to_regclass('diverged')").fetchone()[0] is None
    finally:
        ctl.stop("fast", timeout=60)
        proc.run(["podman", "rm", "-f", "-t", "5", name], timeout=120, check=False)
