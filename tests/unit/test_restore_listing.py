"""A restore reads its manifest's listing once, kept compact (dbops.repo.mlisting), instead of once a
pass; what the bucket says is still checked before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
from test_backup_store import PG, make_datadir, snapshot
from test_manifest_untrusted import raw_bytes

from dbops.errors import ValidationError
from dbops.repo import manifest as mf
from dbops.repo.finish import FINISH_RUN, _runs, reset_unlogged
from dbops.repo.manifest import DIR, FILE, SYMLINK, FileEntry
from dbops.repo.mlisting import Listed
from dbops.repo.restore import restore_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore

ENTRIES = [
    FileEntry(".", DIR, 0o700, 1),
    FileEntry("base", DIR, 0o700, 2),
    FileEntry("base/1", DIR, 0o2700, -3),  # a time before 1970
    FileEntry("base/1/16384", FILE, 0o600, 4, 123456789, block=1 << 20),
    FileEntry("base/1/16384.1", FILE, 0o600, 5, 0, block=8192),
    FileEntry("base/1/16384_init", FILE, 0o600, 6, 8192, block=8192),
    FileEntry("base/10", DIR, 0o700, 7),
    FileEntry("base/10/caf\u00e9 \udcff", FILE, 0o644, 8, (1 << 64) - 1, block=8192),  # a name not in UTF-8
    FileEntry("pg_tblspc", DIR, 0o700, 9),
    FileEntry("pg_tblspc/16401", SYMLINK, 0o777, 10, target="/srv/ts"),
    FileEntry("pg_wal", SYMLINK, 0o777, 11, target="/wal"),
]


def test_the_listing_kept_gives_back_every_entry_exactly():
    listed = Listed(ENTRIES)
    assert list(listed) == ENTRIES and list(listed) == ENTRIES  # read again as often as asked
    assert len(listed) == len(ENTRIES)
    assert listed.nbytes() < sum(len(e.path.encode("utf-8", "surrogatepass")) + 40 for e in ENTRIES)


def test_the_listing_kept_is_searched_by_path():
    listed = Listed(ENTRIES)
    for e in ENTRIES:
        assert listed.contains(e.path), e.path
    for absent in ("base/1/16384_fsm", "base/1/1638", "base/2", "base/10/x", "pg_wal/x", "zzz", "a", "base/1/16384/x"):
        assert not listed.contains(absent), absent
    assert not Listed([]).contains(".")


@pytest.mark.parametrize("bad", [
    dict(size=1 << 64), dict(size=-1), dict(mtime_ns=1 << 63), dict(mtime_ns=-(1 << 63) - 1), dict(mode=0x10000),
    dict(block=1 << 32), dict(size="12"), dict(type="fifo"), dict(target=b"/x"),
])
def test_what_does_not_fit_the_columns_is_refused_not_wrapped(bad):
    e = dataclasses.replace(ENTRIES[3], **bad)
    with pytest.raises(ValidationError, match="cannot be listed"):
        Listed([*ENTRIES[:3], e], "manifest of backup b9")


@pytest.fixture
def stored(tmp_path):
    store, layout = LocalStore(tmp_path / "store"), Layout("p")
    snapshot(store, layout, make_datadir(tmp_path), "b1")
    return store, layout


def test_a_kept_listing_reads_the_stored_entries_once(stored):
    store, layout = stored
    m = mf.load(store, layout, "b1")
    want = list(m.listing())
    source = m._source[0]
    with m.kept_listing() as listed:
        assert listed is not None and len(listed) == len(want)
        with open(source, "r+b") as f:  # the stored entries now damaged: the listing is not read again
            f.seek(m._source[1])
            f.write(b"\0" * 64)
        with m.kept_listing() as again:  # nested: the same copy, kept until the outer one ends
            assert again is listed
        assert list(m.listing()) == want
        m.check()
        with pytest.raises(ValidationError):  # the content pass still reads (and checks) the stored entries
            list(m.entries())
    with pytest.raises(ValidationError):  # dropped on leaving: read from the stored entries again
        list(m.listing())


def test_a_manifest_in_memory_keeps_nothing(stored):
    store, layout = stored
    m = mf.load(store, layout, "b1")
    held = mf.Manifest("b2", PG, m.chunk_size, m.compression, files=list(m.files))
    with held.kept_listing() as listed:
        assert listed is None
        assert [e.path for e in held.listing()] == [e.path for e in m.listing()]


def test_a_hostile_listing_is_refused_when_kept_before_the_target_is_made(stored, tmp_path):
    """A manifest read without load's check (from_file): keeping its listing runs the path guard
    over every entry, and the restore refuses it before making its target."""
    store, layout = stored
    m = mf.load(store, layout, "b1")
    files = [dataclasses.replace(f, path="base/../../victim/evil") if f.path == "PG_VERSION" else f
             for f in m.files]
    planted = mf.Manifest("b2", m.pg, m.chunk_size, m.compression, files=files, created=m.created + 1, meta=m.meta)
    path = tmp_path / "b2.manifest"
    path.write_bytes(raw_bytes(planted, files, tmp_path))
    hostile = mf.Manifest.from_file(str(path))
    with pytest.raises(ValidationError, match="hostile or damaged"):
        with hostile.kept_listing():
            pass
    with pytest.raises(ValidationError, match="hostile or damaged"):
        restore_snapshot(store, layout, hostile, str(tmp_path / "r"), parallel=2)
    assert not (tmp_path / "r").exists()
    assert hostile._listed is None


def test_unlogged_relations_reset_with_and_without_the_listing_kept(stored, tmp_path):
    store, layout = stored
    for keep in (True, False):
        m = mf.load(store, layout, "b1")
        target = tmp_path / f"r{keep}"
        restore_snapshot(store, layout, m, str(target), parallel=2)
        (target / "base/5/20000").unlink()
        if keep:
            with m.kept_listing() as listed:
                made = reset_unlogged(target, m, listed)
        else:
            made = reset_unlogged(target, m)
        assert [f.path for f in made] == ["base/5/20000"]
        assert (target / "base/5/20000").read_bytes() == (target / "base/5/20000_init").read_bytes()


def test_files_are_finished_in_runs_and_big_ones_alone():
    small = [FileEntry(f"f{i}", FILE, 0o600, 0) for i in range(FINISH_RUN * 2 + 3)]
    big = [FileEntry(f"g{i}", FILE, 0o600, 0, 1 << 30) for i in range(3)]
    runs = list(_runs(small + big))
    assert [len(r) for r in runs] == [FINISH_RUN, FINISH_RUN, 4, 1, 1]
    assert [f for r in runs for f in r] == small + big
    assert list(_runs([])) == []


def test_load_keeps_the_listing_from_its_own_check_for_the_restore_to_drop(stored, tmp_path):
    store, layout = stored
    want = list(mf.load(store, layout, "b1").listing())
    m = mf.load(store, layout, "b1", keep_listing=True)
    with open(m._source[0], "r+b") as f:  # damaged after the load's check: the restore reads it no more
        f.seek(m._source[1])
        f.write(b"\0" * 64)
    with m.kept_listing() as listed:
        assert listed is not None and list(listed) == want == list(m.listing())
    assert m._listed is None  # dropped with the restore
    with pytest.raises(ValidationError):
        list(m.listing())


def test_load_keeping_the_listing_still_refuses_a_hostile_manifest(stored, tmp_path):
    store, layout = stored
    m = mf.load(store, layout, "b1")
    files = [*m.files, FileEntry("base/zz/x", FILE, 0o600, 0, block=8192)]  # its parent folder is not listed
    planted = mf.Manifest("b2", m.pg, m.chunk_size, m.compression, files=files, created=m.created + 1, meta=m.meta)
    store.put(layout.manifest("b2"), raw_bytes(planted, files, tmp_path), metadata=m.summary_metadata())
    with pytest.raises(ValidationError, match="hostile or damaged"):
        mf.load(store, layout, "b2", keep_listing=True)
