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

    def check() -> None:
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

    def check() -> None:
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

    def check() -> None:
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

    def check() -> None:
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    val.checksums = Checksums(check, {})
    with pytest.raises(ValidationError, match="bad pages"), val.verdict_first():
        raise Cancelled("storing base/1/2 was cancelled")
    ok = Validation(backup_id="prev", ok=False)
    ok.checksums = Checksums(lambda: None, {})
    with pytest.raises(OSError), ok.verdict_first():
        raise OSError("disk gone")
    for v in (val, ok):
        v.checksums.close()


def test_the_instance_goes_after_the_check_in_its_thread_without_holding_the_verdict():
    release = threading.Event()
    removed: list[bool] = []
    timings: dict[str, float] = {}

    def then() -> None:
        assert release.wait(10)
        removed.append(True)

    c = Checksums(lambda: None, timings, then=then)
    c.wait()  # the verdict is there while the removal still runs
    assert removed == [] and "checksums" in timings and not c.failed.is_set()
    release.set()
    c.close()  # joins the removal
    assert removed == [True]


def test_a_failed_check_still_removes_the_instance_and_a_failed_removal_is_only_logged():
    calls: list[int] = []

    def check() -> None:
        raise ValidationError("pg_checksums found bad pages in the restored backup")

    def then() -> None:
        calls.append(1)
        raise DbopsError("the container engine did not answer")

    c = Checksums(check, {}, then=then)
    with pytest.raises(ValidationError, match="bad pages"):
        c.wait()
    c.close()
    assert calls == [1] and c.failed.is_set()
