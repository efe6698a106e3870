"""The async push spool and workers, in-process against LocalStore: verified completions only,
never a write into archive_status, failures handed to the waiting call, a dead pusher noticed,
the fast path answering without typer or boto3, and the restore prefetcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from walfake import (
    make_data_dir,
    segment_bytes,
    status_listing,
    write_file,
    write_segment,
)

from dbops import config as cfgmod
from dbops.errors import DbopsError, UnknownOutcomeError
from dbops.cli import fastpath
from dbops.ops.wal import commands as walcmd
from dbops.ops.wal.archive import WalArchive
from dbops.pg.walfile import cluster_identity
from dbops.ops.wal.commands import await_pusher
from dbops.ops.wal.spool import PUSHER, Spool, spool_for, spool_root
from dbops.ops.wal.worker import Prefetcher, Pusher
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from diskfill import fill_up, needs_root, tmpfs

SEGS = [f"0000000100000000000000{n:02X}" for n in range(1, 7)]


def make_cfg(tmp_path, data, **archive):
    raw = {"cluster": "t", "nodes": [{"name": "pg1", "data_dir": str(data)}],
           "storage": {"bucket": "bkt", "endpoint": "http://127.0.0.1:9", "prefix": "p"},
           "runtime": {"engine": "none"},
           "archive": {"spool_dir": str(tmp_path / "spool"), **archive}}
    return cfgmod.parse(raw)


@pytest.fixture
def env(tmp_path):
    data = make_data_dir(tmp_path / "data")
    cfg = make_cfg(tmp_path, data)
    store = LocalStore(tmp_path / "store")
    layout = Layout("p")
    spool = spool_for(cfg.archive, data, cfg.storage).ensure()
    return cfg, data, store, layout, spool


def pusher_for(env, **kw):
    _cfg, data, store, layout, spool = env
    return Pusher(WalArchive(store, layout), spool, cluster_identity(data), parallel=3, idle_exit=0.3, **kw)


class ThreadChild:
    """Stands in for the spawned worker process: poll() is None while the thread runs."""

    def __init__(self, target):
        self.t = threading.Thread(target=target, daemon=True)
        self.t.start()

    def poll(self):
        return None if self.t.is_alive() else 0


def test_spool_is_per_data_folder_and_cluster(tmp_path, env):
    cfg, data, *_ = env
    other = make_data_dir(tmp_path / "other", sysid=5)
    a, b = spool_for(cfg.archive, data, cfg.storage), spool_for(cfg.archive, other, cfg.storage)
    assert a.root != b.root and a.root.parent == b.root.parent == tmp_path / "spool"
    assert a.root.name.startswith("7312345678901234567-")


def test_pusher_uploads_everything_ready_and_never_touches_archive_status(env):
    _cfg, data, store, layout, spool = env
    paths = [write_segment(data, n) for n in SEGS]
    write_file(data, "00000002.history", b"1\t0/5000000\tx\n")
    before = status_listing(data)
    assert pusher_for(env).run() == 0
    assert status_listing(data) == before
    for n, p in zip(SEGS, paths):
        assert store.head(layout.wal_key(n)) is not None
        assert spool.is_stored(n, p)
        rec = json.loads((spool.done / n).read_text())
        assert rec["key"] == layout.wal_key(n) and len(rec["sha256"]) == 64
    assert spool.is_stored("00000002.history", data / "pg_wal" / "00000002.history")


def test_a_record_only_counts_for_the_very_file(env):
    _cfg, data, _store, _layout, spool = env
    p = write_segment(data, SEGS[0])
    pusher_for(env).run()
    assert spool.is_stored(SEGS[0], p)
    p.unlink()
    p.write_bytes(segment_bytes(SEGS[0]))  # same name, a new file (e.g. the data folder was rebuilt)
    assert not spool.is_stored(SEGS[0], p)


def test_records_are_forgotten_once_postgres_marked_the_file_done(env):
    _cfg, data, _store, _layout, spool = env
    write_segment(data, SEGS[0])
    pusher_for(env).run()
    st = data / "pg_wal" / "archive_status"
    os.rename(st / f"{SEGS[0]}.ready", st / f"{SEGS[0]}.done")  # what PostgreSQL does after exit 0
    spool.prune(keep=set(), older_than=0)
    assert not list(spool.done.iterdir())


def test_waiting_call_returns_once_the_pusher_stored_it(env):
    _cfg, data, _store, _layout, spool = env
    for n in SEGS:
        write_segment(data, n)
    started = []

    def start(sp):
        started.append(1)
        return ThreadChild(pusher_for(env).run)

    assert await_pusher(spool, SEGS[2], str(data / "pg_wal" / SEGS[2]), timeout=30, start_pusher=start)
    assert started == [1]
    assert not list(spool.wants.iterdir())


def test_a_file_without_ready_is_pushed_when_asked_for(env):
    _cfg, data, store, layout, spool = env
    p = write_segment(data, SEGS[0], ready=False)
    assert await_pusher(spool, SEGS[0], str(p), timeout=30,
                        start_pusher=lambda sp: ThreadChild(pusher_for(env).run))
    assert store.head(layout.wal_key(SEGS[0])) is not None


def test_the_pushers_failure_reaches_the_waiting_call(env):
    _cfg, data, store, layout, spool = env
    p = write_segment(data, SEGS[0], seed=1)
    WalArchive(store, layout).push(p, cluster_identity(data))
    p.write_bytes(segment_bytes(SEGS[0], seed=2))  # a different file under an archived name
    with pytest.raises(DbopsError) as ei:
        await_pusher(spool, SEGS[0], str(p), timeout=30, start_pusher=lambda sp: ThreadChild(pusher_for(env).run))
    assert int(ei.value.exit_code) == 13 and "sha256" in (ei.value.detail or "")
    assert not spool.is_stored(SEGS[0], p)


def test_an_old_failure_is_retried_not_reported(env):
    _cfg, data, _store, _layout, spool = env
    p = write_segment(data, SEGS[0])
    spool.record_failure(SEGS[0], DbopsError("storage was down an hour ago"))
    time.sleep(0.01)
    assert await_pusher(spool, SEGS[0], str(p), timeout=30, start_pusher=lambda sp: ThreadChild(pusher_for(env).run))


def test_a_pusher_that_keeps_dying_is_noticed(env):
    _cfg, data, _store, _layout, spool = env
    p = write_segment(data, SEGS[0])

    class Dead:
        def poll(self):
            return 1

    spawned = []
    assert not await_pusher(spool, SEGS[0], str(p), timeout=30, start_pusher=lambda sp: spawned.append(1) or Dead())
    assert spawned == [1, 1]


def test_no_confirmation_in_time_is_an_unknown_outcome(env):
    _cfg, data, _store, _layout, spool = env
    p = write_segment(data, SEGS[0])

    class Hung:
        def poll(self):
            return None

    with pytest.raises(UnknownOutcomeError) as ei:
        await_pusher(spool, SEGS[0], str(p), timeout=0.3, start_pusher=lambda sp: Hung())
    assert ei.value.exit_code == 8


def test_one_pusher_per_data_folder(env):
    *_, spool = env
    fd = spool.try_lock(PUSHER)
    assert fd is not None and spool.lock_held(PUSHER)
    assert spool.try_lock(PUSHER) is None
    assert spool.holder_pid(PUSHER) == os.getpid()
    os.close(fd)
    assert not spool.lock_held(PUSHER)


@needs_root
def test_a_full_spool_disk_still_gives_one_pusher(tmp_path):
    """The PID in the lock file only names the holder: a disk too full to write it still excludes."""
    with tmpfs(tmp_path / "spool", 64 * 1024) as root:
        spool = Spool(root / "s", tmp_path / "data", "archive")
        (root / "s").mkdir()
        fill_up(root / "ballast")
        fd = spool.try_lock(PUSHER)
        assert fd is not None and spool.lock_held(PUSHER)
        assert spool.try_lock(PUSHER) is None
        assert spool.holder_pid(PUSHER) is None  # unknown, not wrong
        os.close(fd)
        assert not spool.lock_held(PUSHER)


def test_push_answers_from_the_spool(env):
    cfg, data, *_ = env
    p = write_segment(data, SEGS[0])
    pusher_for(env).run()
    assert walcmd.push(cfg, str(p), start_pusher=lambda sp: pytest.fail("no pusher needed")) == "spool"


# --------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("args,expected", [
    (["wal-push", "pg_wal/X"], (None, "wal-push", ["pg_wal/X"])),
    (["-c", "/c.yaml", "wal-push", "pg_wal/X"], ("/c.yaml", "wal-push", ["pg_wal/X"])),
    (["--config=/c.yaml", "wal-fetch", "X", "pg_wal/RECOVERYXLOG"], ("/c.yaml", "wal-fetch", ["X", "pg_wal/RECOVERYXLOG"])),
    (["-v", "wal-push", "pg_wal/X"], None),
    (["wal-push", "--sync", "pg_wal/X"], None),
    (["wal-push"], None),
    (["wal", "status"], None),
])
def test_fast_path_recognises_only_the_exact_forms(args, expected):
    assert fastpath.parse(args) == expected


def test_fast_path_answers_a_stored_segment_without_typer_or_boto3(env, tmp_path):
    _cfg, data, *_ = env
    cfg_file = tmp_path / "dbops.yaml"
    cfg_file.write_text(json.dumps({"cluster": "t", "nodes": [{"name": "pg1", "data_dir": str(data)}],
                                    "storage": {"bucket": "bkt", "endpoint": "http://127.0.0.1:9", "prefix": "p"},
                                    "runtime": {"engine": "none"},
                                    "archive": {"spool_dir": str(tmp_path / "spool")}}))
    write_segment(data, SEGS[0])
    pusher_for(env).run()
    code = ("import json, sys; from dbops.cli import fastpath; "
            f"rc = fastpath.try_fast(['-c', {str(cfg_file)!r}, 'wal-push', 'pg_wal/{SEGS[0]}']); "
            "print(json.dumps([rc, [m for m in ('typer', 'click', 'boto3', 'botocore', 'cryptography') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=data, capture_output=True, text=True, timeout=60,
                         check=False)
    assert json.loads(out.stdout) == [0, []], out.stdout + out.stderr


# --------------------------------------------------------------------------- prefetch


def test_prefetcher_keeps_the_next_segments_verified_in_the_spool(env, tmp_path):
    cfg, data, store, layout, spool = env
    arc = WalArchive(store, layout)
    for n in SEGS:
        arc.push(write_segment(data, n, ready=False), cluster_identity(data))
    folder = spool.prefetch_dir(cfg.storage)
    folder.mkdir(parents=True, exist_ok=True)
    pf = Prefetcher(arc, spool, folder, depth=3, parallel=2, seg_size=1024 * 1024)
    spool.set_prefetch_want(SEGS[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pf.step(spool.prefetch_want())
        if not pf.inflight and all((folder / n).exists() for n in SEGS[1:4]):
            break
        time.sleep(0.02)
    assert sorted(os.listdir(folder)) == SEGS[1:4]
    # wal-fetch of the next one is served from the spool (restore target folder: another data dir)
    target = make_data_dir(tmp_path / "restored")
    (tmp_path / "spool").mkdir(exist_ok=True)
    tspool = spool_for(cfg.archive, target, cfg.storage).ensure()
    tfolder = tspool.prefetch_dir(cfg.storage)
    tfolder.mkdir(parents=True, exist_ok=True)
    os.replace(folder / SEGS[1], tfolder / SEGS[1])
    dest = target / "pg_wal" / "RECOVERYXLOG"
    assert walcmd.fetch_prefetched(cfg, SEGS[1], str(dest))
    assert dest.read_bytes() == (data / "pg_wal" / SEGS[1]).read_bytes()
    assert tspool.prefetch_want() == SEGS[1] and not (tfolder / SEGS[1]).exists()
    # the window moves on: files before it are dropped, the end of the archive is not an error
    pf.step(SEGS[4])
    deadline = time.monotonic() + 20
    while pf.inflight and time.monotonic() < deadline:
        time.sleep(0.02)
        pf.step(SEGS[4])
    assert sorted(os.listdir(folder)) == [SEGS[5]]


def test_fetch_prefetched_misses_quietly(env):
    cfg, data, *_ = env
    assert not walcmd.fetch_prefetched(cfg, SEGS[0], str(data / "pg_wal" / "RECOVERYXLOG"))
    assert not walcmd.fetch_prefetched(cfg, "00000002.history", str(data / "pg_wal" / "RECOVERYHISTORY"))



def test_pusher_retires_when_its_configuration_changes_or_a_caller_uses_another(env, tmp_path):
    from dbops.ops.wal.worker import Watch

    _cfg, data, _store, _layout, spool = env
    conf = tmp_path / "a.yaml"
    conf.write_text("x")
    p = write_segment(data, SEGS[0], ready=False)
    spool.want(SEGS[0], str(p), str(tmp_path / "b.yaml"))
    t0 = time.monotonic()
    assert pusher_for(env, watch=Watch([conf])).run() == 0
    assert time.monotonic() - t0 < 5 and not spool.is_stored(SEGS[0], p)
    spool.unwant(SEGS[0])
    w = Watch([conf])
    assert not w.changed()
    conf.write_text("xy")
    assert w.changed()


def test_workers_do_not_outlive_a_stopped_server(env):
    cfg, data, store, layout, spool = env
    (data / "postmaster.pid").unlink()
    p = write_segment(data, SEGS[0], seed=1)
    WalArchive(store, layout).push(p, cluster_identity(data))
    p.write_bytes(segment_bytes(SEGS[0], seed=2))  # fails for ever (a conflict): the pusher stays busy
    t0 = time.monotonic()
    assert pusher_for(env, orphan_exit=0.5).run() == 0
    assert time.monotonic() - t0 < 5 and spool.failure(SEGS[0]) is not None
    folder = spool.prefetch_dir(cfg.storage)
    spool.set_prefetch_want(SEGS[0])
    t0 = time.monotonic()
    assert Prefetcher(WalArchive(store, layout), spool, folder, depth=2, seg_size=1024 * 1024).run() == 0
    assert time.monotonic() - t0 < 6


def test_completions_are_per_archive_not_per_data_folder(tmp_path, env):
    """Issue 13 item 1: `wal-push` to archive a, then to archive b (another prefix), must not be
    answered for b from a's record; and a record naming another archive never counts."""
    cfg, data, store, layout, spool = env
    cfg_b = cfgmod.parse({"cluster": "t", "nodes": [{"name": "pg1", "data_dir": str(data)}],
                          "storage": {"bucket": "bkt", "endpoint": "http://127.0.0.1:9", "prefix": "other"},
                          "runtime": {"engine": "none"}, "archive": {"spool_dir": str(tmp_path / "spool")}})
    p = write_segment(data, SEGS[0])
    pusher_for(env).run()
    assert spool.is_stored(SEGS[0], p)
    spool_b = spool_for(cfg_b.archive, data, cfg_b.storage).ensure()
    assert spool_b.root != spool.root
    assert not spool_b.is_stored(SEGS[0], p)
    # the stored key is compared: a's record copied into b's spool is not b's completion
    (spool_b.done / SEGS[0]).write_text((spool.done / SEGS[0]).read_text())
    assert not spool_b.is_stored(SEGS[0], p)
    # bucket and endpoint count too
    for change in ({"bucket": "bkt2"}, {"endpoint": "http://127.0.0.2:9"}):
        raw = {"cluster": "t", "nodes": [{"name": "pg1", "data_dir": str(data)}],
               "storage": {"bucket": "bkt", "endpoint": "http://127.0.0.1:9", "prefix": "p", **change},
               "runtime": {"engine": "none"}, "archive": {"spool_dir": str(tmp_path / "spool")}}
        c = cfgmod.parse(raw)
        assert not spool_for(c.archive, data, c.storage).ensure().is_stored(SEGS[0], p)


