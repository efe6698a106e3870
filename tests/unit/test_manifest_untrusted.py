"""Issue 13 item 3: the bucket is untrusted input. A manifest planted under a newer backup ID (a copy
of a real one with one hostile entry) is refused when it is read, before anything is written, and
nothing outside the restore target is touched; restores never write through a link."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from test_backup_store import CS, PG, make_datadir, snapshot

from dbops.errors import ExitCode, ValidationError
from dbops.ops.restore.delta import restore_delta
from dbops.repo import manifest as mf
from dbops.repo.manifest import DIR, FILE, SYMLINK, FileEntry
from dbops.repo.restore import restore_snapshot
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore


@pytest.fixture
def planted(tmp_path):
    store, layout = LocalStore(tmp_path / "store"), Layout("p")
    snapshot(store, layout, make_datadir(tmp_path), "b1")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    (victim / "keep").write_text("root's")

    def plant(change) -> str:
        m = mf.load(store, layout, "b1")
        files = change(list(m.files), victim)
        planted = mf.Manifest("b2", m.pg, m.chunk_size, m.compression, files=files, created=m.created + 1,
                              meta=m.meta)
        store.put(layout.manifest("b2"), raw_bytes(planted, files, tmp_path), metadata=m.summary_metadata())
        return "b2"

    return store, layout, victim, plant


def raw_bytes(m: mf.Manifest, files: list[FileEntry], tmp: Path) -> bytes:
    """The stored form of a manifest with exactly these entries (what an attacker would upload;
    Manifest.to_bytes refuses to encode a hostile entry)."""
    from dbops.repo import mformat

    path = tmp / f"planted-{len(files)}"
    w = mformat.Writer(str(path))
    for f in files:
        w.add(f)
    w.finish(m.header(w))
    data = path.read_bytes()
    path.unlink()
    return data


def _file(files, path):
    return next(f for f in files if f.type == FILE and f.path == path)


HOSTILE = {
    "absolute dir": lambda fs, v: fs + [FileEntry(str(v / "x"), DIR, 0o777, 0)],
    "absolute file": lambda fs, v: fs + [dataclasses.replace(_file(fs, "PG_VERSION"), path=str(v / "evil"))],
    "dot-dot file": lambda fs, v: [dataclasses.replace(f, path="base/../../victim/evil")
                                   if f.path == "PG_VERSION" else f for f in fs],
    "dot-dot dir": lambda fs, v: fs + [FileEntry("../victim", DIR, 0o777, 0)],
    "empty component": lambda fs, v: [dataclasses.replace(f, path="base//1259") if f.path == "base/1/1259" else f
                                      for f in fs],
    "duplicate": lambda fs, v: fs + [_file(fs, "PG_VERSION")],
    "link elsewhere": lambda fs, v: fs + [FileEntry("base/evil", SYMLINK, 0o777, 0, target=str(v))],
    "file under a link": lambda fs, v: fs + [FileEntry("pg_tblspc/16401", SYMLINK, 0o777, 0, target=str(v)),
                                             FileEntry("pg_tblspc/16401/evil", FILE, 0o600, 0)],
    "setuid": lambda fs, v: [dataclasses.replace(f, mode=0o4755) if f.path == "PG_VERSION" else f for f in fs],
    "unknown type": lambda fs, v: fs + [FileEntry("base/fifo", "fifo", 0o600, 0)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_manifest_is_refused_on_load_and_nothing_outside_changes(planted, tmp_path, case):
    store, layout, victim, plant = planted
    before = sorted((p.name, p.stat().st_mode) for p in victim.iterdir()), victim.stat().st_mode
    bid = plant(HOSTILE[case])
    with pytest.raises(ValidationError) as ei:
        mf.load(store, layout, bid)
    assert ei.value.exit_code == ExitCode.VALIDATION
    assert "refusing a hostile or damaged entry" in ei.value.message or "unknown type" in ei.value.message
    assert (sorted((p.name, p.stat().st_mode) for p in victim.iterdir()), victim.stat().st_mode) == before


def test_the_real_backup_still_loads_and_restores(planted, tmp_path):
    store, layout, _victim, _plant = planted
    restore_snapshot(store, layout, mf.load(store, layout, "b1"), str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r" / "PG_VERSION").read_text() == "15\n"


def test_a_symlinked_pg_wal_is_restored_as_a_folder_of_its_own(planted, tmp_path):
    store, layout, victim, plant = planted
    plant(lambda fs, v: [FileEntry("pg_wal", SYMLINK, 0o777, 0, target=str(v)) if f.path == "pg_wal" else f
                         for f in fs if not f.path.startswith("pg_wal/")])
    m = mf.load(store, layout, "b2")
    restore_snapshot(store, layout, m, str(tmp_path / "r"), parallel=2)
    assert (tmp_path / "r" / "pg_wal").is_dir() and not (tmp_path / "r" / "pg_wal").is_symlink()
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_delta_restore_replaces_a_planted_local_link_and_makes_links_last(planted, tmp_path):
    """A link in the folder where the backup has a folder is removed, not written through."""
    store, layout, victim, _plant = planted
    m = mf.load(store, layout, "b1")
    target = tmp_path / "r"
    restore_snapshot(store, layout, m, str(target), parallel=2)
    import shutil

    shutil.rmtree(target / "base" / "1")
    (target / "base" / "1").symlink_to(victim)
    (target / "PG_VERSION").unlink()
    (target / "PG_VERSION").symlink_to(victim / "keep")
    restore_delta(store, layout, m, target, parallel=2)
    assert (target / "base" / "1").is_dir() and not (target / "base" / "1").is_symlink()
    assert not (target / "PG_VERSION").is_symlink() and (target / "PG_VERSION").read_text() == "15\n"
    assert sorted(p.name for p in victim.iterdir()) == ["keep"] and (victim / "keep").read_text() == "root's"


def test_links_other_than_tablespaces_are_not_backed_up(tmp_path):
    store, layout = LocalStore(tmp_path / "store"), Layout("p")
    d = make_datadir(tmp_path)
    os.symlink("/etc/ssl/certs/ssl-cert-snakeoil.pem", d / "server.crt")
    m = snapshot(store, layout, d, "b1")
    assert "server.crt" not in {f.path for f in m.files}
    assert mf.load(store, layout, "b1").files


def test_bad_wal_names_and_history_content_from_the_bucket_are_refused():
    from dbops.pg.lsn import parse_history

    with pytest.raises(ValidationError):
        parse_history("1\tnot-an-lsn\treason\n")
    with pytest.raises(ValidationError):
        parse_history("x\t0/5000000\treason\n")
    with pytest.raises(ValidationError):
        parse_history("2\t0/5000000\tr\n1\t0/6000000\tr\n")  # parents must increase
    assert parse_history("1\t0/5000000\tno recovery target specified\n") == [(1, 0x5000000, "no recovery target specified")]
