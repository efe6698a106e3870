"""`dbops backup`: the validated chain, against a real lab (PostgreSQL, SeaweedFS, podman containers)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dbops import proc
from dbops.repo import catalog
from dbops.repo import manifest as mf
from dbops.config import Assertion
from dbops.errors import ValidationError
from dbops.ops import catalogview
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.runtime.engine import LABEL, LABEL_PID
from dbops.storage import open_store
from dbops.storage.layout import Layout
from labkit import switch_and_archive

pytestmark = [pytest.mark.integration, pytest.mark.container]


def sql(node, statement: str):
    with pgconn.session(node) as c:
        cur = c.execute(statement)
        return cur.fetchall() if cur.description else None


def mark(node, batch: int, rows: int = 10) -> None:
    sql(node, "CREATE TABLE IF NOT EXISTS marks (batch int, n int, note text)")
    sql(node, f"INSERT INTO marks SELECT {batch}, g, md5(g::text) FROM generate_series(1, {rows}) g")


def pgbench(lab, *args: str) -> None:
    env = {"PGPASSFILE": str(lab.dir / "pgpass"), "PGHOST": "127.0.0.1", "PGPORT": str(lab.primary.port),
           "PGUSER": "postgres"}
    proc.run([binaries.binary("pgbench"), *args, "postgres"], env=env, user="postgres", timeout=300)


def store_of(lab):
    return open_store(lab.config.storage), Layout(lab.config.storage.prefix)


def backup(cli, lab, *extra):
    r = cli(["-c", lab.config_path, "backup", "--json", *extra])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def make_wide(node) -> str:
    """A 1.9 MB table of frozen rows (about 34 a page, so its file is stored in 32 KiB blocks of
    4 pages) that only the test changes; returns its file's path in the data folder."""
    sql(node, "CREATE TABLE wide (id int, pad text) WITH (fillfactor = 100, autovacuum_enabled = off)")
    sql(node, "INSERT INTO wide SELECT g, repeat('w', 200) FROM generate_series(1, 8000) g")
    sql(node, "VACUUM (FREEZE) wide")
    sql(node, "CHECKPOINT")
    return sql(node, "SELECT pg_relation_filepath('wide')")[0][0]


def blocks_of(lab, backup_id: str, path: str) -> tuple:
    store, layout = store_of(lab)
    return next(e for e in mf.load(store, layout, backup_id).entries() if e.path == path).chunks


def assert_backup_holds(lab, backup_id: str, sql_true: str) -> None:
    """Restore the backup on its own, start it, and check an assertion about its data."""
    cfg = lab.config
    v = dataclasses.replace(cfg.backup.validation, assertions=(Assertion(name="data", sql=sql_true),))
    cfg = dataclasses.replace(cfg, backup=dataclasses.replace(cfg.backup, validation=v))
    store, layout = store_of(lab)
    catalogview.restore_and_start(cfg, store, layout, mf.load(store, layout, backup_id))


