"""Issue #13 item 6, the WAL-gap half: a gap in the archive after a backup is not a bad backup.

One archived segment is deleted between two backup runs. The next run finds the gap while it
proves the previous backup: that backup restores and is consistent, so it is recorded
`validated` with how far the archive is complete ("archive complete up to segment X"), never
`failed`; the run takes a fresh full backup (the new one cannot be proven through the gap) and
exits 7 naming the gap. The earlier backup is listed with its cut-off PITR range, survives
prune, restores to a point before the gap with the right rows; a restore to a point inside the
gap exits 7 naming the missing segment. (It covers what test_backup_chain's
test_wal_gap_is_reported_by_name asserted, which it replaced: exit 7, the missing segment named, "gap".)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dbops.lab.harness import free_port
from dbops.storage import open_store
from dbops.storage.layout import Layout
from labkit import now_on, restored, rows, sql, stop, switch_and_archive

pytestmark = [pytest.mark.integration, pytest.mark.container]


def test_a_wal_gap_after_a_backup_keeps_it_restorable_up_to_the_gap(make_lab, cli, tmp_path):
    lab = make_lab(replicas=0)
    p = lab.primary
    cfg_path = tmp_path / "dbops.yaml"
    cfg_path.write_text(Path(lab.config_path).read_text().replace("keep_last: 7", "keep_last: 1"))
    sql(p, "CREATE TABLE orders (id int PRIMARY KEY, note text)")
    sql(p, "INSERT INTO orders VALUES (1, 'base')")
    r1 = cli(["-c", str(cfg_path), "backup", "--json"])
    assert r1.exit_code == 0, r1
    b1 = json.loads(r1.stdout)["backup_id"]

    sql(p, "INSERT INTO orders VALUES (10, 'A')")
    t_a = now_on(p)
    time.sleep(0.05)
    sql(p, "INSERT INTO orders VALUES (11, 'A2')")
    seg_a = switch_and_archive(lab)
    sql(p, "INSERT INTO orders VALUES (20, 'B')")
    time.sleep(0.05)
    t_b = now_on(p)
    time.sleep(0.05)
    seg_b = switch_and_archive(lab)
    sql(p, "INSERT INTO orders VALUES (30, 'C')")
    switch_and_archive(lab)
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    store.delete(layout.wal_key(seg_b))  # the gap: B's segment is lost from the archive

    r2 = cli(["-c", str(cfg_path), "backup", "--json"])
    assert r2.exit_code == 7, r2
    assert seg_b in r2.stderr and "gap" in r2.stderr and "full backup" in r2.stderr

    listed = json.loads(cli(["-c", str(cfg_path), "backup", "list", "--json"]).stdout)
    by_id = {r["backup_id"]: r for r in listed}
    assert len(listed) == 2, listed  # b1 and the fresh full backup taken after the gap
    b2 = next(r["backup_id"] for r in listed if r["backup_id"] != b1)
    assert by_id[b1]["status"] == "validated", by_id[b1]
    gap = by_id[b1]["wal_gap"]
    assert gap["missing"] == seg_b and gap["complete_until"] == seg_a, gap
    assert by_id[b1]["pitr_until"]["segment"] == seg_a and by_id[b1]["pitr_until"]["time"]
    assert by_id[b2]["kind"] == "full" and by_id[b2]["wal_gap"] is None
    table = cli(["-c", str(cfg_path), "backup", "list"])
    assert table.exit_code == 0 and f"gap from segment {seg_b}" in table.stdout, table

    st = cli(["-c", str(cfg_path), "status", "--json"])
    assert seg_b in st.stdout and "PITR to" in st.stdout, st

    # The next run validates the fresh full backup and prunes (keep_last 1, auto): b1 stays, as the
    # newest point before the gap (b2 as the newest validated one, the new backup as the newest).
    r3 = cli(["-c", str(cfg_path), "backup", "--json"])
    assert r3.exit_code == 0, r3
    res3 = json.loads(r3.stdout)
    assert res3["validated"]["backup_id"] == b2
    pruned = res3["pruned"]
    assert b1 in pruned["keep"] and "gap" in pruned["reasons"][b1], pruned
    assert pruned["keep"] == [b1, b2, res3["backup_id"]] and pruned["remove"] == [], pruned  # b2: newest validated

    # A point before the gap restores from b1, with the right rows.
    port = free_port()
    target = Path(lab.dir) / "before-gap"
    r = cli(["-c", str(cfg_path), "restore", "--to", t_a.isoformat(), "--target-dir", str(target), "--start",
             "--port", str(port), "--json"])
    assert r.exit_code == 0, r
    try:
        assert json.loads(r.stdout)["backup_id"] == b1
        assert rows(restored(lab, port), "orders") == ["base", "A"]
    finally:
        stop(target)

    # A point inside the gap (B committed, its segment lost; before b2): exit 7 naming the gap.
    r = cli(["-c", str(cfg_path), "restore", "--to", t_b.isoformat(), "--target-dir", str(Path(lab.dir) / "in-gap")])
    assert r.exit_code == 7, r
    assert seg_b in r.stderr and "missing" in r.stderr
    assert not (Path(lab.dir) / "in-gap").exists()
