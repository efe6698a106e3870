"""Issue #13 item 6: an environment failure during validation is not a bad backup.

The container runtime failing (here: podman given a root filesystem that does not exist) while a
run proves the previous backup exits 17 and leaves that backup `stored`, not `failed`; the next
run with a working runtime validates it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.container]


def _backup(cli, cfg_path: str):
    r = cli(["-c", cfg_path, "backup", "--json"])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def _states(cli, cfg_path: str) -> dict[str, str]:
    r = cli(["-c", cfg_path, "backup", "list", "--json"])
    assert r.exit_code == 0, r
    return {row["backup_id"]: row["status"] for row in json.loads(r.stdout)}


def test_a_runtime_failure_during_validation_leaves_the_previous_backup_usable(make_lab, cli):
    lab = make_lab(replicas=0)
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    if raw["runtime"]["engine"] == "none":
        pytest.fail("this lab validates without containers; the test needs podman")
    r1, b1 = _backup(cli, lab.config_path)
    assert r1.exit_code == 0, r1
    raw["runtime"]["rootfs"] = "/dbops-no-such-rootfs"
    broken = Path(lab.dir) / "dbops-broken-runtime.yaml"
    broken.write_text(yaml.safe_dump(raw, sort_keys=False))

    r2, _ = _backup(cli, str(broken))
    assert r2.exit_code == 17, r2
    assert "validation could not run" in r2.stderr and "says nothing against the backup" in r2.stderr
    assert _states(cli, lab.config_path) == {b1["backup_id"]: "stored"}  # not failed, nothing new stored

    r3, b3 = _backup(cli, lab.config_path)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == b1["backup_id"]
    assert _states(cli, lab.config_path)[b1["backup_id"]] == "validated"
