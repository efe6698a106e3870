"""While the throwaway server replays, its log is watched for a full disk: the scratch disk's
ENOSPC or a quota's EDQUOT stop the wait at once (the backup keeps its status), a full /dev/shm
does not pass for the disk (it is the environment's: runtime.shm_size)."""

from __future__ import annotations

import errno

import pytest

from dbops.ops.backup.replay import fail_on_full_disk


class _Logs:
    """A throwaway instance as the watch sees it: its log's tail."""

    def __init__(self, text: str):
        self.text = text

    def logs(self, tail: int) -> str:
        return self.text


LOG = "2026-12-03 10:00:00 UTC [77] LOG:  starting archive recovery\n"


@pytest.mark.parametrize("line", [
    'FATAL:  could not write to file "pg_wal/xlogtemp.81": No space left on device',
    'LOG:  could not extend file "base/5/16384": Disk quota exceeded',
    "cp: error writing 'pg_wal/RECOVERYXLOG': no space left on device",  # as Go programs print it
])
def test_a_full_disk_in_the_log_stops_the_wait(tmp_path, line):
    with pytest.raises(OSError) as ei:
        fail_on_full_disk(_Logs(LOG + line + "\n"), tmp_path)
    assert ei.value.errno == errno.ENOSPC and line.split(":")[-1].strip() in str(ei.value)


def test_a_full_dev_shm_is_not_the_disk(tmp_path):
    shm = ('ERROR:  could not resize shared memory segment "/PostgreSQL.2871" to 4194304 bytes: '
           "No space left on device\n")
    fail_on_full_disk(_Logs(LOG + shm), tmp_path)  # tmp_path has room: nothing to raise
    fail_on_full_disk(_Logs(LOG), tmp_path)
