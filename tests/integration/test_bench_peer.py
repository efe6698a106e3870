"""Smoke test of the pgBackRest peer used by `make bench`: a full and an incremental backup of a
private lab into the peer's own HTTPS SeaweedFS, both really stored."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dbops import proc
from dbops.pg import binaries

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import pgbackrest_peer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("pgbackrest") is None, reason="pgbackrest is not installed"),
]


def pgbench(lab, *args: str) -> str:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    return proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=300).stdout


def test_pgbackrest_full_and_incremental_backups_are_stored(make_lab):
    lab = make_lab(replicas=0)
    pgbench(lab, "-i", "-s", "1", "-q")

    results = pgbackrest_peer.bench_backup(lab, pgbench, 2)

    by_bench = {r["bench"]: r for r in results}
    assert set(by_bench) == {"backup_full", "backup_incremental"}
    for r in results:
        assert r["tool"] == "pgbackrest"
        assert r["wall_seconds"] > 0
        assert r["stored_bytes"] > 0
        assert r["config"]["archive-check"] is False
    assert by_bench["backup_full"]["type"] == "full"
    assert by_bench["backup_incremental"]["type"] == "incr"
    assert by_bench["backup_incremental"]["label"].startswith(by_bench["backup_full"]["label"] + "_")
