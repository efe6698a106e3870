"""A throwaway container whose engine will not signal it: stop() fails at once with an error naming the
container and what to run by hand, instead of waiting out its own timeout; the instance is still
removed. The engine is the real podman behind a wrapper first on PATH whose ``kill`` fails (exit 125,
as podman does when the OCI runtime refuses) or hangs while a marker file says so: a real process
returning an error, every other call the real engine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dbops import proc
from dbops.errors import EngineError
from dbops.runtime import InstanceSpec, container, engine_of, open_runtime
from test_runtime import copy_cluster, no_leftovers, own_folder, settings, small_cluster  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.container]

WRAPPER = """#!/bin/sh
# podman, except that `kill` fails or hangs while a marker file says so (tests/integration/test_runtime_kill.py)
if [ "$1" = kill ] && [ -e {dir}/kill-fails ]; then
    echo "Error: OCI runtime error: kill refused by the test's engine wrapper" >&2
    exit 125
fi
if [ "$1" = kill ] && [ -e {dir}/kill-hangs ]; then
    exec sleep 600
fi
exec {real} "$@"
"""
STOP_TIMEOUT = 600.0  # what a stop would wait out; the failure comes long before it


@pytest.fixture(scope="module")
def work(base_dir) -> Path:
    return own_folder(base_dir, "runtime-kill")


@pytest.fixture
def wrapped(tmp_path, monkeypatch) -> Path:
    """A `podman` first on PATH (the wrapper); returns its folder, where the marker files go."""
    real = shutil.which("podman")
    assert real, "podman is not installed"
    d = tmp_path / "engine"
    d.mkdir()
    (d / "podman").write_text(WRAPPER.format(dir=d, real=real))
    os.chmod(d / "podman", 0o755)
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")
    assert shutil.which("podman") == str(d / "podman")
    return d


def _gone(settings, name: str) -> bool:
    res = engine_of(settings["podman"]).run(["ps", "-a", "-q", "--filter", f"name={name}"])
    return res.stdout.strip() == ""


def _failed_stop(inst, marker: Path) -> EngineError:
    """The instance ready, the engine's kill made to fail (``marker``), stop(): its error, raised long
    before the stop's own timeout."""
    inst.wait_ready(60)
    marker.touch()
    t0 = time.monotonic()
    with pytest.raises(EngineError) as ei:
        inst.stop("fast", timeout=STOP_TIMEOUT)
    assert time.monotonic() - t0 < 120  # not the stop's own 600 s
    assert inst.name in ei.value.message and f"podman rm -f {inst.name}" in ei.value.hint
    return ei.value


def test_a_refused_kill_fails_the_stop_at_once_naming_the_container(settings, small_cluster, work, wrapped,
                                                                     monkeypatch):
    monkeypatch.setattr(container, "KILL_GRACE", 3.0)  # the server still up 3 s after the refusal
    data = copy_cluster(small_cluster, work / "refused")
    spec = InstanceSpec(data_dir=data, port=proc.free_port(), name="refused")
    with open_runtime(settings["podman"]).start(spec) as inst:
        e = _failed_stop(inst, wrapped / "kill-fails")
        assert "podman kill" in e.message and "failed" in e.message
        assert "kill refused by the test's engine wrapper" in (e.detail or "")
        assert f"podman kill --signal KILL {inst.name}" in e.hint
        assert inst.is_running()  # the signal never reached it
        # the block ends with kill still refused: remove() goes on to `rm -f`, which stops it
    assert _gone(settings, inst.name) and not (data / "postmaster.pid").exists()


def test_a_hanging_kill_fails_the_stop_after_the_kill_timeout(settings, small_cluster, work, wrapped, monkeypatch):
    monkeypatch.setattr(container, "KILL_TIMEOUT", 3.0)
    data = copy_cluster(small_cluster, work / "hanging")
    spec = InstanceSpec(data_dir=data, port=proc.free_port(), name="hanging")
    with open_runtime(settings["podman"]).start(spec) as inst:
        e = _failed_stop(inst, wrapped / "kill-hangs")
        assert "did not answer within 3 s" in e.message
        (wrapped / "kill-hangs").unlink()  # the engine answers again: the block's end removes it
        assert inst.is_running()
    assert _gone(settings, inst.name)


def test_a_refused_kill_of_a_server_ending_on_its_own_is_a_clean_stop(settings, small_cluster, work, wrapped):
    """The kill refused while the server is already going (stopped meanwhile by the real engine, as by
    an operator): within the grace that is a stop, not an error."""
    data = copy_cluster(small_cluster, work / "ending")
    spec = InstanceSpec(data_dir=data, port=proc.free_port(), name="ending")
    with open_runtime(settings["podman"]).start(spec) as inst:
        inst.wait_ready(60)
        (wrapped / "kill-fails").touch()
        real = shutil.which("podman", path=os.environ["PATH"].split(":", 1)[1])
        stopper = subprocess.Popen([real, "stop", "--time", "60", inst.name], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            inst.stop("fast", timeout=STOP_TIMEOUT)  # no error: the server ended within the grace
        finally:
            stopper.wait(120)
        assert not (data / "postmaster.pid").exists()
        (wrapped / "kill-fails").unlink()
    assert _gone(settings, inst.name)
