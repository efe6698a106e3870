"""The ssh node controller against a real OpenSSH server on loopback (started here, on a free port,
with generated keys), operating a real lab's PostgreSQL nodes; then a switchover and a failback
with both nodes driven over ssh."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml

from dbops import config as cfgmod
from dbops import proc
from dbops.nodes import open_controller
from dbops.nodes.ssh import SshController
from dbops.ops import topology
from dbops.ops.failover import switchover as failover
from dbops.ops.failover import plan as failover_plan

pytestmark = pytest.mark.integration

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(lab_factory):
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed (scripts/install-deps.sh installs it)")
    info = lab_factory.create("ssh", replicas=1)
    d = Path(info.dir) / "sshd"
    d.mkdir(exist_ok=True)
    for name in ("host_key", "client_key"):
        if not (d / name).exists():
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], timeout=30)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    port = _free_port()
    # UsePAM yes: the postgres account has a locked password, which sshd alone treats as "account locked".
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM yes\nAllowUsers postgres\nPidFile {d / 'sshd.pid'}\n")
    with open(d / "sshd.log", "ab") as logf:
        p = proc.spawn([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=logf)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    ssh = {"host": "127.0.0.1", "port": port, "user": "postgres", "identity_file": str(d / "client_key"),
           "options": ["StrictHostKeyChecking=no", f"UserKnownHostsFile={d / 'known_hosts'}", "LogLevel=ERROR"]}
    raw = yaml.safe_load(Path(info.config_path).read_text())
    for n in raw["nodes"]:
        n["controller"] = "ssh"
        n["ssh"] = ssh
    cfg_path = Path(info.dir) / "dbops-ssh.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = cfgmod.load(str(cfg_path))
    yield cfg
    for n in cfg.nodes:
        SshController(n).close()
    proc.stop(p)


def test_controller_operations_over_ssh(sshd):
    cfg = sshd
    standby = topology.discover(cfg).standbys[0].node
    ctl = open_controller(standby)
    assert isinstance(ctl, SshController)
    assert ctl.status().running
    cd = ctl.controldata()
    assert cd.state == "in archive recovery" and cd.data_checksums
    # environment values reach the remote program through stdin, files round-trip byte for byte
    res = ctl.run(["sh", "-c", 'printf %s "$DBOPS_TEST_VALUE"'], env={"DBOPS_TEST_VALUE": "it's a $value"})
    assert res.stdout == "it's a $value"
    ctl.write_file("dbops-ssh-test.txt", "line 1\n'quoted' $x\n")
    assert ctl.read_file("dbops-ssh-test.txt") == "line 1\n'quoted' $x\n"
    ctl.remove_file("dbops-ssh-test.txt")
    assert ctl.read_file("dbops-ssh-test.txt") is None
    assert ctl.has_standby_signal()
    ctl.stop("fast")
    assert not ctl.is_running()
    assert ctl.controldata().state == "shut down in recovery"
    ctl.start(timeout=60)
    assert ctl.is_running()


def test_switchover_and_failback_over_ssh(sshd, monkeypatch, tmp_path):
    monkeypatch.setenv("DBOPS_LOCK_DIR", str(tmp_path))
    cfg = sshd
    first = topology.discover(cfg).primary.name
    for to in (None, first):
        deadline = time.monotonic() + 30
        while not all(s.streaming for s in topology.discover(cfg).standbys):
            assert time.monotonic() < deadline, "standby not streaming"
            time.sleep(0.2)
        opts = failover_plan.Options.from_config(cfg, to=to, timeout=30)
        plan = failover_plan.make_plan(cfg, opts)
        assert plan.ok, plan.findings
        report = failover.execute(cfg, plan, opts)
        assert report.outcome == "succeeded", report
        assert report.write_unavailable_seconds < 5
    assert topology.discover(cfg).primary.name == first
