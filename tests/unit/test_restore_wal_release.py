"""The restore's WAL fetched ahead (dbops.ops.restore.wal.WalAhead): segments are handed to replay
(linked into the cache under their own name, their pending marker removed) oldest first, each only
after the scan read it; a refusal, a missing or a damaged segment stops the handing over there."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from walfake import make_data_dir, write_segment

from dbops.errors import PreconditionError, ValidationError
from dbops.ops.restore import conf as rconf
from dbops.ops.restore.wal import WalAhead
from dbops.ops.wal.archive import WalArchive
from dbops.pg.walfile import cluster_identity
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore


def seg(n: int, tli: int = 1) -> str:
    return f"{tli:08X}00000000{n:08X}"


class HeldStore(LocalStore):
    """A local store whose GET of one key waits until `go` is set (a slow segment)."""

    def __init__(self, root, key: str | None = None):
        super().__init__(root)
        self.key, self.go = key, threading.Event()

    def get_to_file(self, key, path, *args, **kwargs):
        if key == self.key:
            assert self.go.wait(30)
        return super().get_to_file(key, path, *args, **kwargs)


def archived(tmp_path: Path, names: list[str], held: str | None = None) -> tuple[HeldStore, Layout]:
    layout = Layout("p")
    store = HeldStore(tmp_path / "store", layout.wal_key(held) if held else None)
    data = make_data_dir(tmp_path / "data")
    arc = WalArchive(store, layout, cluster_name="t")
    for p in [write_segment(data, n) for n in names]:
        arc.push(p, cluster_identity(data))
    return store, layout


class Scan:
    """Records each run it is handed, and whether any of its new segments was already replay's."""

    def __init__(self, cache: Path, refuse: str | None = None, on_call=None):
        self.cache, self.refuse, self.on_call = cache, refuse, on_call
        self.runs: list[list[str]] = []
        self.early: list[str] = []

    def __call__(self, names: list[str], folder: Path) -> None:
        assert folder == self.cache / rconf.STAGED_DIR and all((folder / n).is_file() for n in names)
        new = names[1:] if self.runs and names[0] == self.runs[-1][-1] else names
        self.early += [n for n in new if (self.cache / n).exists()]
        self.runs.append(list(names))
        if self.on_call:
            self.on_call(names)
        if self.refuse in new:
            raise PreconditionError(f"refused at {self.refuse}")


def ahead(tmp_path, store, layout, names, scan) -> tuple[WalAhead, Path]:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    a = WalAhead(store, layout, names, cache, parallel=2, scan=scan)
    return a, cache


def released(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_file())


def test_segments_are_handed_to_replay_in_order_each_after_the_scan_read_it(tmp_path):
    names = [seg(n) for n in range(0x10, 0x16)]
    store, layout = archived(tmp_path, names, held=seg(0x12))
    cache = tmp_path / "cache"
    seen: list[tuple[bool, bool]] = []  # while 0x12 is held: is it pending, is it replay's

    def on_call(run):
        if not store.go.is_set():
            seen.append(((cache / rconf.PENDING_DIR / seg(0x12)).exists(), (cache / seg(0x12)).exists()))
            store.go.set()

    scan = Scan(cache, on_call=on_call)
    a, _ = ahead(tmp_path, store, layout, names, scan)
    a.prepare([])
    assert sorted(p.name for p in (cache / rconf.PENDING_DIR).iterdir()) == names
    stats = a.run()
    assert released(cache) == names and not list((cache / rconf.PENDING_DIR).iterdir())
    assert stats.segments == 6 and not stats.missing and not a.failed
    assert scan.early == [], "a segment reached replay before the scan read it"
    # every segment read once, in order; each run after the first starts with the one before it
    assert [n for i, r in enumerate(scan.runs) for n in (r[1:] if i else r)] == names
    assert all(r[0] == scan.runs[i - 1][-1] for i, r in enumerate(scan.runs) if i)
    # the first run stopped before the held segment, which was still pending, not replay's
    assert seg(0x12) not in scan.runs[0] and seen == [(True, False)]


def test_a_refusal_stops_the_handing_over_at_its_run_and_is_raised_by_check(tmp_path):
    names = [seg(n) for n in range(0x20, 0x25)]
    store, layout = archived(tmp_path, names, held=seg(0x22))
    cache = tmp_path / "cache"

    def on_call(run):
        store.go.set()  # after the first run: 0x22 .. 0x24 arrive as one more run

    scan = Scan(cache, refuse=seg(0x23), on_call=on_call)
    a, _ = ahead(tmp_path, store, layout, names, scan)
    a.prepare([])
    a.run()
    # the runs before the refused one, and nothing of it (how the runs fell depends on the fetches' timing)
    refused = scan.runs[-1]
    first_new = refused[1] if len(scan.runs) > 1 and refused[0] == scan.runs[-2][-1] else refused[0]
    assert seg(0x23) in refused and released(cache) == names[:names.index(first_new)], (scan.runs, released(cache))
    assert seg(0x20) in released(cache)
    assert not list((cache / rconf.PENDING_DIR).iterdir())  # nothing waits: replay finds the rest "not there"
    assert isinstance(a.scan_error, PreconditionError)
    with pytest.raises(PreconditionError, match="refused at 000000010000000000000023"):
        a.check()


