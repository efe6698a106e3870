"""The incremental's page deltas stored a batch at a time, the next batch's bases fetched while a
batch is compressed (dbops.repo.store.put_deltas, dbops.repo.bases.BaseReader.fetch_ahead): the
backup restores byte for byte and stores what one batch would; a damaged or missing base in a
batch fetched ahead still stops the backup (exit 7), names the object, lists nothing and leaves no
fetching thread behind."""

from __future__ import annotations

import threading

import pytest

from dbops.config import CompressionSettings
from dbops.errors import ExitCode, ValidationError
from dbops.repo import blocks
from dbops.repo import manifest as mf
from dbops.repo import snapshot as store_mod
from dbops.repo.bases import BaseReader
from dbops.repo.ranges import ByteBudget
from dbops.repo.restore import restore_snapshot
from dbops.repo.store import store_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from test_page_deltas import REL, Folder, _corrupt, files_of, pg, refs, snap

CHANGED = (1, 2, 9, 17, 18, 19, 33, 40, 41, 42, 43, 70, 100, 130, 131, 200, 254)  # pages of 10 blocks of 4 pages


def incremental(tmp_path, monkeypatch, batch_bytes: int | None, name: str, parallel: int = 2,
                pages_bytes: int | None = None):
    """(store, layout, folder, full b1, incremental) with pages CHANGED rewritten after b1;
    ``batch_bytes``/``pages_bytes``: a batch closes at that many bytes of blocks / of their pages."""
    store, layout, f = LocalStore(tmp_path / name / "store"), Layout("c"), Folder(tmp_path / name)
    m1 = snap(store, layout, f, "b1", 0x2000000)
    f.change(0x2000100, *CHANGED)
    if batch_bytes is not None:
        monkeypatch.setattr(store_mod, "BATCH_BYTES", batch_bytes)
    if pages_bytes is not None:
        monkeypatch.setattr(store_mod, "BATCH_PAGES_BYTES", pages_bytes)
    if batch_bytes is not None or pages_bytes is not None:
        monkeypatch.setattr(store_mod, "READ_BLOCK", 8192)  # a read a block: a batch is checked after each
    m2 = store_snapshot(store, layout, str(f.d), backup_id="b2", parent_manifests=[m1], chunk_size=8192,
                        pack_size=1 << 20, parallel=parallel, pg=pg(0x3000000),
                        compression=CompressionSettings("zstd", 3), unchanged_lsn=m1.pg.redo_lsn)
    monkeypatch.undo()
    return store, layout, f, m1, mf.load(store, layout, m2.backup_id)


def shape(m) -> list:
    """What a backup stores for each block, wherever it was packed."""
    return [(c.hash, c.mask, c.base.hash if c.base else None, c.raw) for c in refs(m)]


@pytest.mark.parametrize("parallel", [1, 2])
def test_deltas_in_many_batches_fetched_ahead_restore_byte_for_byte(tmp_path, monkeypatch, parallel):
    store, layout, f, _m1, m2 = incremental(tmp_path, monkeypatch, 1, "small", parallel)  # one delta a batch
    deltas = sum(1 for c in refs(m2) if c.mask)
    assert deltas == 10 and m2.counts["delta_chunks"] == 10
    assert m2.counts["base_requests"] >= 10  # each batch fetched on its own
    restore_snapshot(store, layout, m2, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == files_of(f.d)
    *_, one = incremental(tmp_path, monkeypatch, None, "one")  # the same folder, one batch
    assert one.counts["base_requests"] < 10 and shape(one) == shape(m2)


def test_a_batch_closes_at_its_pages_bytes_however_few_its_blocks(tmp_path, monkeypatch):
    # Blocks far below BATCH_BYTES, but their changed pages past BATCH_PAGES_BYTES: a batch a read.
    store, layout, f, _m1, m2 = incremental(tmp_path, monkeypatch, None, "pages", pages_bytes=1)
    assert m2.counts["delta_chunks"] == 10 and m2.counts["base_requests"] >= 10
    restore_snapshot(store, layout, m2, str(tmp_path / "r"), parallel=2)
    assert files_of(tmp_path / "r") == files_of(f.d)
    *_, one = incremental(tmp_path, monkeypatch, None, "one")
    assert one.counts["base_requests"] < 10 and shape(one) == shape(m2)


@pytest.mark.parametrize("damage", ["damaged", "missing"])
def test_a_bad_base_in_a_batch_fetched_ahead_stops_the_incremental_and_is_named(tmp_path, monkeypatch, damage):
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), Folder(tmp_path)
    m1 = mf.load(store, layout, snap(store, layout, f, "b1", 0x2000000, pack_size=1).backup_id)  # a pack a frame
    f.change(0x2000100, *CHANGED)
    base = refs(m1)[130 // 4]  # the block of page 130 (blocks of 4 pages)
    key = layout.pack(base.pack)
    assert key != layout.pack(refs(m1)[0].pack)  # not the first batch's
    if damage == "damaged":
        _corrupt(store, key, base.offset + base.length // 2)
    else:
        (store.root / "objects" / key).unlink()
    monkeypatch.setattr(store_mod, "BATCH_BYTES", 1)
    monkeypatch.setattr(store_mod, "READ_BLOCK", 8192)
    with pytest.raises(ValidationError) as ei:
        snap(store, layout, f, "b2", 0x3000000, m1)
    e = ei.value
    assert e.exit_code == ExitCode.VALIDATION == 7
    assert key in (e.detail or "") and "base block" in e.message and REL in e.message
    assert store.head(layout.manifest("b2")) is None
    assert not [t for t in threading.enumerate() if t.name.startswith("dbops-bases")]


def test_bases_fetched_with_masks_keep_only_those_pages_checked_whole(tmp_path):
    store, layout, f = LocalStore(tmp_path / "store"), Layout("c"), Folder(tmp_path)
    m1 = mf.load(store, layout, snap(store, layout, f, "b1", 0x2000000).backup_id)
    content = b"".join(f.pages)
    bs = next(e for e in m1.files if e.path == REL).block
    picks = [(0, 0b0001), (2, 0b1010), (5, 0b1111), (63, 0b0100)]
    reader = BaseReader(store, layout, ByteBudget(1 << 20), ahead=1)
    try:
        got = reader.fetch_ahead([refs(m1)[n] for n, _ in picks], "test", [m for _, m in picks]).result()
        whole = reader.fetch([refs(m1)[n] for n, _ in picks])
    finally:
        reader.close()
    for (n, mask), pages, block in zip(picks, got, whole):
        assert bytes(block) == content[n * bs:(n + 1) * bs]
        assert bytes(pages) == blocks.same_pages(content[n * bs:(n + 1) * bs], mask)
    assert reader.blocks == 2 * len(picks)
