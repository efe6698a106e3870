"""The container node controller with real podman: a lab's standby moved into a container
(the host's root filesystem as a throwaway overlay, as ENVIRONMENT.md describes), then
operated through the controller: exec while running, a helper container while stopped."""

from __future__ import annotations

import shutil
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
    assert cd.state == "shut down in recovery" and not ctl.is_running()
    # while stopped: a helper container on the same volumes
    assert ctl.controldata().checkpoint_lsn == cd.checkpoint_lsn
    ctl.write_file("dbops-test.txt", "line\n'q' $x\n")
    assert ctl.read_file("dbops-test.txt") == "line\n'q' $x\n"
    ctl.remove_file("dbops-test.txt")
    assert ctl.has_standby_signal()
    ctl.start(timeout=60)
    st = topology.probe(node, info.config.nodes)
    assert st.role == "standby"