def test_a_missing_segment_ends_the_run_handed_over_even_with_later_ones_archived(tmp_path):
    names = [seg(n) for n in range(0x30, 0x35)]
    store, layout = archived(tmp_path, [n for n in names if n != seg(0x32)])
    cache = tmp_path / "cache"
    a, _ = ahead(tmp_path, store, layout, names, Scan(cache))
    a.prepare([])
    stats = a.run()
    assert released(cache) == [seg(0x30), seg(0x31)] and stats.missing == [seg(0x32)]
    a.check()  # a missing segment is no error of its own: replay says where the archive ends


def test_a_damaged_segment_is_not_handed_over_and_check_names_it(tmp_path):
    names = [seg(n) for n in range(0x40, 0x43)]
    store, layout = archived(tmp_path, names)
    key = layout.wal_key(seg(0x41))
    body = bytearray(store.get(key))
    body[len(body) // 2] ^= 0xFF
    store.put(key, bytes(body), metadata=store.head(key).metadata)
    cache = tmp_path / "cache"
    a, _ = ahead(tmp_path, store, layout, names, Scan(cache))
    a.prepare([])
    a.run()
    assert released(cache) == [seg(0x40)]
    with pytest.raises(ValidationError, match=seg(0x41)):
        a.check()


def test_segments_the_plan_already_read_wait_for_the_scan_too(tmp_path):
    names = [seg(n) for n in range(0x50, 0x53)]
    store, layout = archived(tmp_path, names)
    cache = tmp_path / "cache"
    cache.mkdir()
    WalArchive(store, layout).fetch(seg(0x52), cache / seg(0x52))  # the plan read the archive's end
    scan = Scan(cache)
    a, _ = ahead(tmp_path, store, layout, names, scan)
    a.prepare([])
    assert released(cache) == [] and (cache / rconf.PENDING_DIR / seg(0x52)).exists()
    a.run()
    assert released(cache) == names and scan.early == []


def test_the_window_holds_the_fetch_back_until_replay_asks_and_removes_what_replay_left_behind(tmp_path):
    names = [seg(n) for n in range(0x60, 0x6A)]
    store, layout = archived(tmp_path, names)
    cache = tmp_path / "cache"
    cache.mkdir()
    a = WalAhead(store, layout, names, cache, parallel=2, scan=Scan(cache), window=2)
    assert WalAhead.held(names, 2) == names[:5] and WalAhead.held(names, None) == names
    a.prepare([])
    job = threading.Thread(target=a.run, daemon=True)
    job.start()
    most = 0

    def present() -> list[str]:
        return sorted({p.name for d in (cache, cache / rconf.STAGED_DIR) for p in d.iterdir() if p.name in names})

    def wait_for(cond) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            if time.monotonic() > deadline:
                a.stop()
                raise AssertionError((present(), released(cache)))
            time.sleep(0.01)

    # no server yet: the first `window` segments only
    wait_for(lambda: released(cache) == names[:2])
    time.sleep(0.3)
    assert present() == names[:2]
    for name in names:  # replay, as its restore_command does: ask, wait, read
        (cache / rconf.ASKED_DIR / name).touch()
        wait_for(lambda: (cache / name).exists())
        most = max(most, len(present()))
    job.join(20)
    assert not job.is_alive() and a.stats.segments == len(names)
    assert most <= len(WalAhead.held(names, 2)), most
    # the last fetch (0x69) waited for replay to ask for 0x67, and removed what was two behind that
    assert not set(names[:5]) & set(present()), present()


def test_replays_restore_command_leaves_the_name_it_asks_for_and_still_copies_it(tmp_path):
    from types import SimpleNamespace

    from dbops import proc

    cache = tmp_path / "cache"
    for d in (cache, cache / rconf.ASKED_DIR, cache / rconf.PENDING_DIR, cache / rconf.REMOTE_DIR):
        d.mkdir()
    (cache / seg(0x70)).write_bytes(b"wal")
    data = tmp_path / "data"
    (data / "pg_wal").mkdir(parents=True)
    cmd = rconf.run_command(cache, SimpleNamespace(path=str(tmp_path / "c.yaml")))
    ok = proc.run(["sh", "-c", cmd.replace("%f", seg(0x70)).replace("%p", "pg_wal/RECOVERYXLOG")], cwd=str(data),
                  check=False)
    assert ok.returncode == 0 and (data / "pg_wal/RECOVERYXLOG").read_bytes() == b"wal"
    gone = proc.run(["sh", "-c", cmd.replace("%f", seg(0x71)).replace("%p", "pg_wal/RECOVERYXLOG")], cwd=str(data),
                    check=False)
    assert gone.returncode == 1  # not there: PostgreSQL's "not in the archive"
    assert sorted(p.name for p in (cache / rconf.ASKED_DIR).iterdir()) == [seg(0x70), seg(0x71)]
    # a folder it cannot write to does not fail the request
    (cache / rconf.ASKED_DIR / seg(0x70)).unlink()
    (cache / rconf.ASKED_DIR / seg(0x71)).unlink()
    (cache / rconf.ASKED_DIR).rmdir()
    again = proc.run(["sh", "-c", cmd.replace("%f", seg(0x70)).replace("%p", "pg_wal/X")], cwd=str(data), check=False)
    assert again.returncode == 0 and (data / "pg_wal/X").read_bytes() == b"wal"
