"""The scratch folder's removal (runtime.scratch.remove_tree): large files unlinked by threads
first, then the rest; nothing outside the folder is touched through a link."""

from __future__ import annotations

import os
import threading

from dbops.runtime import scratch


def test_remove_tree_removes_everything_and_follows_no_link(tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "LARGE_FILE", 4096)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "big").write_bytes(b"o" * 8192)
    (outside / "deep" / "big").write_bytes(b"o" * 8192)
    d = tmp_path / "run-1-x-removing"
    for sub in ("data/base/5", "data/pg_wal", "ts/PG_15/5"):
        (d / sub).mkdir(parents=True)
    for n in range(6):
        (d / "data/base/5" / f"{16384 + n}").write_bytes(os.urandom(8192 * (n + 1)))
    (d / "data/base/5/small").write_bytes(b"s")
    (d / "ts/PG_15/5/16400").write_bytes(b"t" * 8192)
    os.symlink(outside, d / "data/pg_wal/link_to_dir")  # a folder link: removed, not followed
    os.symlink(outside / "big", d / "data/base/5/link_to_file")
    unlinked: list[str] = []
    real = scratch._unlink_quietly

    def counting(name, dirfd):
        unlinked.append(name)
        assert threading.current_thread().name.startswith("dbops-unlink")
        real(name, dirfd)

    monkeypatch.setattr(scratch, "_unlink_quietly", counting)
    scratch.remove_tree(d)
    assert not d.exists()
    assert sorted(unlinked) == sorted([f"{16384 + n}" for n in range(6)] + ["16400"])  # the large ones first
    assert (outside / "big").read_bytes() == b"o" * 8192 and (outside / "deep" / "big").exists()


def test_remove_tree_of_a_missing_folder_is_quiet(tmp_path):
    scratch.remove_tree(tmp_path / "gone")
    assert not (tmp_path / "gone").exists()
