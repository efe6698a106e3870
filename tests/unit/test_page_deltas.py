"""Page deltas (manifest format 4): an incremental stores only the changed pages of a main-fork
block against its parent's whole block; deltas on deltas keep one base with the masks' union;
restore, verify and `restore --delta` apply them; damage and hostile manifests are refused;
format 3 manifests still restore."""

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
from dbops.repo import store as store_mod
from dbops.repo.manifest import PgState
from dbops.repo.restore import restore_snapshot, verify_backup
from dbops.repo.store import store_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

PAGE = 8192
REL = "base/5/40000"  # 2 MiB: 32 KiB blocks of 4 pages (a delta holds at most 2)


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
    """b1 full; b2: deltas on b1's blocks; b3: deltas on deltas (union), a union too big (whole block
    again) and a delta on a b2 whole block. Returns store, layout, folder, manifests, folder copies."""
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), Folder(tmp_path)
    copies = []
    m1 = snap(store, layout, f, "b1", 0x2000000, **kw)
    copies.append(files_of(f.d))
    f.change(0x2000100, 9, 20, 21, 22, 48)  # block 2: 1 page; block 5: 3 of 4 pages; block 12: 1 page
    m2 = snap(store, layout, f, "b2", 0x3000000, m1, **kw)
    copies.append(files_of(f.d))
    f.change(0x3000100, 10, 21, 49, 50, 41)  # block 2: +1; block 5 (whole in b2): 1; block 12: +2; block 10: 1
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
    assert base.pack not in p.remove_packs and refs(m1)[12].pack in p.remove_packs
    retention.execute(store, layout, p)
    assert store.head(layout.pack(base.pack)) is not None and store.head(layout.pack(refs(m1)[12].pack)) is None
    m3 = mf.load(store, layout, "b3")
    assert verify_backup(store, layout, m3, parallel=2).ok
    restore_snapshot(store, layout, m3, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == copies[2]


def test_incrementals_store_changed_pages_and_restore_byte_for_byte(chain, tmp_path):
    store, layout, f, (m1, m2, m3), copies = chain
    r1, r2, r3 = refs(m1), refs(m2), refs(m3)
    assert m1.format == m2.format == m3.format == 4
    # b2: a delta of page 9 on b1's block 2; block 5 (3 of 4 pages changed) stored whole.
    assert r2[2].mask == 0b0010 and based_on(r2[2], r1[2]) and r2[2].pack not in m1.packs()
    assert r2[5].mask == 0 and r2[5].pack is not None and r2[5] != r1[5]
    assert r2[12].mask == 0b0001 and based_on(r2[12], r1[12])
    assert m2.counts["delta_chunks"] == 2 and m2.counts["new_chunks"] == 1
    # b3: depth one: block 2's delta keeps b1's block as base with pages 9 and 10 (from the folder);
    # block 12's union (48, 49, 50) is too big: whole again; block 5: a delta on b2's whole block.
    assert r3[2].mask == 0b0110 and based_on(r3[2], r1[2])
    assert r3[12].mask == 0 and r3[12].pack is not None
    assert r3[5].mask == 0b0010 and based_on(r3[5], r2[5])
    assert r3[10].mask == 0b0010 and based_on(r3[10], r1[10])
    assert r3[0] == r1[0] and m3.counts["lsn_reused_chunks"] == 64 - 4
    # The pack table and the referenced bytes include the bases' packs.
    assert m1.packs() <= m3.packs() and m2.packs() <= m3.packs()
    every = [c for e in m3.files for c in e.chunks]
    frames = {(c.pack, c.offset): c.length for c in every if c.pack} | {(c.base.pack, c.base.offset): c.base.length
                                                                      for c in every if c.mask}
    assert m3.referenced_bytes() == sum(frames.values())
    # Stored: far less than whole blocks would take.
    assert m2.stored_bytes < 3 * 32 * 1024 // 4
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


@pytest.mark.parametrize("which", ["delta", "base"])
def test_a_damaged_delta_or_base_frame_is_detected_and_named(chain, tmp_path, which):
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
                                    {"base": {"raw": 16384}}, {"base": {"mask": 1}}, {"base": {"hash": "ab"}}])
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
