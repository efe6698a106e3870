"""The whole story on one lab, as an operator lives it (issue 7's tour; `make demo` runs the same):

scheduled backups with the exact command line from deploy/cron/dbops, writes in between, a validated
chain growing; an accident and a restore to just before it; a planned failover; backups and archiving
carrying on against the new primary on the new timeline; a failover back; prune.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dbops import proc
from dbops.repo import manifest as mf
from dbops.config import Assertion
from dbops.ops import catalogview
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.container]

ROOT = Path(__file__).resolve().parents[2]


def cron_command(dbops_bin: str, config: str, metrics: Path, lock: Path) -> tuple[str, str]:
    """The backup line of deploy/cron/dbops, with only the install paths swapped for the lab's."""
    line = next(ln for ln in (ROOT / "deploy/cron/dbops").read_text().splitlines()
                if ln and not ln.startswith("#") and "dbops" in ln and "=" not in ln.split()[0])
    fields = line.split(None, 6)
    user, command = fields[5], fields[6]
    command = (command.replace("/usr/local/bin/dbops", dbops_bin).replace("/etc/dbops/dbops.yaml", config)
               .replace("/var/lib/node_exporter/textfile_collector/dbops_backup.prom", str(metrics))
               .replace("/run/lock/dbops-backup.lock", str(lock)))
    return user, command


def run_cron(user: str, command: str) -> subprocess.CompletedProcess:
    argv = ["/bin/sh", "-c", command]
    if user != "root":
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})


def primary_of(lab):
    for n in lab.config.nodes:
        try:
            with pgconn.session(n) as c:
                if not pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
                    return n
        except Exception:
            continue
    raise AssertionError("no primary")


def sql(node, statement: str, port: int | None = None):
    if port is not None:
        node = dataclasses.replace(node, port=port)
    with pgconn.session(node) as c:
        cur = c.execute(statement)
        return cur.fetchall() if cur.description else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backups(cli, lab) -> list[dict]:
    r = cli(["-c", lab.config_path, "backup", "list", "--json"])
    assert r.exit_code == 0, r
    return json.loads(r.stdout)


def test_the_tour(make_lab, cli, dbops_bin, tmp_path):
    lab = make_lab(replicas=1)
    metrics = tmp_path / "dbops_backup.prom"
    user, command = cron_command(dbops_bin, lab.config_path, metrics, tmp_path / "dbops-backup.lock")
    assert user == "root" and "-q backup --metrics-file" in command

    # 1. Scheduled backups, silent on success, a chain that validates as it grows.
    sql(lab.primary, "CREATE TABLE orders (id int PRIMARY KEY, batch int, note text)")
    sql(lab.primary, "INSERT INTO orders SELECT g, 1, md5(g::text) FROM generate_series(1, 500) g")
    r = run_cron(user, command)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    assert "dbops_backup_last_run_success{cluster=\"lab\"} 1" in metrics.read_text()
    sql(lab.primary, "INSERT INTO orders SELECT g, 2, md5(g::text) FROM generate_series(501, 1000) g")
    r = run_cron(user, command)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    chain = backups(cli, lab)
    assert [b["status"] for b in chain] == ["validated", "stored"]
    assert "dbops_backup_validation_ok{cluster=\"lab\"} 1" in metrics.read_text()

    # 2. An accident, and a point-in-time restore to just before it.
    before = datetime.now(timezone.utc).isoformat()
    time.sleep(1.1)
    sql(lab.primary, "DELETE FROM orders WHERE batch = 2")
    switched = sql(lab.primary, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    deadline = time.monotonic() + 60  # archiving is asynchronous: wait for the DELETE's segment
    while (sql(lab.primary, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < switched:
        assert time.monotonic() < deadline, f"{switched} was not archived within 60 s"
        time.sleep(0.1)
    port = free_port()
    target = lab.dir / "restored"
    r = cli(["-c", lab.config_path, "restore", "--to", before, "--target-dir", str(target), "--start",
             "--port", str(port), "--json"])
    assert r.exit_code == 0, r
    try:
        assert sql(lab.primary, "SELECT count(*) FROM orders", port=port) == [(1000,)]
    finally:
        proc.run([binaries.binary("pg_ctl"), "-D", str(target), "-m", "fast", "-w", "stop"], user="postgres")
    assert sql(lab.primary, "SELECT count(*) FROM orders") == [(500,)]

    # 3. A planned failover; writes and backups carry on on the new timeline.
    r = cli(["-c", lab.config_path, "failover", "--to", "pg2", "--yes", "--json"])
    assert r.exit_code == 0, r
    new_primary = primary_of(lab)
    assert new_primary.name == "pg2"
    sql(new_primary, "INSERT INTO orders SELECT g, 3, md5(g::text) FROM generate_series(2001, 2300) g")
    r = run_cron(user, command)
    assert r.returncode == 0 and r.stderr == "", r
    chain = backups(cli, lab)
    assert len(chain) == 3 and chain[1]["status"] == "validated" and chain[1]["timeline"] == 1
    assert chain[2]["timeline"] == 2
    r = cli(["-c", lab.config_path, "wal", "status", "--json"])
    assert r.exit_code == 0, r
    st = json.loads(r.stdout)
    assert st["gap_count"] == 0 and "00000002.history" in st["histories"]

    # 4. Failover back; another scheduled backup validates across the second switch.
    r = cli(["-c", lab.config_path, "failover", "--to", "pg1", "--yes"])
    assert r.exit_code == 0, r
    assert primary_of(lab).name == "pg1"
    sql(lab.primary, "INSERT INTO orders SELECT g, 4, md5(g::text) FROM generate_series(3001, 3100) g")
    r = run_cron(user, command)
    assert r.returncode == 0 and r.stderr == "", r
    chain = backups(cli, lab)
    assert [b["status"] for b in chain] == ["validated", "validated", "validated", "stored"]
    assert chain[3]["timeline"] == 3

    # The newest backup, restored on its own, holds every batch written before it.
    cfg = lab.config
    v = dataclasses.replace(cfg.backup.validation, assertions=(Assertion(
        name="batches", sql="SELECT array_agg(DISTINCT batch ORDER BY batch) = '{1,3,4}' AND count(*) = 900 "
                            "FROM orders"),))
    cfg = dataclasses.replace(cfg, backup=dataclasses.replace(cfg.backup, validation=v))
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    catalogview.restore_and_start(cfg, store, layout, mf.load(store, layout, chain[3]["backup_id"]))

    # 5. Prune to the two newest; what is left restores and starts.
    pruned = tmp_path / "dbops.yaml"
    pruned.write_text(Path(lab.config_path).read_text().replace("keep_last: 7", "keep_last: 2"))
    r = cli(["-c", str(pruned), "backup", "prune", "--confirm", "--json"])
    assert r.exit_code == 0, r
    assert json.loads(r.stdout)["remove"] == [chain[0]["backup_id"], chain[1]["backup_id"]]
    left = backups(cli, lab)
    assert [b["backup_id"] for b in left] == [chain[2]["backup_id"], chain[3]["backup_id"]]
    r = cli(["-c", lab.config_path, "verify", "--all", "--restore"])
    assert r.exit_code == 0, r
