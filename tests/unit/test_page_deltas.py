"""Page deltas (manifest format 5): an incremental stores only the changed pages of a main-fork
block, compressed with its parent's whole block (the base, fetched back from storage) as zstd
dictionary; deltas on deltas keep one base with the masks' union; restore, verify and
`restore --delta` apply them; damage and hostile manifests are refused; format 4 and 3
manifests still restore."""

from __future__ import annotations

import dataclasses
import os
import struct
import time
from pathlib import Path

import pytest

from dbops.config import CompressionSettings, RetentionSettings
from dbops.errors import ExitCode, ValidationError
from dbops.ops.restore.delta import restore_delta
from dbops.repo import catalog, mformat, retention
from dbops.repo import manifest as mf
from dbops.repo import snapshot as store_mod
from dbops.repo.manifest import PgState
from dbops.repo.restore import restore_snapshot, verify_backup
from dbops.repo.store import store_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

PAGE = 8192
REL = "base/5/40000"  # 2 MiB: 32 KiB blocks of 4 pages


def pg(redo: int) -> PgState:
    return PgState("15", "7312345678901234567", 1, redo, redo + 0x100, 1_700_000_000.0)


def page(lsn: int, tag: str) -> bytes:
    return struct.pack("=II", lsn >> 32, lsn & 0xFFFFFFFF) + (f"{tag} ".encode() * 3000)[:PAGE - 8]


class Folder:
    """A data folder with one relation whose pages carry LSNs; pages are rewritten with new ones."""

    def __init__(self, root: Path):
        self.d = root / "data"
        (self.d / "base/5").mkdir(parents=True)
        (self.d / "PG_VERSION").write_text("15\n")
        self.pages = [page(0x1000000, f"p{i}") for i in range(256)]
        self.pages[60:64] = [bytes(PAGE)] * 4  # block 15: all zeros (not stored) in the full backup
        self.write()

    def write(self) -> None:
        (self.d / REL).write_bytes(b"".join(self.pages))

    def change(self, lsn: int, *numbers: int) -> None:
        for n in numbers:
            self.pages[n] = page(lsn, f"p{n}@{lsn:x}")
        self.write()


def snap(store, layout, f: Folder, backup_id: str, redo: int, parent=None, **kw):
    kw.setdefault("pack_size", 1 << 20)
    return store_snapshot(store, layout, str(f.d), backup_id=backup_id, parent_manifests=[parent] if parent else [],
                          chunk_size=8192, parallel=2, pg=pg(redo),
                          compression=CompressionSettings("zstd", 3),
                          unchanged_lsn=parent.pg.redo_lsn if parent else None, **kw)


def refs(m) -> list:
    return next(f for f in m.files if f.path == REL).chunks


def based_on(c, ref) -> bool:
    """c is a page delta whose base is the whole block ref (a base keeps 128 bits of the sha256)."""
    return bool(c.mask) and c.base == ref._replace(hash=ref.hash[:32])


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def build_chain(tmp_path: Path, **kw):
    """b1 full; b2: deltas on b1's blocks (one of 3 pages of 4), a whole block where b1 had zeros;
    b3: deltas on deltas (union), a delta on a b2 whole block, a block zeroed. Returns store,
    layout, folder, manifests, folder copies."""
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), Folder(tmp_path)
    copies = []
    m1 = snap(store, layout, f, "b1", 0x2000000, **kw)
    copies.append(files_of(f.d))
    f.change(0x2000100, 9, 20, 21, 22, 48, 60, 61, 62, 63)  # block 2: 1 page; 5: 3 of 4; 12: 1; 15: new
    m2 = snap(store, layout, f, "b2", 0x3000000, m1, **kw)
    copies.append(files_of(f.d))
    f.change(0x3000100, 10, 21, 49, 50, 41, 61)  # block 2: +1; 5: 1 again; 12: +2; 10: 1; 15 (whole in b2): 1
    f.pages[56:60] = [bytes(PAGE)] * 4  # block 14 zeroed: not stored, b1's block 14 unreferenced
    f.write()
    m3 = snap(store, layout, f, "b3", 0x4000000, m2, **kw)
    copies.append(files_of(f.d))
    return store, layout, f, [mf.load(store, layout, m.backup_id) for m in (m1, m2, m3)], copies


@pytest.fixture
def chain(tmp_path):
    return build_chain(tmp_path)


