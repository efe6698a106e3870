"""The chunk store against real SeaweedFS S3 (the lab's) with a real, initdb'ed PostgreSQL 15
data folder: store, verify, restore, start the restored copy with pg_ctl and query it;
then an incremental snapshot stores only what changed and restores on its own."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path

import pytest
import zstandard

from dbops import proc
from dbops.repo import blocks, catalog, codec
from dbops.repo import held as heldmod
from dbops.repo import manifest as mf
from dbops.repo.restore import restore_snapshot, verify_backup
from dbops.repo.store import store_snapshot
from dbops.config import CompressionSettings
from dbops.errors import CommandError, ValidationError
from dbops.pg import binaries
from dbops.pg.lsn import segment_of_lsn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = pytest.mark.integration

PG = "postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL on a unix socket in its own folder."""

    def __init__(self, data: Path, sock: Path):
        self.data, self.sock, self.port = data, sock, free_port()

    def conf(self) -> None:
        with open(self.data / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = ''\nunix_socket_directories = '{self.sock}'\n"
                    "shared_buffers = 16MB\nmax_wal_size = 64MB\n")

    def start(self) -> None:
        logfile = self.data.parent / f"{self.data.name}.log"
        try:
            proc.run([binaries.binary("pg_ctl"), "-D", self.data, "-l", logfile, "-w", "-t", "60", "start"],
                     user=PG, timeout=90)
        except CommandError:
            pytest.fail(f"PostgreSQL in {self.data} did not start:\n" + logfile.read_text()[-3000:])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            proc.run([binaries.binary("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"], user=PG, timeout=90)

    def sql(self, query: str) -> str:
        r = proc.run([binaries.binary("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.sock,
                      "-p", self.port, "-d", "postgres", "-c", query], user=PG, timeout=60)
        return r.stdout.strip()


@pytest.fixture
def workdir(base_dir):
    d = base_dir / f"store-s3-{secrets.token_hex(3)}"
    d.mkdir()
    shutil.chown(d, PG, PG)
    clusters: list[Cluster] = []
    yield d, clusters
    for c in clusters:
        try:
            c.stop()
        except CommandError as e:  # keep stopping the others
            print(f"stop {c.data}: {e}")
    shutil.rmtree(d, ignore_errors=True)


def initdb_started(d: Path, clusters: list[Cluster]) -> Cluster:
    """A new cluster (initdb, data checksums) in d/src, started."""
    src = Cluster(d / "src", d)
    clusters.append(src)
    proc.run([binaries.binary("initdb"), "-D", src.data, "-k", "-U", PG, "--auth=trust", "--locale=C"],
             user=PG, timeout=180)
    src.conf()
    src.start()
    return src


def stopped_and_stored(lab, src: Cluster, name: str):
    """src stopped and stored whole under a new prefix of the lab's bucket: (store, layout, the
    store's settings, the manifest)."""
    src.stop()
    store = open_store(lab.config.storage)
    layout = Layout(f"test-{name}-{secrets.token_hex(4)}")
    kw = {"compression": CompressionSettings("zstd", 3), "chunk_size": 8192, "pack_size": 4 << 20, "parallel": 2}
    return store, layout, kw, store_snapshot(store, layout, str(src.data), backup_id=catalog.new_backup_id(), **kw)


def restored_cluster(store, layout, m, d: Path, name: str, clusters: list[Cluster]) -> Cluster:
    stats = restore_snapshot(store, layout, m, str(d / name), parallel=4, owner=PG)
    assert stats.logical_bytes == m.logical_size and stats.requests >= 1
    c = Cluster(d / name, d)
    clusters.append(c)
    (c.data / "postgresql.auto.conf").write_text((c.data / "postgresql.auto.conf").read_text().replace(
        "port = ", "# port = "))
    c.conf()
    return c


def test_real_data_folder_round_trip_starts_and_incremental_stores_only_changes(lab, workdir):
    d, clusters = workdir
    src = initdb_started(d, clusters)
    src.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 200000) i")
    src.sql("CREATE UNLOGGED TABLE scratch AS SELECT i FROM generate_series(1, 1000) i")
    src.sql("CHECKPOINT")
    want = src.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t")
    src.stop()

    store = open_store(lab.config.storage)
    layout = Layout(f"test-store-{secrets.token_hex(4)}")
    kw = {"compression": CompressionSettings("zstd", 3), "chunk_size": 8192, "pack_size": 4 << 20, "parallel": 4}
    b1 = catalog.new_backup_id()
    m1 = store_snapshot(store, layout, str(src.data), backup_id=b1, meta={"test": "round-trip"}, **kw)
    assert m1.pg.pg_version == "15" and m1.pg.data_checksums and m1.pg.timeline == 1
    assert m1.pg.system_identifier.isdigit() and m1.pg.redo_lsn <= m1.pg.consistent_lsn
    assert 1 < m1.counts["packs"] < 20 and m1.stored_bytes < m1.logical_size
    # pg_wal carries just the segment with the shutdown checkpoint, so the copy starts on its own.
    wal = [f.path for f in m1.files if f.path.startswith("pg_wal/0")]
    assert wal == [f"pg_wal/{segment_of_lsn(1, m1.pg.redo_lsn)}"]
    assert [b.backup_id for b in catalog.list_backups(store, layout)] == [b1]

    report = verify_backup(store, layout, mf.load(store, layout, b1), parallel=4)
    assert report.ok and report.chunks == m1.counts["new_chunks"]

    r1 = restored_cluster(store, layout, mf.load(store, layout, b1), d, "r1", clusters)
    assert os.stat(r1.data).st_uid == os.stat(src.data).st_uid
    r1.start()
    assert r1.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t") == want
    assert r1.sql("SELECT count(*) FROM scratch") == "0"  # unlogged: reset, as after recovery
    assert r1.sql("SHOW data_checksums") == "on"
    r1.stop()

    # Change a little, snapshot again against the first: only changed chunks are stored.
    src.start()
    src.sql("UPDATE t SET h = 'changed' WHERE i % 20000 = 0")
    src.sql("CHECKPOINT")
    want2 = src.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t")
    src.stop()
    b2 = catalog.new_backup_id()
    m2 = store_snapshot(store, layout, str(src.data), backup_id=b2, parent_manifests=[m1], meta={}, **kw)
    assert m2.parent_id == b1
    assert m2.stored_bytes < m1.stored_bytes / 4, (m2.stored_bytes, m1.stored_bytes)
    assert m2.counts["reused_chunks"] > m2.counts["new_chunks"]
    assert [b.backup_id for b in catalog.list_backups(store, layout)] == [b1, b2]

    r2 = restored_cluster(store, layout, mf.load(store, layout, b2), d, "r2", clusters)
    r2.start()
    assert r2.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t") == want2
    r2.stop()

    # A damaged pack on real S3 is named by restore and by verify.
    f = next(f for f in m2.files if f.path.startswith("base/") and any(c.pack for c in f.chunks))
    c = next(c for c in f.chunks if c.pack)
    key = layout.pack(c.pack)
    data = bytearray(store.get(key))
    data[c.offset] ^= 0xFF
    store.delete(key)
    store.put(key, bytes(data))
    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, m2, str(d / "r3"), parallel=4)
    assert key in ei.value.render() and b2 in ei.value.message
    rep = verify_backup(store, layout, m2, parallel=4)
    assert [p.key for p in rep.problems] == [key]

    store.delete_many([o.key for o in store.list(layout.root)])


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_page_lsn_shortcut_stores_exactly_what_full_hashing_stores(lab, workdir):
    """Blocks whose pages are all no newer than the parent's REDO point are taken from the parent
    unhashed, and blocks with a few newer pages are stored as page deltas on the parent's blocks;
    on a real cluster that changed in between, that restores exactly what hashing every block
    stores: both backups restore to identical folders, byte for byte."""
    d, clusters = workdir
    src = initdb_started(d, clusters)
    src.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 400000) i")  # ~29 MB
    src.sql("CREATE INDEX t_i ON t (i)")
    src.sql("VACUUM t")
    src.sql("CHECKPOINT")
    store, layout, kw, m1 = stopped_and_stored(lab, src, "lsn")

    src.start()  # scattered changes, new pages, hint bits, a new relation, FSM and VM changes
    src.sql("UPDATE t SET h = 'changed' WHERE i % 3000 = 0")
    src.sql("INSERT INTO t SELECT i, 'new' FROM generate_series(400001, 420000) i")
    src.sql("DELETE FROM t WHERE i BETWEEN 1000 AND 1100")
    src.sql("VACUUM t")
    src.sql("CREATE TABLE u AS SELECT i FROM generate_series(1, 1000) i")
    src.sql("SELECT count(*) FROM t")
    src.sql("CHECKPOINT")
    want = src.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t")
    src.stop()
    fast = store_snapshot(store, layout, str(src.data), backup_id=catalog.new_backup_id(), parent_manifests=[m1],
                          unchanged_lsn=m1.pg.redo_lsn, **kw)
    full = store_snapshot(store, layout, str(src.data), backup_id=catalog.new_backup_id(), parent_manifests=[m1],
                          **kw)
    assert fast.counts["lsn_reused_chunks"] > fast.counts["chunks"] // 2, fast.counts
    assert fast.counts["hashed_bytes"] < full.counts["hashed_bytes"] // 2, (fast.counts, full.counts)
    # Blocks with a few changed pages are stored as page deltas: fewer bytes than whole blocks.
    assert fast.counts["delta_chunks"] > 0 and full.counts["delta_chunks"] == 0, fast.counts
    assert fast.counts["new_chunks"] + fast.counts["delta_chunks"] >= full.counts["new_chunks"] > 0
    assert fast.counts["new_chunks"] < full.counts["new_chunks"]
    assert fast.stored_bytes < full.stored_bytes, (fast.stored_bytes, full.stored_bytes)
    deltas = [c for f in mf.load(store, layout, fast.backup_id).entries() for c in f.chunks if c.mask]
    assert deltas and all(c.base.pack in m1.packs() for c in deltas)
    # Format 5: each delta compressed against its base, fetched back from the S3 server.
    assert all(c.on_base and c.frame_raw == c.stored_raw for c in deltas)
    assert fast.counts["base_blocks"] >= len(deltas) and 0 < fast.counts["base_requests"] <= fast.counts["base_blocks"]

    for name, m in (("fast", fast), ("full", full)):
        restore_snapshot(store, layout, mf.load(store, layout, m.backup_id), str(d / name), parallel=4, owner=PG)
    a, b = _files(d / "fast"), _files(d / "full")
    assert a.keys() == b.keys()
    differ = [p for p in a if a[p] != b[p]]
    assert differ == [], differ[:10]
    source = _files(src.data)
    assert all(a[p] == source[p] for p in a if p.startswith(("base/", "global/"))
               and not p.endswith("pg_internal.init") and p in source)
    rf = Cluster(d / "fast", d)
    clusters.append(rf)
    (rf.data / "postgresql.auto.conf").write_text((rf.data / "postgresql.auto.conf").read_text().replace(
        "port = ", "# port = "))
    rf.conf()
    rf.start()
    assert rf.sql("SELECT count(*), md5(string_agg(h, ',' ORDER BY i)) FROM t") == want
    rf.stop()
    store.delete_many([o.key for o in store.list(layout.root)])


