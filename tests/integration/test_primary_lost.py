"""`dbops failover --primary-lost` and `dbops rejoin` against real labs: PostgreSQL 15 primaries and
standbys on loopback, WAL archived to SeaweedFS through `dbops wal-push`, PgBouncer from Debian.

The primary is killed with `kill -9` (the postmaster and every child, as a dying host) and, where
the scenario says so, its data folder is made unreadable to its owner (an unreachable disk).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbops import config as cfgmod
from dbops.ops import topology
from dbops.ops.failover.pgbouncer import PgBouncer
from dbops.ops.failover.poolerpause import PauseRecord, read_record
from dbops.pg import conn
from dbops.storage import open_archive

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import failover_lab
from writer_probe import Writer, multi_host, prepare

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("private_lock_dir")]


def _dbops(dbops_bin: str, cfg_path: str, *args: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([dbops_bin, "-c", cfg_path, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "DBOPS_LOCK_DIR": str(tmp_path)}, check=False)


def _json(r: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON on stdout (exit {r.returncode}): {r.stdout[-2000:]} {r.stderr[-3000:]}") from None


def _one(node, query: str, *args):
    with conn.session(node) as c:
        cur = c.execute(query, args or None)
        return cur.fetchone() if cur.description else None


def _wait_streaming(cfg_path: str, name: str, upstream: str, timeout: float = 60) -> None:
    cfg = cfgmod.load(cfg_path)
    deadline = time.monotonic() + timeout
    while True:
        st = topology.probe(cfg.node(name), cfg.nodes)
        if st.streaming and st.upstream == upstream:
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def _wait_archived(node, segment: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (_one(node, "select last_archived_wal from pg_stat_archiver")[0] or "") < segment:
        assert time.monotonic() < deadline, f"{segment} not archived within {timeout} s"
        time.sleep(0.1)


def test_answering_primary_refused_failing_fence_hook_stops_no_fence_promotes(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=1)
    old, standby = lab.primary, lab.replicas[0]
    marker = tmp_path / "fence-hook-ran"
    cfg_path = failover_lab.failover_config(lab, extra={"fence_hooks": [
        f"sh -c 'touch {marker}; echo the cloud API refused to stop the instance >&2; exit 7'"]}, name="dbops-fence.yaml")

    # 1. The primary answers: refused, pointing at the planned path; nothing changes.
    r = _dbops(dbops_bin, cfg_path, "failover", "--primary-lost", "--yes", tmp_path=tmp_path)
    assert r.returncode == 11, r.stderr
    assert "accepts connections" in r.stderr and "dbops failover" in r.stderr and not marker.exists()
    assert _one(standby, "select pg_is_in_recovery()")[0] is True

    # 2. The primary dies; the fence hook fails: promotion stops, the standby is left as it was.
    failover_lab.kill9(old.data_dir)
    conninfo_before = _one(standby, "select current_setting('primary_conninfo')")[0]
    r = _dbops(dbops_bin, cfg_path, "failover", "--primary-lost", "--yes", "--json", tmp_path=tmp_path)
    assert r.returncode == 11, r.stderr
    assert marker.exists() and "could not be fenced" in r.stderr and "cloud API refused" in r.stderr
    out = _json(r)
    assert out["report"]["outcome"] == "cancelled" and out["report"]["fence"]["hook_failure"]
    assert _one(standby, "select pg_is_in_recovery()")[0] is True
    assert _one(standby, "select current_setting('primary_conninfo')")[0] == conninfo_before  # tuning undone
    # the controller reached the old data folder: stopped, and it would come back as a standby
    assert (Path(old.data_dir) / "standby.signal").exists()

    # 3. --no-fence promotes anyway, and says plainly that it did not fence.
    r = _dbops(dbops_bin, cfg_path, "failover", "--primary-lost", "--no-fence", "--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0 and "TWO PRIMARIES" in r.stdout, r.stdout
    r = _dbops(dbops_bin, cfg_path, "failover", "--primary-lost", "--no-fence", "--yes", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{standby.name} is primary on timeline 2; nothing known was lost" in r.stdout, r.stdout
    assert "fence: NOT DONE" in r.stdout and "NOT fenced" in r.stdout and "last recovered commit" in r.stdout
    assert _one(standby, "select pg_is_in_recovery()")[0] is False


def test_a_standby_behind_the_archive_is_caught_up_from_it(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=1)
    old, standby = lab.primary, lab.replicas[0]
    _one(old, "create table early as select g from generate_series(1, 1000) g")
    _one(old, "checkpoint")
    # Cut the standby off: nothing to stream from, no archive to read.
    with conn.session(standby) as c:
        c.execute("alter system set primary_conninfo = 'host=127.0.0.1 port=1 connect_timeout=1'")
        c.execute("alter system set restore_command = ''")
        c.execute("select pg_reload_conf()")
    # Cut off for good: no walsender on the primary for 6 s on end. The standby's startup process may
    # still restart its walreceiver once with the old conninfo (it had not read the reload yet), and
    # retries come every wal_retrieve_retry_interval (5 s): one look at the standby once fell in a
    # gap between two receivers, and the rows below then streamed to it.
    deadline, quiet_since = time.monotonic() + 60, None
    while quiet_since is None or time.monotonic() - quiet_since < 6:
        assert time.monotonic() < deadline
        if _one(old, "select count(*) from pg_stat_replication")[0]:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        time.sleep(0.1)
    # Rows only the archive will have.
    _one(old, "create table archive_only as select g from generate_series(1, 5000) g")
    switched = _one(old, "select pg_walfile_name(pg_switch_wal())")[0]
    _wait_archived(old, switched)
    failover_lab.kill9(old.data_dir)
    assert _one(standby, "select to_regclass('archive_only')")[0] is None

    r = _dbops(dbops_bin, lab.config_path, "failover", "--primary-lost", "--yes", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = _json(r)
    rep, loss = out["report"], out["report"]["loss"]
    assert out["plan"]["archive"]["segment"] == switched
    assert rep["restore_command_set"] is True and rep["outcome"] == "promoted"
    assert loss["archive_beyond_candidate"] is True and loss["recovered_from_archive_bytes"] > 0
    assert loss["possible"] is False and loss["known_lost_bytes"] == 0 and loss["known_end_sources"] == ["archive"]
    assert _one(standby, "select count(*) from archive_only")[0] == 5000
    assert _one(standby, "select pg_is_in_recovery()")[0] is False
    # the standby's own settings are back (restore_command was empty before)
    assert _one(standby, "select current_setting('restore_command')")[0] == ""


def test_kill9_under_load_promotes_the_most_advanced_standby_then_rejoin_and_backup(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=2)
    old = lab.primary
    bouncer = failover_lab.start_pgbouncer(Path(lab.dir) / "pgbouncer", lab)
    try:
        cfg_path = failover_lab.failover_config(lab, bouncer, extra={"fence_hooks": [failover_lab.FENCE_CHECK_HOOK]},
                                                name="dbops-lost.yaml")
        with conn.session(old) as c:
            prepare(c)
        r = _dbops(dbops_bin, cfg_path, "backup", tmp_path=tmp_path, timeout=600)  # on timeline 1
        assert r.returncode == 0, r.stderr
        cfg = cfgmod.load(cfg_path)
        # A planned switchover killed while PgBouncer was paused left it so, with its record in the bucket:
        # the emergency failover must resume it (the writer below connects to the nodes directly).
        pooler, (store, layout) = PgBouncer(cfg.failover.pgbouncer), open_archive(cfg.storage)
        PauseRecord(store, layout, pooler, old, lab.replicas[0]).mark()
        pooler.pause(30)
        assert pooler.paused_databases()
        w = Writer(multi_host(list(cfg.nodes), passfile=str(Path(lab.dir) / "pgpass")), start_id=1)
        w.start()
        try:
            w.wait_for_commits(300)
            failover_lab.kill9(old.data_dir)
            t_kill = time.monotonic()
            failover_lab.make_unreachable(old.data_dir)
            r = _dbops(dbops_bin, cfg_path, "failover", "--primary-lost", "--yes", "--json", "--metrics-file",
                       str(tmp_path / "fo.prom"), tmp_path=tmp_path)
            assert r.returncode == 0, r.stderr
            w.wait_for_commits(50)  # writes go on, on the new primary
        finally:
            w.stop()
        out = _json(r)
        plan, rep, loss = out["plan"], out["report"], out["report"]["loss"]
        new = cfg.node(rep["new_primary"])
        assert rep["outcome"] == "promoted" and rep["timeline"] == 2 and rep["fence"]["fenced"] is True
        assert rep["fence"]["controller_ok"] is False  # the data folder is unreachable: the hook fenced
        best = {s["name"]: s for s in plan["standbys"]}
        assert best[new.name]["candidate"] and best[new.name]["behind_best_bytes"] == 0
        assert not loss["possible"] and loss["known_lost_bytes"] == 0
        assert "dbops_failover_loss_possible{cluster=\"lab\"} 0" in (tmp_path / "fo.prom").read_text()
        assert f"port={new.port}" in bouncer.ini.read_text()
        assert pooler.paused_databases() == [] and read_record(store, layout) is None
        assert "RESUME" in next(p["detail"] for p in rep["phases"] if p["name"] == "pgbouncer resume")
        other = next(n for n in lab.replicas if n.name != new.name)
        _wait_streaming(cfg_path, other.name, new.name)

        # Every commit sent before the kill is there, except a tail whose WAL reached neither a standby
        # nor the archive; everything sent after it (so served by the new primary) is there. Sent, not
        # acknowledged: an acknowledgement the old primary sent just before it died may be read later.
        before = [(i, wall) for (i, _), wall, sent in zip(w.acked, w.acked_wall, w.sent) if sent < t_kill]
        with conn.session(new) as c:
            missing = set(w.lost(c))
            last_present_at = c.execute("select extract(epoch from at) from dbops_probe where id = %s",
                                        (max(i for i, _ in before if i not in missing),)).fetchone()[0]
        lost_ids = [i for i, _ in before if i in missing]
        assert lost_ids == [i for i, _ in before][len(before) - len(lost_ids):], "lost commits must be a tail"
        assert len(missing) == len(lost_ids), "a commit acknowledged after the failover is missing"
        # The report's last recovered commit is the last one present: after it started, before any lost one.
        from datetime import datetime

        last_commit = datetime.fromisoformat(loss["last_commit_time"]).timestamp()
        assert last_commit >= float(last_present_at) - 0.001
        if lost_ids:
            first_lost_ack = dict(before)[lost_ids[0]]
            assert last_commit < first_lost_ack

        # The old primary comes back: rejoin lists what only it had, rewinds it, it follows.
        failover_lab.make_reachable(old.data_dir)
        r = _dbops(dbops_bin, cfg_path, "rejoin", old.name, "--yes", "--json", tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
        rj = _json(r)["report"]
        d = rj["divergence"]
        assert rj["outcome"] == "rejoined" and d["switch_lsn"] == loss["switch_lsn"]
        # each probe insert is one commit; one more may have committed without its acknowledgement arriving
        assert len(lost_ids) <= d["commits"] <= len(lost_ids) + 2, (len(lost_ids), d)
        if d["commits"]:
            assert rj["rewound"] and rj["rewind_diverged_at"]
        _wait_streaming(cfg_path, old.name, new.name)
        r = _dbops(dbops_bin, cfg_path, "rejoin", old.name, "--yes", tmp_path=tmp_path)
        assert r.returncode == 0 and "already following" in r.stdout, r.stdout

        # Backups continue: the next one validates the one taken on timeline 1, across the switch.
        r = _dbops(dbops_bin, cfg_path, "backup", tmp_path=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr
        r = _dbops(dbops_bin, cfg_path, "backup", "list", "--json", tmp_path=tmp_path)
        chain = json.loads(r.stdout)
        assert [b["status"] for b in chain] == ["validated", "stored"] and chain[1]["timeline"] == 2
    finally:
        bouncer.stop()
        failover_lab.make_reachable(old.data_dir)
