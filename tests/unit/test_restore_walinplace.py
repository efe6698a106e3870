"""The restore's own recovery run reads the WAL it fetched ahead in place (hard links into pg_wal):
its restore_command, run by a real shell as PostgreSQL runs it (in the data folder), declines a
file only where pg_wal holds that very file, and the links are released before promotion."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dbops import config as cfgmod
from dbops.ops.restore import conf as rconf
from dbops.runtime import walfolder

SEG_A, SEG_B, SEG_C = "000000010000000000000003", "000000010000000000000004", "000000010000000000000005"


@pytest.fixture
def cfg(tmp_path: Path):
    raw = {"cluster": "main", "nodes": [{"name": "pg1", "host": "127.0.0.1", "port": 5432, "data_dir": "/srv/pg"}],
           "storage": {"endpoint": "http://127.0.0.1:9", "bucket": "backups", "access_key": "k", "secret_key": "s"}}
    return cfgmod.parse(raw, env={}, path=str(tmp_path / "dbops.yaml"))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    data, cache = tmp_path / "data", tmp_path / "cache"
    (data / "pg_wal").mkdir(parents=True)
    cache.mkdir()
    for d in (rconf.PENDING_DIR, rconf.REMOTE_DIR):
        (cache / d).mkdir()
    return data, cache


def _ask(command: str, data: Path, name: str) -> tuple[int, bytes | None]:
    """Run restore_command for `name` as PostgreSQL does; (exit status, what it put at %p)."""
    out = data / "pg_wal" / "RECOVERYXLOG"
    out.unlink(missing_ok=True)
    cmd = command.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
    status = subprocess.run(["sh", "-c", cmd], cwd=data, timeout=30).returncode
    return status, out.read_bytes() if out.exists() else None


def test_a_linked_segment_is_read_in_place_and_anything_else_still_copied(cfg, folders):
    data, cache = folders
    (cache / SEG_A).write_bytes(b"fetched A")
    (cache / SEG_B).write_bytes(b"fetched B")
    assert walfolder.link_wal(cache, data) is True
    # A restart point recycled an old segment under B's name: pg_wal/B is not the fetched B
    (data / "pg_wal" / SEG_B).unlink()
    (data / "pg_wal" / SEG_B).write_bytes(b"old WAL, recycled")
    (data / "pg_wal" / SEG_C).write_bytes(b"old WAL, recycled")  # C was never fetched
    command = rconf.run_command(cache, cfg, linked=True)
    assert _ask(command, data, SEG_A) == (1, None)  # declined: PostgreSQL reads pg_wal/A, the fetched file
    assert _ask(command, data, SEG_B) == (0, b"fetched B")  # the cache's copy wins over the recycled file
    assert _ask(command, data, SEG_C) == (1, None)  # not fetched, not in the archive's run: not there
    plain = rconf.run_command(cache, cfg)
    assert _ask(plain, data, SEG_A) == (0, b"fetched A")  # not linked: copied, as before


def test_release_links_leaves_pg_wal_the_only_name_of_what_the_server_may_write(folders):
    data, cache = folders
    for name in (SEG_A, SEG_B, "00000002.history"):
        (cache / name).write_bytes(f"fetched {name}".encode())
    assert walfolder.link_wal(cache, data) is True
    (cache / SEG_C).write_bytes(b"fetched later, not linked")
    os.rename(data / "pg_wal" / SEG_A, data / "pg_wal" / "000000020000000000000009")  # recycled by a restart point
    assert walfolder.release_links(cache, data) == 3
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == [SEG_C]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([rconf.PENDING_DIR, rconf.REMOTE_DIR])
    for f in (data / "pg_wal").iterdir():
        assert f.stat().st_nlink == 1, f  # writing into any of them reaches no other name
    assert (data / "pg_wal" / "000000020000000000000009").read_bytes() == f"fetched {SEG_A}".encode()
    assert (cache / SEG_C).read_bytes() == b"fetched later, not linked"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (as dbops runs)")
def test_linked_files_are_given_to_the_owner_of_pg_wal(folders):
    """The server opens a segment for writing (an fsync before a rename): it must own what it reads in place."""
    data, cache = folders
    os.chown(data / "pg_wal", 999, 998)
    (cache / SEG_A).write_bytes(b"fetched A")  # fetched by root, as the plan's end-of-archive scan does
    assert walfolder.link_wal(cache, data) is True
    st = (data / "pg_wal" / SEG_A).stat()
    assert (st.st_uid, st.st_gid) == (999, 998)


def test_linked_files_are_marked_archived_as_restored_ones_are(folders):
    """PostgreSQL writes a .done status for each file its restore_command brings; a file read in place
    gets one too, so a server archiving after its promotion does not push it again."""
    data, cache = folders
    (data / "pg_wal" / "archive_status").mkdir()
    for name in (SEG_A, "00000002.history"):
        (cache / name).write_bytes(f"fetched {name}".encode())
    assert walfolder.link_wal(cache, data) is True
    assert sorted(p.name for p in (data / "pg_wal" / "archive_status").iterdir()) == sorted([
        "00000002.history.done", f"{SEG_A}.done"])
