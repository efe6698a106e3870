"""The WAL job beside the validation's download, tied to it both ways (dbops.ops.backup.validate.Beside)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dbops.errors import ValidationError
from dbops.ops.backup.validate import Beside, _Stopped


def test_a_failed_wal_job_stops_the_download_at_its_next_range_with_the_jobs_own_error():
    beside, seen = Beside(), []
    with ThreadPoolExecutor(max_workers=1) as pool:
        beside.job = pool.submit(lambda: (_ for _ in ()).throw(ValidationError("WAL segment X is missing")))
        beside.job.exception()  # let it end
        progress = beside.progress(lambda done, total: seen.append(done))
        with pytest.raises(_Stopped):
            progress(1, 10)
        with pytest.raises(ValidationError, match="WAL segment X is missing"):
            beside.result()
    assert seen == []


def test_a_running_wal_job_lets_the_download_report_its_progress():
    beside, seen, release = Beside(), [], threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        beside.job = pool.submit(release.wait, 10)
        progress = beside.progress(lambda done, total: seen.append((done, total)))
        progress(1, 10)
        progress(10, 10)
        release.set()
        assert beside.result() is True
    assert seen == [(1, 10), (10, 10)]
    beside.progress(None)(5, 10)  # no display: nothing to report, nothing raised


def test_a_failed_download_stops_the_wal_job_at_its_next_step():
    beside, steps, go = Beside(), [], threading.Event()

    def job():
        for name in ("capture", "fetch", "scan", "predict"):
            go.wait(10)
            beside.step()
            steps.append(name)
        return "done"

    with ThreadPoolExecutor(max_workers=1) as pool:
        beside.job = pool.submit(job)
        beside.stop.set()  # the download failed
        go.set()
        with pytest.raises(_Stopped):
            beside.result()
    assert steps == []
