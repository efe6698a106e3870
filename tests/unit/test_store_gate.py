"""A store that overlaps pg_checksums: the manifest waits for the check, and a failed check lists nothing."""

from __future__ import annotations

import threading

import pytest

from dbops.errors import DbopsError, ValidationError
from dbops.ops.backup.validate import Checksums, Validation
from dbops.repo.store import Cancelled

from test_backup_store import CountingStore, Layout, make_datadir, snapshot


@pytest.fixture
def env(tmp_path):
    return CountingStore(tmp_path / "store"), Layout("clusters/main"), make_datadir(tmp_path)


def test_the_manifest_waits_for_the_check_and_includes_its_record(env):
    store, layout, d = env
    release = threading.Event()
    val = Validation(backup_id="prev", ok=False)
    timings: dict[str, float] = {}

    def check(cancel) -> None:
        assert release.wait(10)
        val.checks.append({"check": "pg_checksums", "ok": True})

    val.checksums = Checksums(check, timings)
    seen = []

    def gate() -> None:
        seen.append(store.head(layout.manifest("b1")))
        release.set()
        val.settle()

    m = snapshot(store, layout, d, "b1", before_manifest=gate, timings=timings)
    assert seen == [None]  # every pack stored, no manifest yet, while the check ran
    assert val.ok and store.head(layout.manifest("b1")) is not None
    assert "checksums" in m.timings  # measured by the check, recorded in the manifest
    val.checksums.close()


def test_a_failed_check_stops_the_store_and_lists_nothing(env):
    store, layout, d = env
    val = Validation(backup_id="prev", ok=False)

    def check(cancel) -> None:
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    val.checksums = Checksums(check, {})
    assert val.checksums.failed.wait(10)
    with pytest.raises(ValidationError, match="pg_checksums found bad pages"), val.verdict_first():
        snapshot(store, layout, d, "b1", cancel=val.checksums.failed, before_manifest=val.settle)
    assert store.head(layout.manifest("b1")) is None and not val.ok
    val.checksums.close()


def test_a_check_that_fails_after_every_pack_is_stored_still_lists_nothing(env):
    store, layout, d = env
    release = threading.Event()
    val = Validation(backup_id="prev", ok=False)

    def check(cancel) -> None:
        assert release.wait(10)
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    val.checksums = Checksums(check, {})

    def gate() -> None:
        release.set()
        val.settle()

    with pytest.raises(ValidationError), val.verdict_first():
        snapshot(store, layout, d, "b1", cancel=val.checksums.failed, before_manifest=gate)
    assert store.head(layout.manifest("b1")) is None
    assert any(k.endswith(".pack") for k in store.puts)  # orphans: in no manifest, removed by retention
    val.checksums.close()


def test_a_store_error_gives_way_to_a_failed_check(env):
    """The store failed for its own reason while the check found bad pages: the bad pages are the news."""
    val = Validation(backup_id="prev", ok=False)

    def check(cancel) -> None:
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    val.checksums = Checksums(check, {})
    with pytest.raises(ValidationError, match="bad pages"), val.verdict_first():
        raise Cancelled("storing base/1/2 was cancelled")
    ok = Validation(backup_id="prev", ok=False)
    ok.checksums = Checksums(lambda cancel: None, {})
    with pytest.raises(OSError), ok.verdict_first():
        raise OSError("disk gone")
    for v in (val, ok):
        v.checksums.close()


def test_a_failed_store_stops_a_check_still_running_instead_of_waiting_for_it(tmp_path):
    """At TB sizes pg_checksums runs for minutes after a store that failed for its own reason: the tool
    is stopped (its process group gone), the store's error reported at once, and nothing is taken for
    the check's verdict (``failed`` stays clear)."""
    import time

    from dbops import proc
    from test_proc_cancel import _running

    pidfile = tmp_path / "pid"

    def check(cancel) -> None:  # a tool that would run for a minute
        proc.run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=120, cancel=cancel)

    val = Validation(backup_id="prev", ok=False)
    timings: dict[str, float] = {}
    val.checksums = Checksums(check, timings)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    t0 = time.monotonic()
    with pytest.raises(OSError, match="bucket gone"), val.verdict_first():
        raise OSError("bucket gone")
    assert time.monotonic() - t0 < 10  # not the minute the tool had left
    assert not val.checksums.failed.is_set() and not val.ok and "checksums" in timings
    with pytest.raises(proc.Cancelled):
        val.checksums.wait()
    val.checksums.close()
    assert not _running(pid)


def test_a_run_that_ends_without_asking_for_the_verdict_stops_the_check():
    """An interrupted run (Ctrl-C during the store) closes the check: stopped, not waited for."""
    import time

    from dbops import proc

    c = Checksums(lambda cancel: proc.run(["sleep", "60"], timeout=120, cancel=cancel), {})
    time.sleep(0.3)
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 10 and not c.failed.is_set()


def test_the_instance_goes_after_the_check_in_its_thread_without_holding_the_verdict():
    release = threading.Event()
    removed: list[bool] = []
    timings: dict[str, float] = {}

    def then() -> None:
        assert release.wait(10)
        removed.append(True)

    c = Checksums(lambda cancel: None, timings, then=then)
    c.wait()  # the verdict is there while the removal still runs
    assert removed == [] and "checksums" in timings and not c.failed.is_set()
    release.set()
    c.close()  # joins the removal
    assert removed == [True]


def test_a_failed_check_still_removes_the_instance_and_a_failed_removal_is_only_logged():
    calls: list[int] = []

    def check(cancel) -> None:
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    def then() -> None:
        calls.append(1)
        raise DbopsError("the container engine did not answer")

    c = Checksums(check, {}, then=then)
    with pytest.raises(ValidationError, match="bad pages"):
        c.wait()
    c.close()
    assert calls == [1] and c.failed.is_set()
