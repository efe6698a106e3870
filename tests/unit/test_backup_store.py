"""Chunk store round trips on LocalStore: content, modes, empty folders, symlinks, zero pages,
exclusions, dedupe across snapshots, and damage detected and named."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import zstandard

from dbops.repo import manifest as mf
from dbops.repo import packs as packs_mod
from dbops.repo import snapshot as store_mod
from dbops.repo import storeorder
from dbops.repo.manifest import PgState
from dbops.repo.restore import restore_snapshot, verify_backup
from dbops.repo.store import store_snapshot
from dbops.config import CompressionSettings
from dbops.errors import ExitCode, NotFoundError, PreconditionError, ValidationError
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

CS = 8192 * 2  # small chunks keep test data small
PG = PgState("15", "7312345678901234567", 1, 0x3000028, 0x3000100, 1_700_000_000.0)


class CountingStore(LocalStore):
    """LocalStore that counts requests (a real store; only observed)."""

    def __init__(self, root):
        super().__init__(root)
        self.puts: list[str] = []
        self.ranges: list[tuple[str, int, int]] = []

    def put(self, key, data, **kw):
        self.puts.append(key)
        return super().put(key, data, **kw)

    def put_file(self, key, path, **kw):
        self.puts.append(key)
        return super().put_file(key, path, **kw)

    def get_range(self, key, start, length):
        self.ranges.append((key, start, length))
        return super().get_range(key, start, length)

    def open_range(self, key, start, length):
        self.ranges.append((key, start, length))
        return super().open_range(key, start, length)


def pages(seed: int, n: int) -> bytes:
    """n distinct, compressible 8 KiB pages."""
    return b"".join((f"page {seed}:{i} ".encode() * 1000)[:8192] for i in range(n))


def make_datadir(root: Path) -> Path:
    d = root / "data"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    (d / "PG_VERSION").write_text("15\n")
    for sub in ("base/1", "base/5", "global", "pg_wal/archive_status", "pg_notify", "pg_replslot/slot1",
                "pg_stat_tmp", "pg_tblspc", "pg_logical/snapshots", "base/5/pgsql_tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    # A relation: 3 chunks, the middle one all zeros, and a short tail.
    (d / "base/5/16384").write_bytes(pages(1, 2) + bytes(CS) + pages(2, 3))
    (d / "base/5/16384_fsm").write_bytes(pages(3, 1))
    (d / "base/1/1259").write_bytes(pages(4, 4))
    (d / "base/5/empty").write_bytes(b"")
    # An unlogged relation: only its _init fork is kept.
    (d / "base/5/20000").write_bytes(pages(5, 2))
    (d / "base/5/20000_fsm").write_bytes(pages(6, 1))
    (d / "base/5/20000_init").write_bytes(pages(7, 1))
    (d / "base/5/pgsql_tmp/pgsql_tmp123.0").write_bytes(b"temp")
    (d / "base/5/pg_internal.init").write_bytes(b"cache")
    (d / "global/pg_control").write_bytes(b"\x01" * 8192)
    (d / "postgresql.conf").write_text("shared_buffers = 128MB\n")
    os.chmod(d / "postgresql.conf", 0o640)
    (d / "postmaster.pid").write_text("1234\n")
    (d / "standby.signal").write_text("")
    (d / "pg_wal/000000010000000000000001").write_bytes(pages(8, 2))  # before the REDO point: left out
    (d / "pg_wal/000000010000000000000003").write_bytes(pages(12, 2))  # holds REDO..consistent: kept
    (d / "pg_wal/000000010000000000000004").write_bytes(pages(13, 2))  # after it: left out
    (d / "pg_wal/00000001.history").write_text("")
    (d / "pg_wal/archive_status/000000010000000000000001.ready").write_text("")
    (d / "pg_replslot/slot1/state").write_bytes(b"slot")
    os.symlink("/mnt/tablespace/ts1", d / "pg_tblspc/16400")
    os.utime(d / "base/1/1259", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return d


def snapshot(store, layout, data_dir, backup_id, parents=(), **kw):
    kw.setdefault("compression", CompressionSettings("zstd", 3))
    return store_snapshot(store, layout, str(data_dir), backup_id=backup_id, parent_manifests=parents,
                          chunk_size=CS, pack_size=kw.pop("pack_size", 1 << 20), parallel=kw.pop("parallel", 3),
                          meta={"run": "test"}, pg=PG, **kw)


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


@pytest.fixture
def env(tmp_path):
    store = CountingStore(tmp_path / "store")
    return store, Layout("clusters/main"), make_datadir(tmp_path)


def test_round_trip_restores_content_modes_dirs_links_and_zero_pages(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1")
    target = tmp_path / "restored"
    stats = restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(target), parallel=3)

    got, want = tree(target), tree(d)
    excluded = {"postmaster.pid", "standby.signal", "pg_wal/000000010000000000000001",
                "pg_wal/000000010000000000000004",
                "pg_wal/archive_status/000000010000000000000001.ready", "pg_replslot/slot1",
                "pg_replslot/slot1/state", "base/5/pgsql_tmp", "base/5/pgsql_tmp/pgsql_tmp123.0",
                "base/5/pg_internal.init", "base/5/20000_fsm"}
    want = {k: v for k, v in want.items() if k not in excluded}
    want["pg_wal/archive_status"] = ("dir", 0o700)  # pg_wal's contents are not kept; this is recreated
    want["base/5/20000"] = want["base/5/20000_init"]  # unlogged: main fork reset from the init fork
    for wal in ("000000010000000000000003", "00000001.history"):  # carried WAL is marked archived
        want[f"pg_wal/archive_status/{wal}.done"] = ("file", 0o600, b"")
    # A tablespace link whose contents were not backed up (no tablespace list: the legacy walk) is
    # recorded but not restored: it would point the copy at the live tablespace.
    assert want.pop("pg_tblspc/16400") == ("link", "/mnt/tablespace/ts1")
    assert any(f.path == "pg_tblspc/16400" and f.target == "/mnt/tablespace/ts1" for f in m.files)
    assert got == want
    assert got["pg_replslot"][0] == "dir" and got["base/5/20000_init"][0] == "file"
    assert got["base/5/empty"] == ("file", 0o644, b"")
    assert got["postgresql.conf"][1] == 0o640
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "base/1/1259").stat().st_mtime_ns == 1_600_000_000_123_456_789

    f = next(x for x in m.files if x.path == "base/5/16384")
    assert [c.is_zero for c in f.chunks] == [False, True, False, False]
    assert f.chunks[-1].raw == 8192  # short tail chunk
    assert m.counts["zero_chunks"] == 1
    # The zero chunk is a hole, never fetched: the file is sparse where it was zero.
    assert os.stat(target / "base/5/16384").st_blocks * 512 < os.stat(target / "base/5/16384").st_size
    assert stats.logical_bytes == m.logical_size == sum(x.size for x in m.files if x.type == "file")
    assert m.pg == PG and m.meta == {"run": "test"} and m.parent_id is None


@pytest.mark.parametrize("walk_late", [False, True], ids=["walk-first", "ranges-first"])
def test_files_made_beside_the_download_get_their_full_length_and_time(env, tmp_path, monkeypatch, walk_late):
    """Files are created by a walk beside the download, or by the range that reaches them first (here
    every one of them, the walk held back): either way each file ends at its full length (a hole at
    its end, a file of zeros only) with its recorded time, and its content byte for byte."""
    from dbops.repo import restore as restore_mod

    store, layout, d = env
    (d / "base/5/30000").write_bytes(pages(20, 2) + bytes(2 * CS))  # ends in zero blocks: never written
    (d / "base/5/30001").write_bytes(bytes(3 * CS))  # zeros only: nothing to fetch
    for i, p in enumerate(sorted(x for x in d.rglob("*") if x.is_file() and not x.is_symlink())):
        os.utime(p, ns=(1_500_000_000_000_000_000 + i, 1_500_000_000_000_000_000 + i))
    m = snapshot(store, layout, d, "b1")
    if walk_late:
        walk = restore_mod.Creator.run

        def late(self, entries):
            time.sleep(0.5)  # every range has created its files by then
            walk(self, entries)

        monkeypatch.setattr(restore_mod.Creator, "run", late)
    target = tmp_path / "restored"
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(target), parallel=3)
    restored = [f for f in m.files if f.type == "file" and (target / f.path).exists()]
    assert {f.path for f in restored} >= {"base/5/30000", "base/5/30001", "base/5/empty", "base/1/1259"}
    for f in restored:
        st = (target / f.path).stat()
        if f.path.startswith("pg_wal/archive_status/") or f.path == "base/5/20000":
            continue  # made by the restore itself (.done), reset from its init fork (unlogged)
        assert (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns), f.path
        assert (target / f.path).read_bytes() == (d / f.path).read_bytes(), f.path
    assert (target / "base/5/30001").stat().st_blocks == 0  # all holes


def test_without_wal_pg_wal_is_left_empty(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1", include_wal=False)
    assert [f.path for f in m.files if f.path.startswith("pg_wal")] == ["pg_wal"]
    restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=1)
    assert sorted(p.name for p in (tmp_path / "r/pg_wal").iterdir()) == ["archive_status"]
    assert list((tmp_path / "r/pg_wal/archive_status").iterdir()) == []


def test_manifest_is_written_last_and_packs_are_few(env):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1", pack_size=1 << 20)
    assert store.puts[-1] == layout.manifest("b1")
    packs = [k for k in store.puts if k.endswith(".pack")]
    assert len(packs) <= 3  # one per open pack at most: parallel=3, everything fits
    assert all(store.head(layout.pack_index(k.rsplit("/", 1)[1][:-5])) for k in packs)
    assert m.stored_bytes == sum(store.head(k).size for k in packs)
    assert m.stored_bytes < m.logical_size / 3  # compressed
    # Round trip of the manifest itself.
    back = mf.Manifest.from_bytes(m.to_bytes())
    assert back.to_dict() == m.to_dict() and back.files == m.files


def test_pack_indexes_list_every_frame_and_block_of_the_manifest(env):
    """The index uploaded beside each pack (kept in columns while the pack is open) names each
    frame's place and size and its blocks' sha256, in the JSON layout it always had."""
    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(9, 120) + os.urandom(CS * 40))
    m = snapshot(store, layout, d, "b1", pack_size=CS * 16, parallel=2)
    want: dict[str, dict[int, list]] = {}
    for f in m.files:
        for c in f.chunks:
            if c.pack:
                frame = want.setdefault(c.pack, {}).setdefault(c.offset, [c.offset, c.length, c.frame_raw, {}])
                frame[3][c.at] = c.hash
    assert len(want) >= 3
    for pack, frames in want.items():
        text = zstandard.ZstdDecompressor().decompress(store.get(layout.pack_index(pack)))
        doc = json.loads(text)
        assert text == json.dumps(doc, separators=(",", ":")).encode()
        assert {k: doc[k] for k in ("format", "pack", "backup_id")} == {"format": 2, "pack": pack, "backup_id": "b1"}
        assert doc["size"] == store.head(layout.pack(pack)).size
        assert doc["frames"] == [[o, n, raw, [h for _, h in sorted(hs.items())]]
                                 for o, n, raw, hs in sorted(frames.values())]


def test_a_pack_of_blocks_that_compress_to_nothing_is_sealed_at_its_block_limit(env, monkeypatch):
    """A pack is sealed at MAX_BLOCKS blocks too, not only at pack_size stored bytes: blocks that
    compress to almost nothing would otherwise put any number of them (and their index) in one pack."""
    store, layout, d = env
    monkeypatch.setattr(packs_mod, "MAX_BLOCKS", 8)
    (d / "base/5/big").write_bytes(pages(3, 2 * 60))  # 60 distinct blocks of very compressible pages
    m = snapshot(store, layout, d, "b1", pack_size=1 << 30, parallel=1)
    per_pack: dict[str, set[str]] = {}
    for f in m.files:
        for c in f.chunks:
            if c.pack:
                per_pack.setdefault(c.pack, set()).add(c.hash)
    assert len(per_pack) >= 60 // 8 and all(len(hs) <= 8 + 8 for hs in per_pack.values())
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(d.parent / "r"), parallel=2)
    assert (d.parent / "r/base/5/big").read_bytes() == (d / "base/5/big").read_bytes()


def test_small_pack_size_splits_into_several_packs(env, tmp_path):
    store, layout, d = env
    (d / "base/5/big").write_bytes(os.urandom(CS * 40))  # incompressible: stored raw
    m = snapshot(store, layout, d, "b1", pack_size=CS * 8, parallel=2)
    packs = {c.pack for f in m.files for c in f.chunks if c.pack}
    assert len(packs) >= 5
    big = next(f for f in m.files if f.path == "base/5/big")
    assert all(c.length == c.frame_raw > c.raw for c in big.chunks)  # raw frames when compression does not help
    restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=4)
    assert (tmp_path / "r/base/5/big").read_bytes() == (d / "base/5/big").read_bytes()


def test_the_last_packs_are_sealed_small_so_their_uploads_start_before_the_end(env, tmp_path, monkeypatch):
    """Once less than TAIL_BYTES are left to read, a pack is sealed at TAIL_PACK stored bytes (its
    upload starts) instead of waiting for pack_size: what uploads after the last block is small.
    Before that, packs fill up to pack_size as ever; the backup restores byte for byte."""
    store, layout, d = env
    frame = store_mod.FRAME_BYTES
    monkeypatch.setattr(store_mod, "TAIL_PACK", frame // 2)
    monkeypatch.setattr(store_mod, "TAIL_BYTES", 6 * frame)
    names = [f"base/5/{17000 + i}" for i in range(20)]
    for n in names:  # incompressible, one frame each
        (d / n).write_bytes(os.urandom(frame))
    m = snapshot(store, layout, d, "b1", pack_size=1 << 30, parallel=1)
    pack_of = {f.path: f.chunks[0].pack for f in m.files if f.path in names}
    sizes: dict[str, int] = {}
    for p in pack_of.values():
        sizes[p] = sizes.get(p, 0) + 1
    assert len(sizes) >= 5  # the tail: about one pack a frame
    assert max(sizes.values()) >= 10  # the rest: one pack, far below pack_size
    assert pack_of[names[0]] != pack_of[names[-1]]
    restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    for n in names:
        assert (tmp_path / "r" / n).read_bytes() == (d / n).read_bytes()


def test_restore_coalesces_adjacent_chunks_into_one_request_per_pack(env, tmp_path):
    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(9, 200))
    m = snapshot(store, layout, d, "b1", parallel=1)  # one open pack: everything adjacent
    store.ranges.clear()
    stats = restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert stats.requests == len(store.ranges) == len(m.packs()) == 1
    assert stats.chunks == m.counts["new_chunks"]


def test_compression_none_round_trips(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1", compression=CompressionSettings("none", 3))
    assert all(c.length == c.frame_raw for f in m.files for c in f.chunks if c.pack)
    restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/1/1259").read_bytes() == (d / "base/1/1259").read_bytes()


def test_second_snapshot_stores_only_changed_chunks(env, tmp_path):
    store, layout, d = env
    m1 = snapshot(store, layout, d, "b1")
    # Change one page in place and append one new page; everything else stays.
    rel = d / "base/1/1259"
    data = bytearray(rel.read_bytes())
    data[8192 * 2 + 100:8192 * 2 + 110] = b"X" * 10
    rel.write_bytes(bytes(data) + pages(10, 1))
    n_before = len(store.puts)
    m2 = snapshot(store, layout, d, "b2", parents=[m1])
    new_packs = [k for k in store.puts[n_before:] if k.endswith(".pack")]
    assert m2.counts["new_chunks"] == 2  # the changed chunk and the new tail chunk
    assert len(new_packs) == 1
    assert m2.stored_bytes == store.head(new_packs[0]).size < 10_000
    assert m2.parent_id == "b1"
    unchanged = next(f for f in m2.files if f.path == "base/5/16384")
    assert unchanged.chunks == next(f for f in m1.files if f.path == "base/5/16384").chunks
    # Each backup restores on its own.
    restore_snapshot(store, layout, m2, str(tmp_path / "r2"), parallel=2)
    restore_snapshot(store, layout, m1, str(tmp_path / "r1"), parallel=2)
    assert (tmp_path / "r2/base/1/1259").read_bytes() == rel.read_bytes()
    assert (tmp_path / "r1/base/1/1259").read_bytes() == pages(4, 4)


def test_blocks_grow_with_file_size_and_reuse_is_by_position(env, tmp_path):
    store, layout, d = env
    (d / "base/5/30000").write_bytes(pages(11, 256))  # 2 MiB: 32 KiB blocks
    (d / "base/5/copy").write_bytes(pages(11, 256))  # the same content under another name
    m1 = snapshot(store, layout, d, "b1")
    f = next(f for f in m1.files if f.path == "base/5/30000")
    assert f.block == 32 * 1024 and len(f.chunks) == 64
    assert next(f for f in m1.files if f.path == "base/1/1259").block == CS  # small files: the chunk size
    # No dictionary of every hash: equal content elsewhere is stored again (positional reuse only).
    copy = next(f for f in m1.files if f.path == "base/5/copy")
    assert (copy.chunks[0].pack, copy.chunks[0].offset) != (f.chunks[0].pack, f.chunks[0].offset)
    # Change one page: only its block is stored again, the rest is the parent's, by position.
    data = bytearray((d / "base/5/30000").read_bytes())
    data[8192 * 100 + 50] ^= 1
    (d / "base/5/30000").write_bytes(bytes(data))
    m2 = snapshot(store, layout, d, "b2", parents=[m1])
    g = next(f for f in m2.files if f.path == "base/5/30000")
    changed = [i for i, (a, b) in enumerate(zip(f.chunks, g.chunks)) if a != b]
    assert changed == [100 * 8192 // (32 * 1024)] and m2.counts["new_chunks"] == 1
    restore_snapshot(store, layout, m2, str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/5/30000").read_bytes() == bytes(data)


def _first_pack_key(layout, m, path):
    f = next(x for x in m.files if x.path == path)
    c = next(c for c in f.chunks if c.pack)
    return layout.pack(c.pack), c


def test_corrupt_pack_byte_is_detected_and_named(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1", parallel=1)
    key, c = _first_pack_key(layout, m, "base/1/1259")
    p = store.path_of(key)
    raw = bytearray(p.read_bytes())
    raw[c.offset + c.length // 2] ^= 0xFF
    p.write_bytes(bytes(raw))

    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    e = ei.value
    assert e.exit_code == ExitCode.VALIDATION
    text = e.render()
    assert "b1" in text and key in text
    assert "base/1/1259" in text or any(
        f.path in text for f in m.files if any(x.pack == c.pack and x.offset == c.offset for x in f.chunks))

    report = verify_backup(store, layout, m, parallel=2)
    assert not report.ok
    assert [p.key for p in report.problems] == [key]
    assert "base/1/1259" in report.problems[0].files


def test_verify_reports_every_bad_object(env, tmp_path):
    store, layout, d = env
    (d / "base/5/big").write_bytes(os.urandom(CS * 12))
    m = snapshot(store, layout, d, "b1", pack_size=CS * 4, parallel=1)
    keys = sorted({layout.pack(p) for p in m.packs()})
    assert len(keys) >= 3
    ok = verify_backup(store, layout, m, parallel=2)
    assert ok.ok and ok.chunks == m.counts["new_chunks"] and ok.objects == len(keys)

    store.delete(keys[0])  # missing
    p = store.path_of(keys[1])
    p.write_bytes(p.read_bytes()[:-10])  # truncated
    report = verify_backup(store, layout, m, parallel=2)
    assert sorted(p.key for p in report.problems) == keys[:2]
    reasons = {p.key: p.reason for p in report.problems}
    assert reasons[keys[0]] == "object is missing"
    assert "too short" in reasons[keys[1]] or "sha256" in reasons[keys[1]]


def test_missing_pack_fails_restore_with_validation_error(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1")
    key, _ = _first_pack_key(layout, m, "base/1/1259")
    store.delete(key)
    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert key in ei.value.message and "b1" in ei.value.message
    assert ei.value.detail and "needed for" in ei.value.detail


def test_missing_manifest_means_no_backup(env):
    store, layout, d = env
    snapshot(store, layout, d, "b1")
    store.delete(layout.manifest("b1"))
    with pytest.raises(NotFoundError) as ei:
        mf.load(store, layout, "b1")
    assert "b1 does not exist" in ei.value.message


def test_restore_refuses_a_non_empty_target(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/x").write_text("x")
    with pytest.raises(PreconditionError):
        restore_snapshot(store, layout, m, str(tmp_path / "busy"), parallel=1)


def test_backup_id_is_never_overwritten(env):
    from dbops.errors import ConflictError

    store, layout, d = env
    snapshot(store, layout, d, "b1")
    with pytest.raises(ConflictError):
        snapshot(store, layout, d, "b1")


def test_progress_reaches_total(env):
    store, layout, d = env
    seen = []
    m = snapshot(store, layout, d, "b1", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (m.logical_size, m.logical_size)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)


def test_timings_and_counts_are_recorded(env):
    store, layout, d = env
    t = time.monotonic()
    m = snapshot(store, layout, d, "b1", timings={"restore_previous": 1.5})
    loaded = mf.load(store, layout, "b1")
    assert loaded.timings["restore_previous"] == 1.5
    assert 0 <= loaded.timings["store"] <= time.monotonic() - t + 0.01
    assert loaded.counts == m.counts and loaded.counts["files"] > 5


def test_new_chunks_are_compressed_together_in_frames(env, tmp_path):
    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(9, 64))  # 32 chunks of 16 KiB
    m = snapshot(store, layout, d, "b1", parallel=1)
    big = next(f for f in m.files if f.path == "base/5/big").chunks
    frames = {(c.pack, c.offset) for c in big}
    assert len(frames) == len(big) * CS // store_mod.FRAME_BYTES
    for c in big:
        assert c.compressed and c.frame_raw == store_mod.FRAME_BYTES and c.at % CS == 0
    assert [c.at for c in big[:3]] == [0, CS, 2 * CS]
    assert m.counts["frames"] >= len(frames)
    stats = restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/5/big").read_bytes() == pages(9, 64)
    assert stats.chunks == m.counts["new_chunks"]


def test_format_1_manifest_is_still_read_and_restored(env, tmp_path, monkeypatch):
    import json

    import zstandard

    store, layout, d = env
    monkeypatch.setattr(store_mod, "FRAME_BYTES", 1)  # one chunk per frame: the format-1 layout
    m = snapshot(store, layout, d, "b1")
    m.format = 1
    v1 = zstandard.ZstdCompressor().compress(json.dumps(m.to_dict()).encode())
    assert json.loads(zstandard.ZstdDecompressor().decompress(v1))["files"][1].get("chunks") is not None
    old = mf.Manifest.from_bytes(v1)
    assert old.format == 1 and old.files == m.files
    restore_snapshot(store, layout, old, str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/1/1259").read_bytes() == (d / "base/1/1259").read_bytes()
    assert mf.Manifest.from_bytes(old.to_bytes()).format == mf.FORMAT_VERSION  # written as the new format


def test_manifest_chunk_table_is_compact_and_damage_is_named(env):
    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(14, 600))
    m = store_snapshot(store, layout, str(d), backup_id="b1", chunk_size=8192, pack_size=1 << 20, parallel=2,
                       pg=PG)
    data = store.get(layout.manifest("b1"))
    assert 150 <= m.counts["chunks"] < 600 // 3  # a 4.7 MiB file in 32 KiB blocks
    assert len(data) < 40 * m.counts["chunks"] + 2000  # ~32 bytes of sha256 per block, the rest compresses away
    with pytest.raises(ValidationError) as ei:
        mf.Manifest.from_bytes(data[:-20], what="manifest of backup b1")
    assert "b1" in ei.value.message and "unreadable" in ei.value.message


def _format_2_bytes(m) -> bytes:
    """A manifest as the format-2 writer (dbops before format 3) stored it: header with every
    entry, then one chunk table for all files."""
    import json
    import struct

    import zstandard

    from dbops.repo import mformat, mtable

    doc = m.to_dict()
    doc["format"] = 2
    files = m.files
    doc["files"] = [{k: v for k, v in mformat.entry_meta(f).items() if k != "block"} for f in files]
    numbers: dict = {None: mformat.NO_PACK}
    for f in files:
        for c in f.chunks:
            numbers.setdefault(c.pack, len(numbers) - 1)
    doc["packs"] = [p for p in numbers if p is not None]
    table = mtable.encode_table([c for f in files for c in f.chunks], numbers.__getitem__, 3)
    head = zstandard.ZstdCompressor().compress(json.dumps(doc).encode())
    return mf.MAGIC + struct.pack("<I", len(head)) + head + zstandard.ZstdCompressor().compress(table)


def test_format_2_backup_restores_and_a_current_format_backup_continues_its_chain(env, tmp_path):
    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(15, 200))  # 1.6 MiB: its block size changes with format 3
    m = snapshot(store, layout, d, "b1")
    assert all(f.block == CS for f in m.files if f.type == "file" and f.path != "base/5/big")
    # Rewrite b1's manifest as the old writer did, all in chunk-size blocks.
    store.delete(layout.manifest("b1"))
    old_files = [f for f in m.files]
    old = mf.Manifest(backup_id="b1", pg=m.pg, chunk_size=m.chunk_size, compression=m.compression,
                      files=[f if f.path != "base/5/big" else
                             mf.FileEntry(f.path, f.type, f.mode, f.mtime_ns, f.size, f.target,
                                          tuple(mf.ChunkRef(x.hash, x.pack, x.offset, x.length, x.raw, x.at,
                                                            x.frame_raw) for x in f.chunks), f.block)
                             for f in old_files if f.path != "base/5/big"], counts=m.counts, meta=m.meta)
    store.put(layout.manifest("b1"), _format_2_bytes(old), metadata=old.summary_metadata(), if_absent=True)
    loaded = mf.load(store, layout, "b1")
    assert loaded.format == 2 and [f.path for f in loaded.files] == [f.path for f in old.files]
    restore_snapshot(store, layout, loaded, str(tmp_path / "r1"), parallel=2)
    assert (tmp_path / "r1/base/1/1259").read_bytes() == (d / "base/1/1259").read_bytes()
    # The next backup (format 3) reuses the old backup's blocks where the block size is the same.
    m2 = snapshot(store, layout, d, "b2", parents=[loaded])
    assert m2.format == mf.FORMAT_VERSION and mf.load(store, layout, "b2").format == mf.FORMAT_VERSION
    reused = next(f for f in m2.files if f.path == "base/1/1259").chunks
    assert reused == next(f for f in loaded.files if f.path == "base/1/1259").chunks
    restore_snapshot(store, layout, mf.load(store, layout, "b2"), str(tmp_path / "r2"), parallel=2)
    assert (tmp_path / "r2/base/5/big").read_bytes() == pages(15, 200)
    assert (tmp_path / "r2/base/5/16384").read_bytes() == (d / "base/5/16384").read_bytes()


def _lsn_pages(n: int, lsn: int, seed: int) -> bytes:
    import struct

    return b"".join(struct.pack("=II", lsn >> 32, lsn & 0xFFFFFFFF) + (f"p{seed}:{i} ".encode() * 2000)[:8184]
                    for i in range(n))


def test_page_lsn_rule_reuses_old_main_fork_blocks_without_hashing(env, tmp_path):
    store, layout, d = env
    rel = d / "base/5/40000"
    rel.write_bytes(_lsn_pages(256, 0x2000000, 1))  # 2 MiB of pages older than the parent's REDO
    (d / "base/5/40000_fsm").write_bytes(_lsn_pages(4, 0x2000000, 2))
    m1 = snapshot(store, layout, d, "b1")
    redo = PG.redo_lsn
    # Pages 10..11 rewritten by "replay" (a new LSN); the FSM changes without a new LSN.
    data = bytearray(rel.read_bytes())
    data[8192 * 10:8192 * 12] = _lsn_pages(2, redo + 0x1000, 3)
    rel.write_bytes(bytes(data))
    (d / "base/5/40000_fsm").write_bytes(_lsn_pages(4, 0x2000000, 4))
    fast = snapshot(store, layout, d, "b2", parents=[m1], unchanged_lsn=redo)
    full = snapshot(store, layout, d, "b3", parents=[m1])
    blocks_in_rel = 256 * 8192 // (32 * 1024)
    assert fast.counts["lsn_reused_chunks"] == blocks_in_rel - 1  # every block but the one with new pages
    assert full.counts["lsn_reused_chunks"] == 0
    assert fast.counts["hashed_bytes"] < full.counts["hashed_bytes"] - 60 * 32 * 1024
    # the changed block (2 of its 4 pages new) is stored as a page delta on the parent's block (so
    # are the other main-fork files' blocks, whose synthetic "pages" have LSNs past the REDO point)
    rel_refs = next(f for f in fast.files if f.path == "base/5/40000").chunks
    assert [n for n, c in enumerate(rel_refs) if c.mask] == [2] and rel_refs[2].mask == 0b1100
    assert full.counts["delta_chunks"] == 0
    assert fast.counts["new_chunks"] + fast.counts["delta_chunks"] >= full.counts["new_chunks"]
    assert fast.stored_bytes < full.stored_bytes
    for m in (fast, full):
        restore_snapshot(store, layout, m, str(tmp_path / m.backup_id), parallel=2)
    assert tree(tmp_path / "b2") == tree(tmp_path / "b3")
    assert (tmp_path / "b2/base/5/40000").read_bytes() == bytes(data)
    assert (tmp_path / "b2/base/5/40000_fsm").read_bytes() == (d / "base/5/40000_fsm").read_bytes()


def test_damaged_format_3_entry_stream_is_named(env):
    store, layout, d = env
    snapshot(store, layout, d, "b1")
    data = store.get(layout.manifest("b1"))
    store.delete(layout.manifest("b1"))
    store.put(layout.manifest("b1"), data[:-12])
    with pytest.raises(ValidationError) as ei:  # every entry is read once when a manifest is loaded
        mf.load(store, layout, "b1")
    assert "b1" in ei.value.message and "unreadable" in ei.value.message


def test_full_backup_stored_while_live_then_reused_by_the_final_store(env, tmp_path):
    store, layout, d = env
    rel = d / "base/5/40000"
    rel.write_bytes(_lsn_pages(256, 0x2000000, 1))
    (d / "base/5/zz_dropped").write_bytes(pages(16, 2))

    def drop_later(done, total):  # a relation dropped by replay while the folder is being read
        (d / "base/5/zz_dropped").unlink(missing_ok=True)

    pre = snapshot(store, layout, d, "b1", live=True, save=False, parallel=1, progress=drop_later)
    assert store.head(layout.manifest("b1")) is None  # only a local manifest
    assert next(f for f in pre.files if f.path == "base/5/zz_dropped").size == 0  # recorded empty, no error
    # Replay rewrites two pages (with a new LSN); then the stopped folder is stored for real.
    data = bytearray(rel.read_bytes())
    data[8192 * 40:8192 * 42] = _lsn_pages(2, PG.redo_lsn + 0x100, 2)
    rel.write_bytes(bytes(data))
    final = snapshot(store, layout, d, "b1", reuse=pre, unchanged_lsn=PG.redo_lsn)
    hashed = snapshot(store, layout, d, "b2")
    assert final.parent_id is None and final.counts["lsn_reused_chunks"] == 256 * 8192 // (32 * 1024) - 1
    assert final.stored_bytes > pre.stored_bytes and final.counts["packs"] > pre.counts["packs"]
    for m in (final, hashed):
        restore_snapshot(store, layout, mf.load(store, layout, m.backup_id), str(tmp_path / m.backup_id), parallel=2)
    assert tree(tmp_path / "b1") == tree(tmp_path / "b2")
    assert (tmp_path / "b1/base/5/40000").read_bytes() == bytes(data)


class HeldPuts(CountingStore):
    """Pack uploads wait until released (a real store; a slow upload)."""

    def __init__(self, root):
        super().__init__(root)
        self.release = threading.Event()

    def put_file(self, key, path, **kw):
        if key.endswith(".pack"):
            assert self.release.wait(30)
        return super().put_file(key, path, **kw)


def test_a_store_returns_with_its_last_packs_uploading_and_the_final_store_waits_for_them(env, tmp_path):
    _, layout, d = env
    store = HeldPuts(tmp_path / "held")
    (d / "base/5/big").write_bytes(pages(9, 64) + os.urandom(CS * 12))
    uploads: list[packs_mod.PendingUploads] = []
    spool = tmp_path / "spool"
    spool.mkdir()
    pre = snapshot(store, layout, d, "b1", live=True, save=False, parallel=2, pack_size=CS * 4, defer=uploads,
                   tmp_dir=str(spool))
    assert list(spool.glob("dbops-store-b1-*"))  # its packs, still to upload
    assert len(uploads) == 1 and not any(k.endswith(".pack") for k in store.puts)  # all still uploading
    named = {c.pack for f in pre.files for c in f.chunks if c.pack}
    assert pre.counts["packs"] == len(named) >= 3
    seen = []

    def before():  # the final store's manifest waits for the first store's packs
        seen.append(sorted(k for k in store.puts if k.endswith(".pack")))
        store.release.set()  # the first store's uploads may go on now, and finish before the manifest
        for u in uploads:
            u.finish()
        seen.append(sorted(k for k in store.puts if k.endswith(".pack")))

    final = snapshot(store, layout, d, "b1", reuse=pre, unchanged_lsn=PG.redo_lsn, before_manifest=before,
                     tmp_dir=str(spool))
    assert seen[0] == [] and {layout.pack(p) for p in named} <= set(seen[1])
    assert pre.stored_bytes == sum(store.head(layout.pack(p)).size for p in named)
    assert final.counts["reused_chunks"] > 0 and final.stored_bytes >= pre.stored_bytes
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/5/big").read_bytes() == (d / "base/5/big").read_bytes()
    assert not list(spool.glob("dbops-store-b1-*"))  # both spools removed


def test_pending_uploads_aborted_remove_their_spool(env, tmp_path):
    _, layout, d = env
    store = HeldPuts(tmp_path / "held")
    store.release.set()
    uploads: list[packs_mod.PendingUploads] = []
    (tmp_path / "spool").mkdir()
    snapshot(store, layout, d, "b1", save=False, parallel=2, defer=uploads, tmp_dir=str(tmp_path / "spool"))
    assert list((tmp_path / "spool").glob("dbops-store-b1-*"))
    uploads[0].abort()
    uploads[0].finish()  # once: nothing more
    assert not list((tmp_path / "spool").glob("dbops-store-b1-*")) and store.head(layout.manifest("b1")) is None


@pytest.mark.parametrize("parallel", [1, 3])
def test_files_of_many_units_with_a_small_window(env, tmp_path, monkeypatch, parallel):
    """Units in flight are bounded (WINDOW per worker); a file of many more units than that, and
    many files behind it, are written whole and in order."""
    store, layout, d = env
    monkeypatch.setattr(storeorder, "UNIT_BYTES", 64 * 1024)
    monkeypatch.setattr(storeorder, "WINDOW", 1)
    (d / "base/5/big").write_bytes(pages(17, 400))  # 3.2 MiB: 32 KiB blocks, 50 units
    for i in range(12):
        (d / f"base/5/{50000 + i}").write_bytes(pages(18 + i, 20 + i))
    m = snapshot(store, layout, d, "b1", parallel=parallel)
    assert [f.path for f in m.files] == sorted((f.path for f in m.files), key=mf.path_key)
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r/base/5/big").read_bytes() == pages(17, 400)
    assert all((tmp_path / f"r/base/5/{50000 + i}").read_bytes() == pages(18 + i, 20 + i) for i in range(12))


def test_a_scratch_restore_without_fsync_is_the_same_folder(env, tmp_path):
    store, layout, d = env
    m = snapshot(store, layout, d, "b1")
    restore_snapshot(store, layout, m, str(tmp_path / "durable"), parallel=2)
    restore_snapshot(store, layout, m, str(tmp_path / "scratch"), parallel=2, durable=False)
    assert tree(tmp_path / "scratch") == tree(tmp_path / "durable")
    assert (tmp_path / "scratch/base/1/1259").stat().st_mtime_ns == 1_600_000_000_123_456_789


def test_ranges_are_capped_by_decompressed_size_so_work_splits(env, tmp_path, monkeypatch):
    from dbops.repo import ranges

    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(9, 200))  # 1.6 MB that compresses to a few KB
    m = snapshot(store, layout, d, "b1", parallel=1)
    monkeypatch.setattr(ranges, "MAX_RANGE_RAW", 256 * 1024)
    store.ranges.clear()
    stats = restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert stats.requests == len(store.ranges) > len(m.packs())
    assert all(r.raw <= 256 * 1024 for _f, r in ranges.planned(m))
    assert (tmp_path / "r/base/5/big").read_bytes() == (d / "base/5/big").read_bytes()


def test_each_file_completes_once_and_only_after_its_last_range(env, monkeypatch):
    from dbops.repo import ranges, schedule

    store, layout, d = env
    (d / "base/5/big").write_bytes(pages(9, 100))
    (d / "base/5/zeros").write_bytes(bytes(3 * CS))  # stored content: only all-zero blocks
    m = snapshot(store, layout, d, "b1", parallel=1)
    monkeypatch.setattr(ranges, "MAX_RANGE_RAW", 128 * 1024)
    done: list[str] = []
    completion = schedule.Completion(lambda f: done.append(f.path))
    pending: dict[str, int] = {}
    items = list(completion.planned(m))
    assert done == ["base/5/zeros"]  # nothing to fetch: complete once its batch is planned
    for files, rng, _left in items:
        for i in rng.files():
            pending[files[i].path] = pending.get(files[i].path, 0) + 1
    assert pending["base/5/big"] > 1
    for files, rng, left in items:
        completion.written(files, rng, left)
        for i in rng.files():
            pending[files[i].path] -= 1
        assert {p for p in done if p != "base/5/zeros"} == {p for p, n in pending.items() if n == 0}
    with_content = [e.path for e in m.entries() if e.type == mf.FILE and e.chunks]
    assert sorted(done) == sorted(with_content)
