"""Operating for months, against a real lab: backup.retention.auto (the backup that makes a backup
surplus removes it, with DeleteObjects on the real S3 server, and reports it in --json and the
metrics), S3 request counts per backup, `dbops status` with RPO and RTO, and
backup.scratch_limit refusing a run before it starts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from dbops import metrics
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.container]


def _mark(node, batch: int) -> None:
    with pgconn.session(node) as c:
        c.execute("CREATE TABLE IF NOT EXISTS marks (batch int, n int)")
        c.execute(f"INSERT INTO marks SELECT {batch}, g FROM generate_series(1, 200) g")


def test_auto_retention_prunes_after_each_backup_and_counts_requests(make_lab, cli, tmp_path, dbops_bin):
    lab = make_lab(replicas=0)
    assert lab.config.backup.retention.auto  # the lab ships with it on
    cfg_path = tmp_path / "dbops.yaml"
    cfg_path.write_text(Path(lab.config_path).read_text().replace("keep_last: 7", "keep_last: 2"))
    prom = tmp_path / "dbops_backup.prom"
    results = []
    for i in range(3):
        _mark(lab.primary, i)
        r = cli(["-c", str(cfg_path), "backup", "--json", "--metrics-file", str(prom)])
        assert r.exit_code == 0, r
        results.append(json.loads(r.stdout))
    ids = [b["backup_id"] for b in results]
    # The first two runs keep everything; the third removes the first, right away.
    assert results[0]["pruned"]["remove"] == [] and results[1]["pruned"]["remove"] == []
    pruned = results[2]["pruned"]
    assert pruned["confirmed"] and pruned["remove"] == [ids[0]] and pruned["keep"] == ids[1:]
    assert pruned["wal_segments"] > 0
    rows = json.loads(cli(["-c", str(cfg_path), "backup", "list", "--json"]).stdout)
    assert [x["backup_id"] for x in rows] == ids[1:]
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    assert list(store.list(layout.backup_prefix(ids[0]))) == []

    # Requests: counted per run; the prune deleted its objects in batches, not one by one.
    req = results[2]["s3_requests"]
    ops = req["by_operation"]
    assert req["total"] == sum(ops.values()) > 0
    assert ops["PutObject"] > 0 and ops["GetObject"] > 0 and ops.get("DeleteObjects", 0) >= 1
    assert ops.get("DeleteObject", 0) <= 2  # single deletes: the lock objects only, never the pruned ones
    # DeleteObjects on the real server: 1,000 keys a request, keys already gone are fine.
    keys = [layout.probe(f"batch-{i:04d}") for i in range(1001)]
    for k in keys[::250]:
        store.put(k, b"x")
    before = store.requests()
    store.delete_many(keys)
    assert store.requests()["DeleteObjects"] - before.get("DeleteObjects", 0) == 2
    assert all(store.head(k) is None for k in keys[::250])
    assert req["write_class"] + req["read_class"] <= req["total"]

    m = metrics.read_values(prom)
    assert m["dbops_backup_pruned_backups"] == 1 and m["dbops_backup_retained_backups"] == 2
    assert m["dbops_backup_s3_requests"] == req["total"]
    assert m["dbops_backup_s3_write_class_requests"] == req["write_class"]

    # `dbops status`: RTO is the newest measured restore, the one the third run measured on the second.
    r = cli(["-c", str(cfg_path), "status", "--json", "--metrics-file", str(tmp_path / "status.prom")])
    assert r.exit_code == 0, r
    st = json.loads(r.stdout)
    row = next(x for x in rows if x["backup_id"] == ids[1])
    assert st["rto"]["backup_id"] == ids[1] and st["rto"]["seconds"] == row["restore_seconds"] > 0
    assert st["rto"]["measured_at"] == row["restore_measured_at"] and st["rto"]["measured_age"] >= 0
    # RPO: with everything archived (a switch, then wait), nothing is at risk ...
    with pgconn.session(lab.primary) as c:
        switched = c.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
    deadline = time.monotonic() + 60
    while store.head(layout.wal_key(switched)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    st = json.loads(cli(["-c", str(cfg_path), "status", "--json"]).stdout)
    # (the background writer may log a standby snapshot, a few dozen bytes, at any moment)
    assert st["rpo"]["bytes"] <= 512 and (st["rpo"]["bytes"] == 0) == (st["rpo"]["seconds"] == 0.0), st["rpo"]
    assert st["rpo"]["newest_segment"] == switched and st["rpo"]["node"] == lab.primary.name
    # ... and after new writes, what is not archived yet shows in bytes and seconds.
    _mark(lab.primary, 99)
    time.sleep(1.1)
    r = cli(["-c", str(cfg_path), "status", "--json", "--metrics-file", str(tmp_path / "status.prom")])
    rpo = json.loads(r.stdout)["rpo"]
    assert rpo["bytes"] > 0 and rpo["seconds"] >= 1.0, rpo
    m = metrics.read_values(tmp_path / "status.prom")
    assert m["dbops_rpo_bytes"] >= rpo["bytes"] > 0 and m["dbops_rto_seconds"] == row["restore_seconds"]
    r = cli(["-c", str(cfg_path), "status"])
    assert "rpo (what a loss of the primary would lose now):" in r.stdout and "rto (the newest measured restore):" in r.stdout
    r = cli(["-c", str(cfg_path), "wal", "status", "--metrics-file", str(tmp_path / "wal.prom")])
    assert r.exit_code == 0 and "RPO: " in r.stdout
    assert metrics.read_values(tmp_path / "wal.prom")["dbops_rpo_bytes"] > 0

    # On a terminal (a real pseudo-terminal, through script(1)): the progress display, with the
    # phases, bytes done of the total and durations, and the line saying what retention removed.
    t = subprocess.run(["script", "-qec", shlex.join([dbops_bin, "-c", str(cfg_path), "backup"]), "/dev/null"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "120"})
    assert t.returncode == 0, t
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", t.stdout)
    for phase in ("capture", "download", "replay", "store", "prune"):
        assert phase in shown, shown[-3000:]
    assert re.search(r"download\s+\S*\s*[0-9.]+ [kMG]?B/[0-9.]+ [kMG]?B", shown), shown[-3000:]
    assert f"retention: removed 1 backup(s) ({ids[1]})" in shown
    # Without a terminal: nothing extra (the data goes to stdout only with -v, as before).
    r = subprocess.run([dbops_bin, "-c", str(cfg_path), "backup", "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout == "" and "\x1b[" not in r.stderr and "download" not in r.stderr, r


def test_scratch_limit_refuses_before_any_work(make_lab, cli, tmp_path):
    lab = make_lab(replicas=0)
    cfg_path = tmp_path / "dbops.yaml"
    cfg_path.write_text(Path(lab.config_path).read_text().replace("  retention:", "  scratch_limit: 2MiB\n  retention:"))
    r = cli(["-c", str(cfg_path), "backup"])
    assert r.exit_code == 11, r
    assert "backup.scratch_limit is too small: 2.0 MiB allowed" in r.stderr
    assert "nothing was done" in r.stderr
    assert json.loads(cli(["-c", str(cfg_path), "backup", "list", "--json"]).stdout) == []
