"""The incremental's page-delta bases taken from the restored folder (pages saved before the
throwaway server ran) instead of fetched back from S3: same stored deltas, byte-for-byte restores,
a fall back for what was not saved, and a damaged base in S3 still stopping the S3 path. Against a
real lab (PostgreSQL 15, SeaweedFS, podman)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbops import proc
from dbops.errors import ValidationError
from dbops.ops.backup import basesave
from dbops.ops.backup.target import capture_target
from dbops.ops.backup.validate import prove
from dbops.phases import Phases
from dbops.repo import blocks, catalog, codec, pgstate
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot
from dbops.repo.savedpages import SavedPages, file_index, offsets_of
from dbops.repo.store import store_snapshot
from dbops.storage import open_store
from dbops.storage.layout import Layout
from labkit import backup_cli, same_zstd, sql
from test_backup_chain import make_wide, pgbench

pytestmark = [pytest.mark.integration, pytest.mark.container]


def refs_of(m: mf.Manifest) -> dict[str, list[tuple]]:
    """What each file's blocks are, packs aside: (sha256, mask, base's sha256, length)."""
    return {e.path: [(c.hash, c.mask, c.base.hash if c.base else None, c.raw) for c in e.chunks]
            for e in m.entries() if e.type == mf.FILE}


def restored_equals(store, layout, m: mf.Manifest, data: Path, into: Path, tablespaces: dict[int, str]) -> int:
    """Restore m into a new folder and compare every relation file with the stopped folder it was
    stored from, byte for byte; returns how many files were compared."""
    restore_snapshot(store, layout, m, str(into), parallel=2, owner="postgres", durable=False,
                     tablespace_dirs={oid: str(into.parent / f"{into.name}-ts{oid}") for oid in tablespaces})
    n = 0
    for e in m.entries():
        if e.type == mf.FILE and blocks.is_main_fork(e.path):
            assert (into / e.path).read_bytes() == (data / e.path).read_bytes(), e.path
            n += 1
    return n


def next_incremental(cfg, store, layout, proof, parent: mf.Manifest, tmp: Path):
    """(store(**kw): the next incremental stored from a proved folder on parent as `dbops backup` stores
    it, keyword arguments passed on to store_snapshot; the folder's tablespaces {tablespace: folder})."""
    data = proof.data
    ts = proof.tablespaces.snapshot(data, proof.validation.tablespace_names)
    pg = pgstate.read(str(data), consistent_lsn=proof.target.lsn, consistent_time=proof.target.time)

    def store_next(**kw) -> mf.Manifest:
        return store_snapshot(store, layout, str(data), backup_id=catalog.new_backup_id(), parent_manifests=(parent,),
                              compression=cfg.compression, chunk_size=cfg.backup.chunk_size,
                              pack_size=cfg.backup.pack_size, parallel=2, pg=pg, unchanged_lsn=parent.pg.redo_lsn,
                              tmp_dir=str(tmp), tablespaces=ts, **kw)

    return store_next, ts


def lab_with_tablespace(make_lab):
    """A lab of its own (no replica) with a tablespace ``one``; (lab, env with its own lock folder)."""
    lab = make_lab(replicas=0)
    live = lab.dir / "live"
    live.mkdir(mode=0o700)
    proc.run(["chown", "postgres:postgres", str(live)])
    sql(lab.primary, f"CREATE TABLESPACE one LOCATION '{live}'")
    return lab, {"DBOPS_LOCK_DIR": str(lab.dir / "run")}


def frames_of(m: mf.Manifest) -> dict[str, list[tuple]]:
    """refs_of with each delta's stored length: deltas written alike have the same frames."""
    return {e.path: [(c.hash, c.mask, c.base.hash if c.base else None, c.raw, c.length if c.mask else None)
                     for c in e.chunks] for e in m.entries() if e.type == mf.FILE}


def test_local_bases_store_what_fetched_bases_store(make_lab, cli, monkeypatch):
    lab, env = lab_with_tablespace(make_lab)
    p = lab.primary
    sql(p, "CREATE TABLE t (id int, note text) WITH (fillfactor = 50, autovacuum_enabled = off) TABLESPACE one")
    sql(p, "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 40000) g")
    pgbench(lab, "-i", "-s", "1", "-q")
    wide = make_wide(p)
    r1, b1 = backup_cli(cli, lab.config_path, env=env)
    assert r1.exit_code == 0, r1

    # b2 on the full b1: its deltas' bases are b1's whole blocks, saved from the restored b1.
    pgbench(lab, "-c", "2", "-t", "200", "-n")
    sql(p, "UPDATE wide SET pad = 'changed 1' WHERE id = 1")  # page 0 of wide's first block
    sql(p, "UPDATE t SET note = 'changed' WHERE id % 500 = 0")
    r2, b2 = backup_cli(cli, lab.config_path, env=env)
    assert r2.exit_code == 0 and b2["kind"] == "incremental", r2
    assert b2["counts"]["local_bases"] > 0 and b2["counts"]["delta_chunks"] > 0, b2["counts"]
    assert b2["timings"]["bases_save"] >= 0 and b2["timings"]["bases_predict"] > 0, b2["timings"]

    # b2 proved again here, and the next incremental stored from the proved folder four ways.
    pgbench(lab, "-c", "2", "-t", "100", "-n")
    sql(p, "UPDATE wide SET pad = 'changed 40' WHERE id = 40")  # page 1: b2's ref of that block is a delta
    sql(p, "UPDATE t SET note = 'again' WHERE id % 700 = 0")
    cfg = lab.config
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    m2 = mf.load(store, layout, b2["backup_id"])
    phases = Phases()
    with prove(cfg, store, layout, m2, phases, run_id="localbases", name="localbases",
               target=lambda: capture_target(cfg, archive_wait=60, store=store, layout=layout),
               save_bases=True) as proof:
        data, saved = proof.data, proof.saved
        assert saved is not None and saved.saved > 0
        # The prediction stops at its limit (the rest of the pages' bases are fetched): 3 pages, each once.
        every, few = basesave.predict(data.parent / "wal"), basesave.predict(data.parent / "wal", limit=3)
        assert not every.full and sum(len(v) for v in every.segments().values()) >= saved.saved > 3
        assert few.full and sum(len(v) for v in few.segments().values()) == 3
        oid = next(t.oid for t in m2.tablespaces)
        assert any(k.startswith(str(proof.tablespaces.folder(oid))) for k in saved.index)  # pages saved there too
        store_next, ts = next_incremental(cfg, store, layout, proof, m2, lab.dir)

        def put(saved_pages: SavedPages | None) -> mf.Manifest:
            return store_next(saved=saved_pages)

        local, fetched = put(saved), put(None)
        assert local.counts["local_bases"] > 0 and local.counts["delta_chunks"] > 0
        # wide's first block: b2's ref is a delta, so its base (b1's block) came from S3, not the folder
        assert local.counts["base_blocks"] > 0 and local.counts["base_requests"] > 0
        assert local.counts["base_blocks"] + local.counts["local_bases"] == fetched.counts["base_blocks"]
        assert "local_bases" not in fetched.counts
        assert refs_of(local) == refs_of(fetched)  # the same deltas, the same pages
        # ... and the same frames, whichever way zstd was called (a context kept per thread, or
        # backports.zstd's compressor made for each delta: the fall back)
        assert frames_of(local) == frames_of(fetched)
        with monkeypatch.context() as mp:
            mp.setattr(codec, "zstd_compress_functions", lambda: None)
            slow = put(saved)
        if same_zstd():  # both writers bundle one zstd release: the same bytes
            assert frames_of(slow) == frames_of(local) and slow.stored_bytes == local.stored_bytes
        assert refs_of(slow) == refs_of(local)
        w_local = next(e for e in local.entries() if e.path == wide).chunks
        assert w_local[0].mask == 0b11 and w_local[0].on_base

        # Pages the prediction named but the side file lacks: those deltas fall back to S3.
        fewer = SavedPages(saved.path, {k: file_index({pg_no: at for pg_no, at in offsets_of(v) if pg_no % 2 == 0})
                                        for k, v in saved.index.items()})
        try:
            partial = put(fewer)
        finally:
            fewer.close()
        assert partial.counts["local_base_misses"] > local.counts["local_base_misses"]
        assert partial.counts["local_bases"] < local.counts["local_bases"]
        assert refs_of(partial) == refs_of(fetched)

        # Every relation file restores byte for byte (the tablespace's included) from each.
        for m, name in ((local, "r-local"), (partial, "r-partial")):
            assert restored_equals(store, layout, m, data, lab.dir / name, {t.oid: d for t, d in ts.items()}) > 10

        # A base damaged in S3 after the download stops the store that fetches it (exit 7).
        before = {c.hash for e in m2.entries() for c in e.chunks}
        base = next(c.base for e in fetched.entries() for c in e.chunks
                    if c.mask and c.hash not in before and e.path != wide)  # a delta of this store, not b2's
        key = layout.pack(base.pack)
        good = store.get(key)
        bad = bytearray(good)
        bad[base.offset:base.offset + base.length] = bytes(b ^ 0xFF for b in good[base.offset:base.offset + base.length])
        store.put(key, bytes(bad))
        try:
            with pytest.raises(ValidationError) as err:
                put(None)
        finally:
            store.put(key, good)
        assert err.value.exit_code == 7 and key in (err.value.detail or "")
    assert not os.path.exists(saved.path)  # in the scratch folder, removed with it
