"""Issue #13 item 6: an environment failure during validation is not a bad backup.

While a run proves the previous backup, the environment fails: the container runtime (podman given
a root filesystem that does not exist), or the OOM killer (the throwaway container given a 16 MiB
memory limit: the kernel kills PostgreSQL while it starts, log and all). Each time the run exits 17
and leaves that backup `stored`, not `failed` (no healing full backup either); the next run with a
working environment validates it. One lab for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_runtime_kill import wrapped  # noqa: F401

from dbops.runtime import container

pytestmark = [pytest.mark.integration, pytest.mark.container]


@pytest.fixture(scope="module")
def vlab(lab_factory):
    info = lab_factory.create("validation-env", replicas=0)
    raw = yaml.safe_load(Path(info.config_path).read_text())
    if raw["runtime"]["engine"] == "none":
        pytest.fail("this lab validates without containers; the test needs podman")
    yield info
    lab_factory.destroy(info.dir)


def _backup(cli, cfg_path: str):
    r = cli(["-c", cfg_path, "backup", "--json"])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def _states(cli, cfg_path: str) -> dict[str, str]:
    r = cli(["-c", cfg_path, "backup", "list", "--json"])
    assert r.exit_code == 0, r
    return {row["backup_id"]: row["status"] for row in json.loads(r.stdout)}


def _broken(lab, name: str, **runtime) -> str:
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    raw["runtime"].update(runtime)
    path = Path(lab.dir) / f"dbops-{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _environment_fails_then_recovers(cli, lab, broken: str, cause: str) -> None:
    r1, b1 = _backup(cli, lab.config_path)
    assert r1.exit_code == 0, r1
    before = _states(cli, lab.config_path)
    assert before[b1["backup_id"]] == "stored"

    r2, _ = _backup(cli, broken)
    assert r2.exit_code == 17, r2
    assert "validation could not run" in r2.stderr and "says nothing against the backup" in r2.stderr, r2.stderr
    assert cause in r2.stderr, r2.stderr
    assert _states(cli, lab.config_path) == before  # not failed, no healing full backup, nothing new stored

    r3, b3 = _backup(cli, lab.config_path)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == b1["backup_id"]
    assert _states(cli, lab.config_path)[b1["backup_id"]] == "validated"


def test_a_runtime_failure_during_validation_leaves_the_previous_backup_usable(vlab, cli):
    broken = _broken(vlab, "broken-runtime", rootfs="/dbops-no-such-rootfs")
    _environment_fails_then_recovers(cli, vlab, broken, "container runtime or host failure")


def test_an_oom_kill_during_validation_leaves_the_previous_backup_usable(vlab, cli):
    small = _broken(vlab, "16m", extra_args=["--memory", "16m"])  # podman run ... --memory 16m
    _environment_fails_then_recovers(cli, vlab, small, "signal 9")


def test_an_engine_refusing_to_stop_the_throwaway_is_the_environment_not_the_backup(vlab, cli, wrapped, monkeypatch):
    """podman's `kill` refused (a wrapper first on PATH: exit 125) when the validation stops its
    throwaway server: exit 17 naming the container and what to run by hand, the backup keeps its
    status; with the engine working again the next run validates it."""
    r1, b1 = _backup(cli, vlab.config_path)
    assert r1.exit_code == 0, r1
    before = _states(cli, vlab.config_path)
    monkeypatch.setattr(container, "KILL_GRACE", 3.0)
    (wrapped / "kill-fails").touch()
    r2, _ = _backup(cli, vlab.config_path)
    assert r2.exit_code == 17, r2
    assert "validation could not run" in r2.stderr and "podman kill" in r2.stderr, r2.stderr
    assert "podman rm -f" in r2.stderr and "kill refused by the test's engine wrapper" in r2.stderr, r2.stderr
    assert _states(cli, vlab.config_path) == before
    (wrapped / "kill-fails").unlink()
    r3, b3 = _backup(cli, vlab.config_path)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == b1["backup_id"]