def test_three_chained_runs_validate_each_previous(make_lab, cli):
    lab = make_lab(replicas=0)
    pgbench(lab, "-i", "-s", "1", "-q")
    wide = make_wide(lab.primary)
    mark(lab.primary, 1)
    r1, b1 = backup(cli, lab)
    assert r1.exit_code == 0, r1
    assert b1["kind"] == "full" and b1["validated"] is None

    pgbench(lab, "-c", "2", "-t", "200", "-n")
    sql(lab.primary, "UPDATE wide SET pad = 'changed 1' WHERE id = 1")  # page 0
    mark(lab.primary, 2)
    r2, b2 = backup(cli, lab)
    assert r2.exit_code == 0, r2
    assert b2["kind"] == "incremental" and b2["parent_id"] == b1["backup_id"]
    assert b2["validated"]["backup_id"] == b1["backup_id"] and b2["validated"]["ok"]
    checks = {c["check"] for c in b2["validated"]["checks"]}
    assert {"consistency", "read_tables", "pg_checksums"} <= checks
    assert b2["validated"]["timings"]["start"] > 0 and b2["validated"]["timings"]["replay"] >= 0

    pgbench(lab, "-c", "2", "-t", "10", "-n")
    sql(lab.primary, "UPDATE wide SET pad = 'changed 40' WHERE id = 40")  # page 1
    mark(lab.primary, 3)
    r3, b3 = backup(cli, lab)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == b2["backup_id"]
    # Page deltas: b2 stores page 0 of wide's first block on b1's block; b3 (validated b2, so b2's
    # deltas were restored) stores pages 0 and 1 on that same base: depth one, the masks' union.
    assert b2["counts"]["delta_chunks"] > 0 and b3["counts"]["delta_chunks"] > 0
    w1, w2, w3 = (blocks_of(lab, b["backup_id"], wide) for b in (b1, b2, b3))
    assert w1[0].mask == 0 and w2[0].mask == 0b01 and w3[0].mask == 0b11
    assert w2[0].base == w3[0].base == w1[0]._replace(hash=w1[0].hash[:32])  # a base keeps 128 bits of sha256
    assert w2[0].on_base and w3[0].on_base  # compressed against that base
    # b2's bases: b1's whole blocks, saved from the restored b1 before replay (no fetch needed for
    # them); b3's base of wide's first block is under b2's delta, so fetched back from storage.
    assert b2["counts"]["local_bases"] > 0
    assert b3["counts"]["base_requests"] > 0
    assert b3["counts"]["base_blocks"] + b3["counts"]["local_bases"] >= b3["counts"]["delta_chunks"]
    assert w3[1:4] == w1[1:4]  # untouched blocks: b1's refs, taken unread
    # Incremental: after a few transactions the third stores far less than the whole database,
    # and most of its chunks are the second's.
    assert b3["stored_bytes"] < b1["stored_bytes"] / 2
    assert b3["counts"]["reused_chunks"] > 2 * b3["counts"]["new_chunks"]

    r = cli(["-c", lab.config_path, "backup", "list", "--json"])
    rows = json.loads(r.stdout)
    assert [x["backup_id"] for x in rows] == [b1["backup_id"], b2["backup_id"], b3["backup_id"]]
    assert [x["status"] for x in rows] == ["validated", "validated", "stored"]
    assert rows[0]["restore_seconds"] > 0

    # The validation ran in a real container: the status record says so through its phases.
    store, layout = store_of(lab)
    st = catalog.latest_status(store, layout, b1["backup_id"])
    assert st.state == "validated" and st.detail["by_backup"] == b2["backup_id"]

    # Each backup restored on its own holds exactly the data written before it.
    assert_backup_holds(lab, b1["backup_id"], "SELECT count(*) = 10 AND max(batch) = 1 FROM marks")
    assert_backup_holds(lab, b2["backup_id"], "SELECT count(*) = 20 AND max(batch) = 2 FROM marks")
    assert_backup_holds(lab, b3["backup_id"], "SELECT (SELECT count(*) = 30 AND max(batch) = 3 FROM marks) AND "
                        "(SELECT string_agg(pad, ',' ORDER BY id) FROM wide WHERE id IN (1, 40)) = "
                        "'changed 1,changed 40' AND (SELECT count(*) = 8000 FROM wide)")
    with pytest.raises(ValidationError):
        assert_backup_holds(lab, b1["backup_id"], "SELECT count(*) = 20 FROM marks")

    r = cli(["-c", lab.config_path, "backup", "show", b2["backup_id"], "--json"])
    shown = json.loads(r.stdout)
    assert shown["parent_id"] == b1["backup_id"] and shown["status"] == "validated"

    # A damaged delta frame (b3's pack) and a damaged base frame (b1's pack) are both found and named.
    for ref in (w3[0], w3[0].base):
        key = layout.pack(ref.pack)
        good = store.get(key)
        bad = bytearray(good)
        bad[ref.offset + ref.length // 2] ^= 0xFF
        store.put(key, bytes(bad))
        r = cli(["-c", lab.config_path, "verify", b3["backup_id"]])
        store.put(key, good)
        assert r.exit_code == 7 and key in r.stdout, r
    assert cli(["-c", lab.config_path, "verify", b3["backup_id"]]).exit_code == 0

    # b4 (validating b3) stores a delta of wide's first block again; a restore meets it damaged as it
    # applies the deltas it holds over their bases (dbops.repo.held): it names the object and falls
    # back to the validated backup b3, every segment after it archived.
    sql(lab.primary, "UPDATE wide SET pad = 'changed 2' WHERE id = 2")
    r4, b4 = backup(cli, lab)
    assert r4.exit_code == 0 and b4["validated"]["backup_id"] == b3["backup_id"], r4
    w4 = blocks_of(lab, b4["backup_id"], wide)
    assert w4[0].mask and w4[0].on_base
    switch_and_archive(lab)
    key = layout.pack(w4[0].pack)
    good = store.get(key)
    bad = bytearray(good)
    bad[w4[0].offset + w4[0].length // 2] ^= 0xFF
    store.put(key, bytes(bad))
    try:
        target = lab.dir / "restore-damaged-delta"
        r = cli(["-c", lab.config_path, "restore", "--to", "latest", "--target-dir", str(target), "--json"])
    finally:
        store.put(key, good)
    assert r.exit_code == 0, r
    d = json.loads(r.stdout)
    assert d["backup_id"] == b3["backup_id"] and d["fell_back_from"]["backup_id"] == b4["backup_id"]
    assert key in d["fell_back_from"]["reason"] and "damaged" in d["fell_back_from"]["reason"]
    assert (target / "PG_VERSION").exists()


def test_corrupted_pack_fails_validation_then_heals(make_lab, cli):
    lab = make_lab(replicas=0)
    mark(lab.primary, 1, rows=2000)
    r1, b1 = backup(cli, lab)
    assert r1.exit_code == 0, r1
    store, layout = store_of(lab)
    m = mf.load(store, layout, b1["backup_id"])
    pack = sorted(m.packs())[0]
    key = layout.pack(pack)
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0xFF
    store.put(key, bytes(data))

    r = cli(["-c", lab.config_path, "verify", "--all"])
    assert r.exit_code == 7, r
    assert key in r.stdout and b1["backup_id"] in r.output

    mark(lab.primary, 2)
    r2 = cli(["-c", lab.config_path, "backup"])
    assert r2.exit_code == 7, r2
    assert b1["backup_id"] in r2.stderr and key in r2.stderr
    assert "healed" in r2.stderr

    rows = json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout)
    assert rows[0]["backup_id"] == b1["backup_id"] and rows[0]["status"] == "failed"
    assert len(rows) == 2 and rows[1]["kind"] == "full" and rows[1]["status"] == "stored"
    # The healed backup does not reuse the damaged pack.
    healed = mf.load(store, layout, rows[1]["backup_id"])
    assert pack not in healed.packs()
    # And the chain goes on from the healed backup.
    r3, b3 = backup(cli, lab)
    assert r3.exit_code == 0, r3
    assert b3["validated"]["backup_id"] == rows[1]["backup_id"]


def _containers(pid: int) -> list[str]:
    """The containers a dbops process (pid) started: its own label, so another run's containers on
    the same machine (another lab, another test run) never count."""
    r = subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"label={LABEL}=1", "--filter",
                        f"label={LABEL_PID}={pid}"], capture_output=True, text=True, env=dict(os.environ))
    return r.stdout.split()


