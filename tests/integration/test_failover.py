"""`dbops failover` against a real lab: a primary and two streaming replicas on loopback,
WAL archived to SeaweedFS through `dbops wal-push`, PgBouncer from Debian.

The tests share one private lab (module scope) and leave it with one primary and two
streaming standbys, whichever node is primary; each reads the topology it starts from.
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
from dbops.errors import RolledBackError
from dbops.nodes import open_controller
from dbops.ops import topology
from dbops.ops.failover import switchover as failover
from dbops.ops.failover import plan as failover_plan
from dbops.pg import conn
from dbops.storage import open_store
from dbops.storage.layout import Layout

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import failover_lab
from switchkit import STEP_TIMEOUT, PrimaryView, settled, writer_lab
from writer_probe import Writer, multi_host

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("private_lock_dir")]


@pytest.fixture(scope="module")
def flab(lab_factory):
    return writer_lab(lab_factory, "failover", replicas=2)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "DBOPS_LOCK_DIR": str(tmp_path)}


def _dbops(dbops_bin: str, cfg_path: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([dbops_bin, "-c", cfg_path, *args], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path), check=False)


def _shape(cfg_path: str) -> dict[str, tuple]:
    topo = topology.discover(cfgmod.load(cfg_path))
    return {s.name: (s.role, s.upstream, s.timeline, s.streaming) for s in topo.nodes}


def test_status_shows_the_topology(flab, cli):
    settled(flab.config_path, standbys=2)
    r = cli(["-c", flab.config_path, "status", "--json"])
    assert r.exit_code == 0, r
    data = json.loads(r.stdout)["topology"]
    roles = {n["name"]: n["role"] for n in data["nodes"]}
    assert sorted(roles.values()) == ["primary", "standby", "standby"]
    standby = next(n for n in data["nodes"] if n["role"] == "standby")
    assert standby["upstream"] == data["primary"] and standby["replay_lag_bytes"] is not None
    text = cli(["-c", flab.config_path, "status"])
    assert text.exit_code == 0 and "UPSTREAM" in text.stdout and "streaming" in text.stdout


def test_dry_run_changes_nothing(flab, dbops_bin, tmp_path):
    settled(flab.config_path, standbys=2)
    before = _shape(flab.config_path)
    r = _dbops(dbops_bin, flab.config_path, "failover", "--dry-run", "--json", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] and out["plan"]["ok"] and out["plan"]["steps"]
    assert _shape(flab.config_path) == before


def test_without_yes_and_without_a_terminal_it_asks_for_yes(flab, dbops_bin, tmp_path):
    settled(flab.config_path, standbys=2)
    before = _shape(flab.config_path)
    r = _dbops(dbops_bin, flab.config_path, "failover", tmp_path=tmp_path)
    assert r.returncode == 2 and "--yes" in r.stderr, r.stderr
    r = _dbops(dbops_bin, flab.config_path, "failover", "--max-lag", "lots", "--yes", tmp_path=tmp_path)
    assert r.returncode == 2 and "--max-lag" in r.stderr
    assert _shape(flab.config_path) == before


def test_a_failing_pre_hook_cancels_before_anything_changes(flab, dbops_bin, tmp_path):
    marker = tmp_path / "pre-hook-ran"
    cfg_path = failover_lab.failover_config(flab, extra={"pre_hooks": [f"sh -c 'touch {marker}; exit 3'"]},
                                            name="dbops-prehook.yaml")
    settled(cfg_path, standbys=2)
    before = _shape(cfg_path)
    r = _dbops(dbops_bin, cfg_path, "failover", "--yes", tmp_path=tmp_path)
    assert r.returncode == 11, r.stderr
    assert marker.exists() and "pre-hook" in r.stderr and "nothing changed" in r.stderr
    assert _shape(cfg_path) == before


def test_a_lagging_candidate_is_refused(flab, dbops_bin, tmp_path):
    topo = settled(flab.config_path, standbys=2)
    cand = topo.standbys[0]
    with conn.session(cand.node) as c:
        c.execute("select pg_wal_replay_pause()")
    try:
        with conn.session(topo.primary.node) as c:
            c.execute("create table if not exists lag_filler as select g from generate_series(1, 50000) g")
            c.execute("insert into lag_filler select g from generate_series(1, 50000) g")
        r = _dbops(dbops_bin, flab.config_path, "failover", "--to", cand.name, "--yes", "--max-lag", "64kB",
                   "--json", tmp_path=tmp_path)
        assert r.returncode == 11, r.stderr
        blocking = {f["check"] for f in json.loads(r.stdout)["plan"]["findings"] if f["status"] == "fail"}
        assert {"replay", "lag"} <= blocking
        assert "pg_wal_replay_resume" in r.stderr
        assert topology.discover(cfgmod.load(flab.config_path)).primary.name == topo.primary.name
    finally:
        with conn.session(cand.node) as c:
            c.execute("select pg_wal_replay_resume()")


def _switch_with_writer(flab, dbops_bin, tmp_path, cfg_path: str, to: str | None) -> tuple[dict, Writer]:
    cfg = cfgmod.load(cfg_path)
    w = Writer(multi_host(list(cfg.nodes), passfile=str(Path(flab.dir) / "pgpass")),
               start_id=int(time.time() * 1000) * 1000)
    w.start()
    try:
        w.wait_for_commits(30)
        args = ["failover", "--yes", "--json", "--timeout", "30", "--metrics-file", str(tmp_path / "fo.prom")]
        r = _dbops(dbops_bin, cfg_path, *args, *(["--to", to] if to else []), tmp_path=tmp_path)
        assert r.returncode == 0, r.stderr
        w.wait_for_commits(30)
    finally:
        w.stop()
    return json.loads(r.stdout)["report"], w


def test_switchover_and_failback_lose_no_commit(flab, dbops_bin, tmp_path):
    post_env = tmp_path / "post.env"
    cfg_path = failover_lab.failover_config(
        flab, extra={"post_hooks": [f"sh -c 'env | grep ^DBOPS_ | sort > {post_env}'"]}, name="dbops-hooks.yaml")
    first = settled(cfg_path, standbys=2).primary.name
    store = open_store(cfgmod.load(cfg_path).storage)
    for to in (None, first):  # switch over to the best standby, then fail back to the first primary
        start = settled(cfg_path, standbys=2)
        report, w = _switch_with_writer(flab, dbops_bin, tmp_path, cfg_path, to)
        new = report["new_primary"]
        assert report["outcome"] == "succeeded" and report["old_primary"] == start.primary.name
        assert new != start.primary.name and (to is None or new == to)
        assert report["timeline"] == start.primary.timeline + 1
        assert not report["rewind"]["needed"], report["rewind"]
        # every acknowledged commit is on the new primary; the write gap stayed short
        with conn.session(cfgmod.load(cfg_path).node(new)) as c:
            assert w.lost(c) == []
        assert w.max_gap() < 3.0, w.max_gap()
        # the old primary and the other replica stream from the new one, on the new timeline
        topo = settled(cfg_path, standbys=2)
        assert topo.primary.name == new and topo.primary.timeline == report["timeline"]
        assert {s.name for s in topo.standbys} == {n.name for n in flab.nodes} - {new}
        # the new timeline's history file reached the archive
        assert store.head(Layout(flab.config.storage.prefix).wal_key(f"{report['timeline']:08X}.history"))
        env = dict(line.split("=", 1) for line in post_env.read_text().splitlines())
        assert env["DBOPS_NEW_PRIMARY"] == new and env["DBOPS_OLD_PRIMARY"] == start.primary.name
        assert env["DBOPS_TIMELINE"] == str(report["timeline"]) and env["DBOPS_SWITCH_LSN"] == report["switch_lsn"]
        assert "dbops_failover_success" in (tmp_path / "fo.prom").read_text()
    assert settled(cfg_path, standbys=2).primary.name == first


def test_candidate_killed_in_the_switch_rolls_back(flab, tmp_path):
    cfg = cfgmod.load(flab.config_path)
    start = settled(flab.config_path, standbys=2)
    opts = failover_plan.Options.from_config(cfg, timeout=STEP_TIMEOUT)
    plan = failover_plan.make_plan(cfg, opts)
    assert plan.ok, plan.findings
    cand = plan.candidate.node

    def kill_candidate(phase: str, when: str) -> None:
        if phase == "stop old primary" and when == "start":
            open_controller(cand).stop("immediate", timeout=30)

    w = Writer(multi_host(list(cfg.nodes), passfile=str(Path(flab.dir) / "pgpass")),
               start_id=int(time.time() * 1000) * 1000)
    w.start()
    try:
        w.wait_for_commits(30)
        with pytest.raises(RolledBackError) as ei:
            failover.execute(cfg, plan, opts, observer=kill_candidate)
        w.wait_for_commits(30)  # writes resumed on the old primary
    finally:
        w.stop()
        open_controller(cand).start(timeout=60)
    rep = ei.value.report
    assert rep.outcome == "rolled_back" and ei.value.exit_code == 12
    assert [p.name for p in rep.phases][-1] == "rollback"
    with conn.session(start.primary.node) as c:
        assert c.execute("select pg_is_in_recovery()").fetchone()[0] is False
        assert w.lost(c) == []
    topo = settled(flab.config_path, standbys=2)
    assert topo.primary.name == start.primary.name and topo.primary.timeline == start.primary.timeline


def test_pgbouncer_clients_see_a_pause_and_no_errors(flab, dbops_bin, tmp_path):
    start = settled(flab.config_path, standbys=2)
    # under the lab's folder: PgBouncer runs as the postgres OS user, pytest's tmp_path is private to root
    bouncer = failover_lab.start_pgbouncer(Path(flab.dir) / "pgbouncer", PrimaryView(flab, start.primary.node))
    try:
        cfg_path = failover_lab.failover_config(flab, bouncer, name="dbops-pgbouncer.yaml")
        w = Writer(bouncer.conninfo(), start_id=int(time.time() * 1000) * 1000)
        w.start()
        try:
            w.wait_for_commits(30)
            r = _dbops(dbops_bin, cfg_path, "failover", "--yes", "--json", tmp_path=tmp_path)
            assert r.returncode == 0, r.stderr
            w.wait_for_commits(30)
        finally:
            w.stop()
        report = json.loads(r.stdout)["report"]
        assert w.errors == [], w.errors[:5]
        assert w.max_gap() > 0.01  # the clients waited while the primary moved
        names = [p["name"] for p in report["phases"]]
        assert names.index("pgbouncer pause") < names.index("stop old primary") < names.index("pgbouncer resume")
        new = cfgmod.load(cfg_path).node(report["new_primary"])
        assert f"port={new.port}" in bouncer.ini.read_text()
        with conn.session(new) as c:
            assert w.lost(c) == []
    finally:
        bouncer.stop()
    settled(flab.config_path, standbys=2)


def test_a_diverged_old_primary_is_rewound_and_follows(make_lab):
    """Split brain on purpose (the replica promoted while the primary kept writing): rejoin must
    see the divergence in the timeline history and run pg_rewind; the diverged rows are gone."""
    from dbops.ops.failover import replication as repl

    info = make_lab(replicas=1)
    old, new = info.primary, info.replicas[0]
    with conn.session(new) as c:
        c.execute("select pg_promote(true)")
        c.execute("checkpoint")
        tli = int(c.execute("select pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
        history = repl.read_history(c, tli)
        template = None
    with conn.session(old) as c:
        c.execute("create table diverged as select g from generate_series(1, 1000) g")
        c.execute("checkpoint")
    decision = repl.rejoin(open_controller(old), new, conninfo_template=template, slot=None, history=history,
                           new_timeline=tli, timeout=60)
    assert decision.needed, decision
    deadline = time.monotonic() + 30
    while True:
        st = topology.probe(old, info.config.nodes)
        if st.streaming and st.upstream == new.name and st.timeline == tli:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    with conn.session(old) as c:
        assert c.execute("select to_regclass('diverged')").fetchone()[0] is None
