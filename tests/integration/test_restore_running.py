"""Issue #13 item 9: `restore --force / --delta` never touches a running cluster's data folder,
whether the target is that folder, contains it, or lies inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbops.pg import conn

pytestmark = pytest.mark.integration


def test_force_and_delta_refuse_folders_around_and_inside_a_running_cluster(make_lab, cli):
    lab = make_lab(replicas=0)
    data = Path(lab.primary.data_dir)
    before = sorted(p.name for p in data.parent.iterdir())
    cases = [(data, "--force"), (data.parent, "--force"), (data.parent.parent, "--delta"),
             (data / "base", "--force"), (data / "pg_wal", "--delta"), (data / "new-folder", "--force")]
    for target, flag in cases:
        r = cli(["-c", lab.config_path, "restore", "--to", "latest", "--target-dir", str(target), flag])
        assert r.exit_code == 11, (target, flag, r)
        assert "is running" in r.stderr and str(data) in r.stderr, r.stderr
    assert sorted(p.name for p in data.parent.iterdir()) == before and not (data / "new-folder").exists()
    with conn.session(lab.primary) as c:
        assert c.execute("select count(*) from pg_class").fetchone()[0] > 0