def test_a_backlog_is_pushed_again_after_the_prefix_changes(tmp_path, env):
    """Issue 13 item 1: .ready files waiting while storage.prefix changes all reach the new prefix."""
    cfg, data, store, layout, spool = env
    for n in SEGS[:3]:
        write_segment(data, n)
    pusher_for(env).run()
    new_layout = Layout("moved")
    cfg_b = cfgmod.parse({"cluster": "t", "nodes": [{"name": "pg1", "data_dir": str(data)}],
                          "storage": {"bucket": "bkt", "endpoint": "http://127.0.0.1:9", "prefix": "moved"},
                          "runtime": {"engine": "none"}, "archive": {"spool_dir": str(tmp_path / "spool")}})
    spool_b = spool_for(cfg_b.archive, data, cfg_b.storage).ensure()
    for n in SEGS[3:]:
        write_segment(data, n)
    Pusher(WalArchive(store, new_layout), spool_b, cluster_identity(data), parallel=3, idle_exit=0.3).run()
    for n in SEGS:
        assert store.head(new_layout.wal_key(n)) is not None, n
        assert spool_b.is_stored(n, data / "pg_wal" / n)


def test_spool_folders_planted_by_another_user_are_refused(tmp_path, env):
    """Issue 13 item 11: a spool folder that is a link, or writable by others, is not used."""
    from dbops.errors import PreconditionError

    cfg, data, *_ = env
    sp = spool_for(cfg.archive, data, cfg.storage)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil

    shutil.rmtree(sp.root, ignore_errors=True)
    sp.root.symlink_to(elsewhere)
    with pytest.raises(PreconditionError, match="symbolic link"):
        sp.ensure()
    sp.root.unlink()
    sp.root.mkdir(mode=0o700)
    os.chmod(sp.root, 0o777)
    with pytest.raises(PreconditionError, match="writable by other users"):
        sp.ensure()
    os.chmod(sp.root, 0o700)
    sp.ensure()


def test_the_default_spool_is_never_a_shared_temporary_folder(tmp_path):
    from dbops.config import ArchiveSettings

    data = make_data_dir(tmp_path / "ro" / "data")
    os.chmod(tmp_path / "ro", 0o555)
    try:
        root = spool_root(ArchiveSettings(), data)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    if os.geteuid() != 0:  # root may write anywhere: the folder beside the data folder is used
        assert not str(root).startswith("/tmp") and ".dbops" in str(root)


def test_an_untrusted_spool_is_bypassed_and_the_file_still_stored_before_the_answer(tmp_path, env, monkeypatch):
    """Issue 13 item 11: wal-push does not use a spool folder another user could control; it stores
    the segment itself (archiving goes on) instead of failing."""
    cfg, data, store, layout, _spool = env
    root = tmp_path / "spool"
    os.chmod(root, 0o777)
    p = write_segment(data, SEGS[0])
    pushed = []
    monkeypatch.setattr(walcmd, "push_sync", lambda c, path, **kw: pushed.append(path))
    assert walcmd.push(cfg, str(p), start_pusher=lambda sp: None) == "sync"
    assert pushed == [str(p)]
    os.chmod(root, 0o700)
