"""Files nobody wrote since their content was known are not read again (dbops.repo.known): the
full backup's final store takes the copy's refs of files the throwaway server did not write, the
incremental's store the parent's refs of files replay did not write. Same refs as a store that
reads everything, byte-for-byte restores, and every file written after the recorded moment (in
place with the same size, by WAL creating or truncating it, or with only its ctime changed) read
again. Against a real lab (PostgreSQL 15, SeaweedFS, podman)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbops.ops.backup.target import capture_target
from dbops.ops.backup.validate import prove
from dbops.phases import Phases
from dbops.repo import manifest as mf
from dbops.repo.known import Known
from dbops.repo.restore import restore_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout
from labkit import backup_cli, sql
from test_backup_chain import assert_backup_holds, make_wide, pgbench
from test_backup_localbases import lab_with_tablespace, next_incremental, refs_of

pytestmark = [pytest.mark.integration, pytest.mark.container]


def path_of(node, rel: str) -> str:
    return sql(node, f"SELECT pg_relation_filepath('{rel}')")[0][0]


def table(node, name: str, rows: int, where: str = "") -> str:
    sql(node, f"CREATE TABLE {name} (id int, note text) WITH (autovacuum_enabled = off) {where}")
    sql(node, f"INSERT INTO {name} SELECT g, md5(g::text) FROM generate_series(1, {rows}) g")
    return path_of(node, name)


def test_known_files_are_taken_unread_and_written_ones_read(make_lab, cli):
    lab, env = lab_with_tablespace(make_lab)
    p = lab.primary
    pgbench(lab, "-i", "-s", "1", "-q")
    cold, cold2 = table(p, "cold", 20000), table(p, "cold2", 20000)
    spaced = table(p, "spaced", 20000, "TABLESPACE one")
    shrink = table(p, "shrink", 20000)
    wide = make_wide(p)
    sql(p, "CHECKPOINT")

    # The full backup: files the throwaway server did not write after the copy are not read again.
    r1, b1 = backup_cli(cli, lab.config_path, env=env)
    assert r1.exit_code == 0, r1
    assert b1["counts"]["unchanged_files"] > 10 and b1["counts"]["unchanged_bytes"] > 2**20, b1["counts"]

    # The incremental: wide's segment changes in place (same size), a table is created by WAL.
    pgbench(lab, "-c", "2", "-t", "100", "-n")
    sql(p, "UPDATE wide SET pad = 'changed 1' WHERE id = 1")
    sql(p, "UPDATE spaced SET note = 'changed' WHERE id % 1000 = 0")
    sql(p, "CREATE TABLE fresh AS SELECT g AS id FROM generate_series(1, 5000) g")
    r2, b2 = backup_cli(cli, lab.config_path, env=env)
    assert r2.exit_code == 0 and b2["kind"] == "incremental", r2
    c2 = b2["counts"]
    assert c2["unchanged_files"] > 10 and c2["unchanged_bytes"] > 2**20, c2
    assert c2["unchanged_bytes"] < b2["logical_size"]
    cfg = lab.config
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    m1, m2 = (mf.load(store, layout, b["backup_id"]) for b in (b1, b2))
    e1, e2 = ({e.path: e for e in m.entries()} for m in (m1, m2))
    assert e2[wide].size == e1[wide].size and e2[wide].chunks != e1[wide].chunks  # written in place: read
    assert e2[cold].chunks == e1[cold].chunks
    assert_backup_holds(lab, b2["backup_id"], "SELECT (SELECT pad FROM wide WHERE id = 1) = 'changed 1' "
                        "AND (SELECT count(*) FROM fresh) = 5000 "
                        "AND (SELECT count(*) FROM spaced WHERE note = 'changed') = 20")

    # b2 proved here; the next incremental stored from the proved folder with and without the records.
    sql(p, "UPDATE wide SET pad = 'changed 40' WHERE id = 40")
    sql(p, "DELETE FROM shrink WHERE id > 100")
    sql(p, "VACUUM shrink")  # replay truncates its file
    sql(p, "UPDATE spaced SET note = 'again' WHERE id % 700 = 0")
    with prove(cfg, store, layout, m2, Phases(), run_id="unchanged", name="unchanged",
               target=lambda: capture_target(cfg, archive_wait=60, store=store, layout=layout)) as proof:
        data, known = proof.data, proof.known
        assert isinstance(known, Known) and len(known) > 10
        size = {rel: (data / rel).stat().st_size for rel in (cold, cold2, wide, shrink, spaced)}
        assert size[shrink] < e2[shrink].size
        # Hands after the server: cold2's ctime only (its mtime put back); a same-size edit of a file
        # outside the relations (hashed whatever its pages say).
        st = (data / cold2).stat()
        os.utime(data / cold2, ns=(st.st_atime_ns, st.st_mtime_ns))
        conf = data / "postgresql.auto.conf"
        text = conf.read_bytes()
        conf.write_bytes(text.replace(b"Do not", b"DO NOT", 1))
        assert len(conf.read_bytes()) == len(text) and conf.read_bytes() != text
        assert known.usable()
        assert known.unchanged(cold, str(data / cold), size[cold])
        for rel in (cold2, wide, shrink):
            assert not known.unchanged(rel, str(data / rel), size[rel]), rel
        assert not known.unchanged(spaced, str(data / spaced), size[spaced])  # replay wrote it (in a tablespace)
        assert not known.unchanged("postgresql.auto.conf", str(conf), len(text))

        store_next, ts = next_incremental(cfg, store, layout, proof, m2, lab.dir)
        skipping, reading = store_next(known=known), store_next(known=None)
        assert refs_of(skipping) == refs_of(reading)
        assert skipping.counts["unchanged_files"] > 10 and reading.counts["unchanged_files"] == 0
        assert skipping.counts["hashed_bytes"] <= reading.counts["hashed_bytes"]
        assert skipping.counts["chunks"] == reading.counts["chunks"]
        # Every file restores byte for byte (the tablespace's included).
        into = lab.dir / "r-unchanged"
        folders = {t.oid: str(lab.dir / f"r-unchanged-ts{t.oid}") for t in ts}
        restore_snapshot(store, layout, skipping, str(into), parallel=2, owner="postgres", durable=False,
                         tablespace_dirs=folders)
        n = 0
        for e in skipping.entries():
            if e.type == mf.FILE:
                src = Path(next(d for t, d in ts.items() if e.path.startswith(f"pg_tblspc/{t.oid}/"))) / \
                    e.path.split("/", 2)[2] if e.path.startswith("pg_tblspc/") else data / e.path
                assert (into / e.path).read_bytes() == src.read_bytes(), e.path
                n += 1
        assert n > 100
        assert (into / "postgresql.auto.conf").read_bytes() == conf.read_bytes()
