"""Shared fixtures: a real lab (SeaweedFS S3 + PostgreSQL 15) on loopback, and a CLI runner.

* `lab`          one shared lab for the session (primary + 1 replica). Treat it as read-mostly:
                 do not change its topology or break it; use `make_lab` for that.
* `lab_factory`  session-scoped; `lab_factory.create(name, replicas=1, archive=True)` gives a private
                 lab that lives until the session ends (use in a module-scoped fixture).
* `make_lab`     function-scoped factory; its labs are torn down after the test.
* `cli`          runs `dbops ARGS` in-process through typer's CliRunner: `cli(["check"], env=...)`.
                 Shared helpers (SQL, archive waits, backup/restore, failover labs) live in labkit.py
                 and switchkit.py beside this file: `from labkit import sql`.
* `private_lock_dir` DBOPS_LOCK_DIR set to the test's tmp_path (labs share one bucket name).
* `dbops_bin`    the installed console script, for tests that need a real process (exit codes,
                 process listing, signals).

Lab folders live under a 0755 folder in /tmp (pytest's own tmp is 0700 and PostgreSQL runs
as the `postgres` OS user, which must reach them).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from dbops.lab import harness as labmod
from labkit import make_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def base_dir():
    d = Path(tempfile.mkdtemp(prefix="dbops-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    if not os.environ.get("DBOPS_KEEP_TEST_DIR"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _clean_env():
    for k in ("DBOPS_CONFIG", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE"):
        os.environ.pop(k, None)
    yield


class LabFactory:
    def __init__(self, base: Path):
        self.base = base
        self.labs: list[Path] = []

    def create(self, name: str, replicas: int = 1, archive: bool = True, encrypt: bool | None = None) -> labmod.LabInfo:
        d = self.base / name
        if d not in self.labs:
            self.labs.append(d)  # before up(): a half-built lab is torn down too
        return labmod.up(d, replicas=replicas, archive=archive, encrypt=encrypt)

    def destroy(self, d: Path) -> None:
        try:
            labmod.down(d, purge=False)
        finally:
            if d in self.labs:
                self.labs.remove(d)

    def destroy_all(self) -> None:
        for d in list(self.labs):
            try:
                self.destroy(d)
            except Exception as e:  # keep tearing down the others
                print(f"lab teardown {d}: {e}", file=sys.stderr)


@pytest.fixture(scope="session")
def lab_factory(base_dir):
    f = LabFactory(base_dir)
    yield f
    f.destroy_all()


@pytest.fixture(scope="session")
def lab(lab_factory) -> labmod.LabInfo:
    return lab_factory.create("shared", replicas=1)


@pytest.fixture
def make_lab(lab_factory, request):
    made: list[Path] = []
    counter = {"n": 0}

    def make(replicas: int = 1, archive: bool = True, encrypt: bool | None = None) -> labmod.LabInfo:
        counter["n"] += 1
        name = f"{request.node.name[:40]}-{counter['n']}".replace("[", "-").replace("]", "").replace("/", "-")
        info = lab_factory.create(name, replicas=replicas, archive=archive, encrypt=encrypt)
        made.append(info.dir)
        return info

    yield make
    for d in made:
        lab_factory.destroy(d)


@pytest.fixture
def private_lock_dir(tmp_path, monkeypatch):
    """DBOPS_LOCK_DIR in this test's own folder: the host-local flock is named after the bucket, which
    every lab on this machine shares (use with pytest.mark.usefixtures)."""
    monkeypatch.setenv("DBOPS_LOCK_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def cli():
    return make_cli()


@pytest.fixture(scope="session")
def dbops_bin() -> str:
    cand = Path(sys.executable).parent / "dbops"
    assert cand.exists(), "the dbops console script is not installed in this venv (pip install -e .)"
    return str(cand)