def _flipped(frame: bytes, decoded, good: bytes) -> int:
    """The first byte of a stored frame whose lowest bit flipped still decodes (``decoded(bad)``),
    to other bytes: damage zstd itself does not notice, only the sha256 checks do."""
    for i in range(len(frame) - 1, -1, -1):
        bad = frame[:i] + bytes([frame[i] ^ 1]) + frame[i + 1:]
        try:
            got = decoded(bad)
        except zstandard.ZstdError:
            continue
        if bytes(got) != good:
            return i
    raise AssertionError("no byte of the frame decodes to other bytes when flipped")


def test_a_delta_or_base_decoding_to_other_bytes_stops_the_restore_and_is_named(lab, workdir, monkeypatch):
    """A page delta (format 5) is decoded against its base block and its pages checked against their
    sha256, the base block against its own: a stored delta or base damaged so that zstd still
    decodes it (to other bytes) stops the restore of the incremental with exit code 7, naming the
    object and the file, whether the deltas are held (applied over their bases in memory) or
    read in a second pass; put back, the backup restores byte for byte."""
    d, clusters = workdir
    src = initdb_started(d, clusters)
    src.sql("CREATE TABLE t AS SELECT i, md5(i::text) AS h FROM generate_series(1, 300000) i")  # ~22 MB
    src.sql("CHECKPOINT")
    store, layout, kw, m1 = stopped_and_stored(lab, src, "deltacheck")
    src.start()
    src.sql("UPDATE t SET h = 'changed' WHERE i % 5000 = 0")
    src.sql("CHECKPOINT")
    src.stop()
    m2 = store_snapshot(store, layout, str(src.data), backup_id=catalog.new_backup_id(), parent_manifests=[m1],
                        unchanged_lsn=m1.pg.redo_lsn, **kw)
    m2 = mf.load(store, layout, m2.backup_id)
    path, c = next((f.path, c) for f in m2.entries() for c in f.chunks if c.mask and c.on_base)
    dec = codec.Decoder()
    restore_snapshot(store, layout, m2, str(d / "good"), parallel=4)
    want = _files(d / "good")
    base_key, delta_key = layout.pack(c.base.pack), layout.pack(c.pack)
    base_frame = store.get(base_key)[c.base.offset:c.base.offset + c.base.length]
    block = bytes(dec.decode(base_frame, c.base.frame_raw))[c.base.at:c.base.at + c.base.raw]
    delta_frame = store.get(delta_key)[c.offset:c.offset + c.length]
    pages = bytes(dec.decode_on(delta_frame, c.frame_raw, blocks.same_pages(block, c.mask)))
    damage = {  # (key, offset in the object) of a flip each: the delta's frame, its base's frame
        "delta": (delta_key, c.offset + _flipped(delta_frame, lambda b: dec.decode_on(
            b, c.frame_raw, blocks.same_pages(block, c.mask)), pages)),
        "base": (base_key, c.base.offset + _flipped(base_frame, lambda b: bytes(dec.decode(b, c.base.frame_raw))[
            c.base.at:c.base.at + c.base.raw], block)),
    }
    holds = (heldmod.HOLD_BYTES, 0)  # held in memory, or a second pass
    for which, (key, at) in damage.items():
        good = store.get(key)
        store.put(key, good[:at] + bytes([good[at] ^ 1]) + good[at + 1:])
        try:
            for hold in holds:
                monkeypatch.setattr(heldmod, "HOLD_BYTES", hold)
                with pytest.raises(ValidationError) as ei:
                    restore_snapshot(store, layout, m2, str(d / f"bad-{which}-{hold}"), parallel=4)
                assert ei.value.exit_code == 7, (which, hold)
                assert key in (ei.value.detail or "") and "sha256" in (ei.value.detail or ""), (which, hold, ei.value)
                assert path in ei.value.message or which == "base", (which, hold, ei.value.message)
        finally:
            store.put(key, good)
    monkeypatch.setattr(heldmod, "HOLD_BYTES", 0)
    restore_snapshot(store, layout, m2, str(d / "again"), parallel=4)
    assert _files(d / "again") == want
    store.delete_many([o.key for o in store.list(layout.root)])
