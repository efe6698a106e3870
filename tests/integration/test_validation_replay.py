"""The throwaway server's replay and checks, as validation runs them: WAL read in place from pg_wal
(hard links to the fetched folder, which stays untouched), the restart point written beside the
checks (the stop then writes nothing, and the stopped folder is complete), and table reads that
read every heap page even where an index-only scan would answer count(*) from the visibility map."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dbops import proc
from dbops.config.parse import parse
from dbops.errors import ValidationError
from dbops.ops.backup.checks import run_checks
from dbops.ops.backup.replay import restartpoint_beside
from dbops.pg import conn, controldata
from dbops.runtime import InstanceSpec, open_runtime
from dbops.runtime.walfolder import link_wal

from test_runtime import (ROWS_AFTER_TARGET, ROWS_BEFORE_TARGET, RUNTIMES, backup_scenario, no_leftovers,
                          copy_cluster, own_folder, paused_recovery, settings, stopped_cluster, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.container]

__all__ = ["backup_scenario", "no_leftovers", "settings"]  # fixtures, shared with test_runtime (over this `work`)


@pytest.fixture(scope="module")
def work(base_dir) -> Path:
    """This module's own folder (test_runtime's `work` makes base_dir/runtime, once per session)."""
    return own_folder(base_dir, "validation-replay")

PAGE = 8192


def _free_port() -> int:
    return proc.free_port()


def _state(data: Path) -> str:
    return controldata.read(str(data), user="postgres").state


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("engine", RUNTIMES)
def test_recovery_reads_linked_wal_in_place(engine, settings, backup_scenario, work):
    data = copy_cluster(backup_scenario["base"], work / f"linked-{engine}")
    wal = copy_cluster(backup_scenario["archive"], work / f"linked-wal-{engine}")
    before = _digests(wal)
    spec = paused_recovery(data, wal, f"linked-{engine}", backup_scenario["target"], wal_linked=True)
    assert link_wal(wal, data) is True
    with open_runtime(settings[engine]).start(spec) as inst:
        inst.wait_ready(120)
        with conn.session(inst.node()) as c:
            wait_for(inst, c, "select pg_get_wal_replay_pause_state()", "paused")
            assert conn.rows(c, "select v, count(*) from t group by v") == [("before", ROWS_BEFORE_TARGET)]
        with restartpoint_beside(inst, 60) as rp:  # as beside the checks: the stop then has nothing left to write
            pass
        # its log was read in the CHECKPOINT's thread once the command came back (not after the checks)
        assert rp.written and rp.log is not None
        logs = inst.logs(200)
        assert "recovery stopping" in logs
        assert "restored log file" not in logs, logs  # nothing copied: every file was read from pg_wal
        assert "restartpoint starting: immediate" in logs, logs
        inst.stop("fast", timeout=60)
        assert "restartpoint starting: shutdown" not in inst.logs(200)
    assert _state(data) == "shut down in recovery"
    assert _digests(wal) == before  # the fetched folder is as it was (the server only read the links)
    # The stopped folder is a complete snapshot: started again, it replays on to the end of the WAL.
    again = InstanceSpec(data_dir=data, port=_free_port(), wal_dir=wal, name=f"linked-again-{engine}")
    with open_runtime(settings[engine]).start(again) as inst:
        inst.wait_ready(120)
        with conn.session(inst.node()) as c:
            wait_for(inst, c, "select pg_is_in_recovery()", False)
            assert conn.rows(c, "select v, count(*) from t group by v order by v") == [
                ("after", ROWS_AFTER_TARGET), ("before", ROWS_BEFORE_TARGET)]
        inst.stop("fast", timeout=60)


@pytest.fixture(scope="module")
def wide_cluster(work) -> tuple[Path, str]:
    """A stopped cluster whose table t (20,000 rows of 500 bytes, a primary key) is all-visible after
    VACUUM: count(*) there is an index-only scan that reads no heap page. Returns (data, t's file)."""
    data, rel = stopped_cluster(work, "wide", ["create table t (id int primary key, pad text)",
                                               "insert into t select g, repeat('x', 500) from generate_series(1, 20000) g",
                                               "vacuum (freeze, analyze) t"], "select pg_relation_filepath('t')")
    return data, str(rel)


def _check_config(data: Path):
    return parse({"cluster": "t", "nodes": [{"name": "n1", "host": "127.0.0.1", "port": 5432, "data_dir": str(data)}],
                  "storage": {"bucket": "checks-test", "endpoint": "http://127.0.0.1:9"},
                  "runtime": {"engine": "none"}})


def test_checks_read_every_heap_page(settings, wide_cluster, work):
    src, rel = wide_cluster
    data = copy_cluster(src, work / "wide-damaged")
    f = data / rel
    body = bytearray(f.read_bytes())
    block = len(body) // PAGE // 2
    body[block * PAGE + PAGE // 2] ^= 0xFF  # a tuple byte: the page's checksum no longer matches
    f.write_bytes(bytes(body))
    cfg = _check_config(data)
    with open_runtime(settings["none"]).start(InstanceSpec(data_dir=data, port=_free_port(), name="checks")) as inst:
        inst.wait_ready(60)
        with conn.session(inst.node()) as c:
            # the blind spot the checks must not have: count(*) from the index never reads the page
            plan = "\n".join(r[0] for r in c.execute("explain select count(*) from t").fetchall())
            assert "Index Only Scan" in plan, plan
            assert conn.scalar(c, "select count(*) from t") == 20000
        checks: list[dict] = []
        with pytest.raises(ValidationError) as e:
            run_checks(cfg, inst, checks)
        assert "database postgres of the restored backup cannot be read" in e.value.message
        assert f"invalid page in block {block}" in (e.value.detail or ""), e.value.detail
        assert checks[-1]["check"] == "read_tables" and checks[-1]["ok"] is False
        inst.stop("fast", timeout=60)


def test_checks_pass_and_count_every_row(settings, wide_cluster, work):
    data = copy_cluster(wide_cluster[0], work / "wide-good")
    with open_runtime(settings["none"]).start(InstanceSpec(data_dir=data, port=_free_port(), name="checks")) as inst:
        inst.wait_ready(60)
        checks: list[dict] = []
        run_checks(_check_config(data), inst, checks)
        inst.stop("fast", timeout=60)
    reads = {c["database"]: c for c in checks if c["check"] == "read_tables"}
    assert set(reads) == {"postgres", "template1"} and all(c["ok"] for c in reads.values())
    assert reads["postgres"]["rows"] >= 20000


class _AmcheckEnds:
    """The throwaway instance, with pg_amcheck replaced by a script (how it ended is the subject)."""

    def __init__(self, inst, script: str | None):
        self._inst, self._script = inst, script

    def __getattr__(self, name):
        return getattr(self._inst, name)

    def run_tool(self, argv, **kw):
        if self._script is None or not argv[0].endswith("pg_amcheck"):
            return self._inst.run_tool(argv, **kw)
        return proc.run(["sh", "-c", self._script], check=False, timeout=60)


def test_pg_amcheck_killed_is_the_environment_and_corruption_the_backups(settings, wide_cluster, work):
    """pg_amcheck exits 2 for corruption and 1 for a check it could not finish. Killed (137 through a
    container: the OOM killer), not run by its engine (125), or cut short by the machine (no connection
    slot) says nothing against the backup (exit 17, the backup keeps its status); corruption it printed,
    and real corruption found by the real tool, is the backup's (exit 7, marked failed)."""
    from dbops.errors import ValidationEnvironmentError

    src, rel = wide_cluster
    data = copy_cluster(src, work / "wide-amcheck")
    cfg = _check_config(data)
    corrupt = 'echo \'heap table "postgres.public.t", block 3, offset 1:\'; echo "    xmin 1 precedes"; '
    with open_runtime(settings["none"]).start(InstanceSpec(data_dir=data, port=_free_port(), name="amcheck")) as inst:
        inst.wait_ready(60)
        with conn.session(inst.node()) as c:
            c.execute("create extension amcheck")
        checks: list[dict] = []
        run_checks(cfg, inst, checks)  # the real tool on a sound copy
        # postgres, where amcheck is installed (template1 has none: its tables are read instead)
        assert [(c["database"], c["ok"]) for c in checks if c["check"] == "pg_amcheck"] == [("postgres", True)]
        for script, said in (("kill -9 $$", "pg_amcheck was terminated by signal 9 (the OOM killer?)"),
                             ("exit 137", "pg_amcheck was terminated by signal 9 (the OOM killer?)"),
                             ("echo 'Error: OCI runtime error' >&2; exit 125", "could not run pg_amcheck (status 125)"),
                             ("echo 'pg_amcheck: error: FATAL:  sorry, too many clients already' >&2; exit 1",
                              "no connection slot free")):
            checks = []
            with pytest.raises(ValidationEnvironmentError) as ei:
                run_checks(cfg, _AmcheckEnds(inst, script), checks)
            assert said in ei.value.message and "pg_amcheck on database postgres" in ei.value.message, ei.value.message
            assert checks[-1] == {"check": "pg_amcheck", "database": "postgres", "ok": False, "tables": checks[-1]["tables"]}
        for script in (corrupt + "exit 2", corrupt + "kill -9 $$", "echo 'ERROR:  could not read block 3' >&2; exit 1"):
            with pytest.raises(ValidationError) as ei:
                run_checks(cfg, _AmcheckEnds(inst, script), [])
            assert not isinstance(ei.value, ValidationEnvironmentError), (script, ei.value.message)
            assert "pg_amcheck found corruption in database postgres" in ei.value.message
        inst.stop("fast", timeout=60)
    f = data / rel  # now a real bad page, found by the real pg_amcheck
    body = bytearray(f.read_bytes())
    body[(len(body) // PAGE // 2) * PAGE + PAGE // 2] ^= 0xFF
    f.write_bytes(bytes(body))
    with open_runtime(settings["none"]).start(InstanceSpec(data_dir=data, port=_free_port(), name="amcheck")) as inst:
        inst.wait_ready(60)
        with pytest.raises(ValidationError) as ei:
            run_checks(cfg, inst, [])
        assert not isinstance(ei.value, ValidationEnvironmentError)
        assert "pg_amcheck found corruption in database postgres" in ei.value.message
        assert 'heap table "postgres.public.t"' in (ei.value.detail or ""), ei.value.detail
        inst.stop("fast", timeout=60)