def test_concurrent_runs_and_sigkill(make_lab, cli, dbops_bin):
    lab = make_lab(replicas=0)
    pgbench(lab, "-i", "-s", "1", "-q")
    r1, _ = backup(cli, lab)
    assert r1.exit_code == 0, r1
    env = {**os.environ, "DBOPS_CONFIG": lab.config_path}
    scratch = Path(lab.config.backup.scratch_dir)

    # Two concurrent runs: the second gets the lock code and names the holder.
    a = subprocess.Popen([dbops_bin, "backup"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not any(scratch.glob("run-*")) and time.time() < deadline:
            time.sleep(0.05)
        b = subprocess.run([dbops_bin, "backup"], env=env, capture_output=True, text=True, timeout=120)
        assert b.returncode == 6, b.stderr
        assert "is held" in b.stderr and f"pid {a.pid}" in b.stderr
        out, err = a.communicate(timeout=300)
        assert a.returncode == 0, err
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()

    # A run killed with SIGKILL mid-way (while its container runs): the next run succeeds and cleans up.
    k = subprocess.Popen([dbops_bin, "backup"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not _containers(k.pid):
        time.sleep(0.05)
    assert _containers(k.pid), "the run never started its container"
    os.kill(k.pid, signal.SIGKILL)
    k.wait()
    assert any(scratch.glob("run-*")), "the killed run should have left its scratch folder"
    r = subprocess.run([dbops_bin, "backup", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(scratch.glob("run-*"))
    assert not _containers(k.pid), "the next run should have removed the killed run's container"
    rows = json.loads(cli(["-c", lab.config_path, "backup", "list", "--json"]).stdout)
    assert len(rows) == 3


def test_prune_keeps_what_kept_backups_need(make_lab, cli, tmp_path):
    lab = make_lab(replicas=0)
    wide = make_wide(lab.primary)
    ids = []
    for i in range(4):
        mark(lab.primary, i, rows=500)
        if i in (1, 2):  # pages 0, then 1 of wide's first block: the third backup's delta is on the first's block
            sql(lab.primary, f"UPDATE wide SET pad = 'changed' WHERE id = {1 if i == 1 else 40}")
        r, b = backup(cli, lab)
        assert r.exit_code == 0, r
        ids.append(b["backup_id"])
    cfg_path = tmp_path / "dbops.yaml"
    cfg_path.write_text(Path(lab.config_path).read_text().replace("keep_last: 7", "keep_last: 2"))
    store, layout = store_of(lab)
    wal_before = {o.key for o in store.list(layout.wal_prefix())}
    delta = blocks_of(lab, ids[2], wide)[0]
    first = blocks_of(lab, ids[0], wide)[0]
    assert delta.mask == 0b11 and delta.on_base and delta.base == first._replace(hash=first.hash[:32])
    assert store.head(layout.pack(delta.base.pack)).metadata.get("backup-id") == ids[0]

    r = cli(["-c", str(cfg_path), "backup", "prune", "--json"])
    preview = json.loads(r.stdout)
    assert r.exit_code == 0 and preview["remove"] == ids[:2] and preview["keep"] == ids[2:]
    assert {b["backup_id"] for b in json.loads(cli(["-c", str(cfg_path), "backup", "list", "--json"]).stdout)} == set(ids)

    r = cli(["-c", str(cfg_path), "backup", "prune", "--confirm", "--json"])
    assert r.exit_code == 0, r
    done = json.loads(r.stdout)
    assert done["wal_segments"] > 0
    rows = json.loads(cli(["-c", str(cfg_path), "backup", "list", "--json"]).stdout)
    assert [x["backup_id"] for x in rows] == ids[2:]
    wal_after = {o.key for o in store.list(layout.wal_prefix())}
    assert wal_after < wal_before
    # The pruned full backup's pack holding the base of a kept backup's page delta stays.
    assert store.head(layout.pack(delta.base.pack)) is not None
    # What remains restores and starts, with the data it had; and the chain goes on.
    r = cli(["-c", str(cfg_path), "verify", "--all", "--restore"])
    assert r.exit_code == 0, r
    assert_backup_holds(lab, ids[2], "SELECT count(*) = 1500 FROM marks")
    r, b = backup(cli, lab)
    assert r.exit_code == 0 and b["validated"]["backup_id"] == ids[3]
