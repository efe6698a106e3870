"""The WAL folder of a throwaway instance: what ``restore_command`` copies from, and (``link_wal``)
the same files hard-linked into the data folder's pg_wal so recovery reads them in place."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from dbops import log

_log = log.get("runtime")

LINK_PREFIX = ".dbops-link-"


def restore_command(wal_path: str, linked: bool = False) -> str:
    """A restore_command that copies from a local folder (a missing file makes cp fail: 'not found').

    ``linked``: the folder's files are hard-linked into pg_wal (``link_wal``); a file there is
    declined (exit 1, PostgreSQL's "not in the archive") so recovery reads it in place. It runs in
    the data folder, so ``pg_wal/%f`` is the server's own copy."""
    cp = f'cp {shlex.quote(wal_path + "/")}%f "%p"'
    return f'test -f pg_wal/%f && exit 1; {cp}' if linked else cp


def link_wal(wal_dir: Path, data_dir: Path) -> bool:
    """Hard-link every file of wal_dir (segments and history files fetched and verified for this
    recovery) into data_dir/pg_wal, replacing a file of the same name there (as PostgreSQL replaces a
    pg_wal file with the one its restore_command brings). Returns False, having linked nothing,
    when a link cannot be made (pg_wal a link to another file system, a folder that refuses hard
    links): the caller then lets restore_command copy every file, as before.

    The links share their files with wal_dir: a server in recovery only reads WAL (it writes none
    until it is promoted, which a throwaway never is), and removes or renames old segments in
    pg_wal at a restart point, which leaves wal_dir's names alone."""
    pg_wal = Path(data_dir) / "pg_wal"
    if pg_wal.is_symlink() or not pg_wal.is_dir():
        return False
    made: list[Path] = []
    try:
        for f in sorted(Path(wal_dir).iterdir()):
            if not f.is_file():
                continue
            tmp = pg_wal / f"{LINK_PREFIX}{f.name}"
            tmp.unlink(missing_ok=True)
            os.link(f, tmp)
            made.append(tmp)
        for tmp in made:
            os.replace(tmp, pg_wal / tmp.name[len(LINK_PREFIX):])
    except OSError as e:
        for tmp in made:
            tmp.unlink(missing_ok=True)
        log.event(_log, logging.INFO, "WAL not linked into pg_wal; restore_command copies it", error=str(e))
        return False
    return True