def test_prune_keeps_a_pack_referenced_only_as_a_delta_base(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "FRAME_BYTES", 1)  # one block per frame, one frame per pack
    store, layout, f, (m1, m2, m3), copies = build_chain(tmp_path, pack_size=1)
    for m in (m1, m2, m3):
        catalog.record_status(store, layout, m.backup_id, catalog.STORED, run_id="r")
    base = refs(m3)[2].base
    assert base.pack in m1.packs() and all(c.pack != base.pack for e in m3.files for c in e.chunks)
    p = retention.build_plan(store, layout, RetentionSettings(keep_last=1), now=time.time(), orphan_grace=0)
    assert p.remove == ("b1", "b2") and p.keep == ("b3",)
    assert refs(m3)[14].pack is None
    assert base.pack not in p.remove_packs and refs(m1)[14].pack in p.remove_packs
    retention.execute(store, layout, p)
    assert store.head(layout.pack(base.pack)) is not None and store.head(layout.pack(refs(m1)[14].pack)) is None
    m3 = mf.load(store, layout, "b3")
    assert verify_backup(store, layout, m3, parallel=2).ok
    restore_snapshot(store, layout, m3, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == copies[2]


def test_incrementals_store_changed_pages_and_restore_byte_for_byte(chain, tmp_path):
    store, layout, f, (m1, m2, m3), copies = chain
    r1, r2, r3 = refs(m1), refs(m2), refs(m3)
    assert m1.format == m2.format == m3.format == 5
    # b2: deltas on b1's blocks, whatever the number of pages changed; block 15 (zeros in b1) whole.
    assert r2[2].mask == 0b0010 and based_on(r2[2], r1[2]) and r2[2].pack not in m1.packs()
    assert r2[5].mask == 0b0111 and based_on(r2[5], r1[5])
    assert r2[12].mask == 0b0001 and based_on(r2[12], r1[12])
    assert r1[15].pack is None and r2[15].mask == 0 and r2[15].pack is not None
    assert m2.counts["delta_chunks"] == 3 and m2.counts["new_chunks"] == 1
    # Every delta is compressed against its base: a frame of its own holding its pages.
    deltas = [c for m in (m2, m3) for c in refs(m) if c.mask]
    assert all(c.on_base and c.at == 0 and c.frame_raw == c.stored_raw for c in deltas)
    # The bases came back from storage: one coalesced GET for b2's (they share b1's pack).
    assert m2.counts["base_blocks"] == 3 and m2.counts["base_requests"] == 1 and m2.counts["base_fetched_bytes"] > 0
    # b3: depth one: block 2's delta keeps b1's block as base with pages 9 and 10 (from the folder);
    # block 12 the union of 48, 49, 50; block 15: a delta on b2's whole block; block 14 zeroed.
    assert r3[2].mask == 0b0110 and based_on(r3[2], r1[2])
    assert r3[5].mask == 0b0111 and based_on(r3[5], r1[5])
    assert r3[12].mask == 0b0111 and based_on(r3[12], r1[12])
    assert r3[10].mask == 0b0010 and based_on(r3[10], r1[10])
    assert r3[15].mask == 0b0010 and based_on(r3[15], r2[15])
    assert r3[14].pack is None and r3[14].mask == 0
    assert r3[0] == r1[0] and m3.counts["lsn_reused_chunks"] == 64 - 6
    # The pack table and the referenced bytes include the bases' packs.
    assert m1.packs() <= m3.packs() and m2.packs() <= m3.packs()
    every = [c for e in m3.files for c in e.chunks]
    frames = {(c.pack, c.offset): c.length for c in every if c.pack} | {(c.base.pack, c.base.offset): c.base.length
                                                                      for c in every if c.mask}
    assert m3.referenced_bytes() == sum(frames.values())
    # Stored: far less than the changed pages themselves.
    assert sum(c.length for c in refs(m2) if c.mask) < 5 * PAGE // 8
    for i, m in enumerate((m1, m2, m3)):
        assert verify_backup(store, layout, m, parallel=2).ok
        restore_snapshot(store, layout, m, str(tmp_path / f"r{i}"), parallel=2)
        assert files_of(tmp_path / f"r{i}") == copies[i], m.backup_id


def test_delta_restore_applies_pages_over_a_changed_folder(chain, tmp_path):
    store, layout, f, (m1, m2, m3), copies = chain
    target = tmp_path / "r"
    restore_snapshot(store, layout, m1, str(target), parallel=2)
    with open(target / REL, "r+b") as out:  # local damage in a block that has a delta in b3
        out.seek(9 * PAGE + 100)
        out.write(b"local change")
    restore_delta(store, layout, m3, target, parallel=2)
    assert files_of(target) == copies[2]


def _corrupt(store: LocalStore, key: str, at: int) -> bytes:
    p = store.root / "objects" / key
    data = p.read_bytes()
    p.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    return data


@pytest.mark.parametrize("hold", [True, False])
@pytest.mark.parametrize("which", ["delta", "base"])
def test_a_damaged_delta_or_base_frame_is_detected_and_named(chain, tmp_path, which, hold, monkeypatch):
    from dbops.repo import held

    monkeypatch.setattr(held, "HOLD_BYTES", held.HOLD_BYTES if hold else 0)  # held in memory, or two passes
    store, layout, f, (m1, m2, m3), copies = chain
    c = refs(m3)[2]
    r = c if which == "delta" else c.base
    key = layout.pack(r.pack)
    _corrupt(store, key, r.offset + r.length // 2)
    rep = verify_backup(store, layout, m3, parallel=2)
    assert [p.key for p in rep.problems] == [key] and REL in rep.problems[0].files
    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, m3, str(tmp_path / "r"), parallel=2)
    assert ei.value.exit_code == ExitCode.VALIDATION == 7
    assert key in (ei.value.detail or "") and REL in ei.value.message


def test_format_3_manifest_still_restores(chain, tmp_path):
    store, layout, f, (m1, m2, m3), copies = chain
    path = str(tmp_path / "m3")
    w = mformat.Writer(path, 3)  # the format-3 writer, as dbops before page deltas wrote b1
    for e in m1.entries():
        w.add(e)
    w.finish(m1.header(w))
    old = mf.Manifest.from_file(path, own=False)
    assert old.format == 3 and open(path, "rb").read(8) == mformat.MAGIC3
    with pytest.raises(ValueError):
        mformat.Writer(str(tmp_path / "x"), 3).add(next(e for e in m3.entries() if e.path == REL))
    restore_snapshot(store, layout, old, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == copies[0]


def _with_delta(m, n: int, **change) -> mf.Manifest:
    files = []
    for e in m.files:
        if e.path == REL:
            chunks = list(e.chunks)
            c = chunks[n]
            base = change.pop("base", {})
            chunks[n] = c._replace(**change, base=c.base._replace(**base))
            e = e.with_chunks(tuple(chunks))
        files.append(e)
    return mf.Manifest(backup_id=m.backup_id, pg=m.pg, chunk_size=m.chunk_size, compression=m.compression, files=files)


@pytest.mark.parametrize("change", [{"mask": 0b10010}, {"mask": 1 << 40}, {"base": {"frame_raw": 100}},
                                    {"base": {"raw": 16384}}, {"base": {"mask": 1}}, {"base": {"hash": "ab"}},
                                    {"at": PAGE}, {"frame_raw": 4 * PAGE}, {"mask": 0, "base": {}}])
def test_hostile_page_delta_is_refused_before_anything_is_written(chain, tmp_path, change):
    store, layout, f, (m1, m2, m3), copies = chain
    bad = _with_delta(m3, 2, **dict(change))
    target = tmp_path / "r"
    with pytest.raises(ValidationError) as ei:
        restore_snapshot(store, layout, bad, str(target), parallel=2)
    assert "page delta" in ei.value.message and not target.exists()
    if "raw" not in change.get("base", {}) and "mask" not in change.get("base", {}):  # the rest is stored
        data = bad.to_bytes()
        with pytest.raises(ValidationError):
            mf.Manifest.from_bytes(data, what="manifest of backup b3")


def test_a_file_with_deltas_completes_once_after_its_deltas(chain):
    from dbops.repo import schedule

    store, layout, f, (m1, m2, m3), copies = chain
    done: list[str] = []
    completion = schedule.Completion(lambda e: done.append(e.path))
    items = []
    for files, rng, left in completion.planned(m3):
        items.append(rng.deltas)
        assert REL not in done or not rng.deltas
        completion.written(files, rng, left)
    assert items[-1] and not items[0]  # the deltas after their bases
    assert done.count(REL) == 1 and done[-1] == REL and "PG_VERSION" in done


def test_a_delta_compressed_against_its_base_round_trips_and_a_wrong_base_is_caught():
    from dbops.repo import blocks, codec, ranges

    base = os.urandom(4 * PAGE)  # incompressible alone: only the base makes the delta small
    pages = base[PAGE:2 * PAGE - 100] + b"a few changed bytes".ljust(100, b".")
    enc = codec.Encoder("zstd", 3)
    stored = enc.encode_on(pages, blocks.same_pages(base, 0b0010))  # the dictionary: page 1's old version
    assert len(stored) < 300 and len(enc.encode(pages)) == PAGE
    dec = codec.Decoder()
    assert dec.decode_on(stored, PAGE, base[PAGE:2 * PAGE]) == pages
    ref = mf.ChunkRef(codec.sha256(pages), "p", 0, len(stored), 4 * PAGE, 0, PAGE, 0b0010,
                      mf.ChunkRef("00" * 16, "q", 0, 10, 4 * PAGE, 0, 4 * PAGE), True)
    fr = ranges.Frame(ref, [ranges.Run(0, 0, [ref._replace(raw=PAGE, mask=0, base=None)], 0b0010)])
    (run, raw, why), = ranges.frame_chunks(dec, fr, stored, lambda _f, _r: base)
    assert bytes(raw) == pages and not why
    damaged = base[:PAGE + 50] + bytes([base[PAGE + 50] ^ 1]) + base[PAGE + 51:]
    (run, raw, why), = ranges.frame_chunks(dec, fr, stored, lambda _f, _r: damaged)
    assert raw is None and "sha256" in why
    (run, raw, why), = ranges.frame_chunks(dec, fr, stored, lambda _f, _r: None)
    assert raw is None and "base block" in why


def test_a_damaged_base_stops_the_incremental_and_is_named(tmp_path):
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), Folder(tmp_path)
    m1 = snap(store, layout, f, "b1", 0x2000000)
    c = refs(m1)[2]
    key = layout.pack(c.pack)
    _corrupt(store, key, c.offset + c.length // 2)
    f.change(0x2000100, 9)
    with pytest.raises(ValidationError) as ei:
        snap(store, layout, f, "b2", 0x3000000, mf.load(store, layout, "b1"))
    assert key in (ei.value.detail or "") and "base block" in ei.value.message
    assert store.head(layout.manifest("b2")) is None


def _as_format_4(store, layout, m, content: bytes, path: str) -> mf.Manifest:
    """The manifest as dbops before format 5 wrote it: each delta's pages in a frame compressed on
    its own (stored in a new pack), written with the format 4 writer."""
    import zstandard

    blob, files = b"", []
    for e in m.entries():
        chunks = []
        for n, c in enumerate(e.chunks):
            if c.on_base:
                pages = b"".join(content[n * e.block + p * PAGE:n * e.block + (p + 1) * PAGE]
                                 for p in mformat_pages(c.mask))
                z = zstandard.ZstdCompressor(level=3).compress(pages)
                c = c._replace(pack="f4" * 16, offset=len(blob), length=len(z), on_base=False)
                blob += z
            chunks.append(c)
        files.append(e.with_chunks(tuple(chunks)))
    store.put(layout.pack("f4" * 16), blob)
    w = mformat.Writer(path, 4)
    for e in files:
        w.add(e)
    w.finish(m.header(w))
    return mf.Manifest.from_file(path, own=False)


def mformat_pages(mask: int) -> list[int]:
    from dbops.repo.blocks import pages_of

    return pages_of(mask)


def test_format_4_manifest_still_restores_and_an_incremental_builds_on_it(chain, tmp_path):
    store, layout, f, (m1, m2, m3), copies = chain
    old = _as_format_4(store, layout, m3, copies[2][REL], str(tmp_path / "m4"))
    assert old.format == 4 and open(tmp_path / "m4", "rb").read(8) == mformat.MAGIC4
    assert any(c.mask and not c.on_base for c in refs(old))
    with pytest.raises(ValueError):
        mformat.Writer(str(tmp_path / "x"), 4).add(next(e for e in m3.entries() if e.path == REL))
    assert verify_backup(store, layout, old, parallel=2).ok
    restore_snapshot(store, layout, old, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == copies[2]
    # A format 5 incremental on it keeps its untouched format 4 deltas and adds new ones.
    f.change(0x4000100, 8)  # block 2 again: a new delta (pages 8, 9, 10) on b1's block
    m4 = snap(store, layout, f, "b4", 0x5000000, old)
    r4, r_old = refs(m4), refs(old)
    assert m4.format == 5 and r4[12] == r_old[12] and not r4[12].on_base
    assert r4[2].mask == 0b0111 and r4[2].on_base and based_on(r4[2], refs(m1)[2])
    restore_snapshot(store, layout, mf.load(store, layout, "b4"), str(tmp_path / "r4"), parallel=2)
    assert files_of(tmp_path / "r4") == files_of(f.d)
