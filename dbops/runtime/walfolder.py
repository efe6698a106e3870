"""The WAL folder of a throwaway instance: what ``restore_command`` copies from, and (``link_wal``)
the same files hard-linked into the data folder's pg_wal so recovery reads them in place."""

from __future__ import annotations

import logging
import os
import shlex
import stat
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
    pg_wal at a restart point, which leaves wal_dir's names alone. Every linked file is given to
    pg_wal's owner (when dbops runs as root), as a file restore_command copies is: PostgreSQL
    opens a segment for writing to fsync it before a rename (recycling it, or the last one at a
    promotion), and refuses to go on when it cannot. A server that is promoted after reading
    them calls :func:`release_links` first."""
    pg_wal = Path(data_dir) / "pg_wal"
    if pg_wal.is_symlink() or not pg_wal.is_dir():
        return False
    owner = pg_wal.stat()
    made: list[Path] = []
    try:
        for f in sorted(Path(wal_dir).iterdir()):
            if not f.is_file():
                continue
            if os.geteuid() == 0 and f.stat().st_uid != owner.st_uid:  # the server opens some for writing
                os.chown(f, owner.st_uid, owner.st_gid)
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
    _mark_archived([tmp.name[len(LINK_PREFIX):] for tmp in made], pg_wal / "archive_status", owner)
    return True


def _mark_archived(names: list[str], status_dir: Path, owner: os.stat_result) -> None:
    """A ``.done`` status for each linked file, as PostgreSQL writes one for each file its
    restore_command brings: they came from the archive, so a server that archives after its
    promotion never pushes them again. Best effort (without it they would only be pushed twice)."""
    if not status_dir.is_dir():
        return
    try:
        for name in names:
            done = status_dir / f"{name}.done"
            os.close(os.open(done, os.O_WRONLY | os.O_CREAT, 0o600))
            if os.geteuid() == 0:
                os.chown(done, owner.st_uid, owner.st_gid)
    except OSError as e:
        log.event(_log, logging.INFO, "could not mark the linked WAL as archived", error=str(e))


def release_links(wal_dir: Path, data_dir: Path) -> int:
    """Remove wal_dir's own name of every file it shares with data_dir/pg_wal (a ``link_wal`` link,
    wherever in pg_wal a restart point may have renamed it). Before a server that read them in place
    is promoted: a promoted server writes new WAL into the segments it recycles, and a file that
    anything else still reads under another name must never be written through. Returns how many
    names went."""
    pg_wal = Path(data_dir) / "pg_wal"
    shared: set[tuple[int, int]] = set()
    for f in pg_wal.iterdir():
        try:
            st = f.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed by a restart point meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            shared.add((st.st_dev, st.st_ino))
    gone = 0
    for f in Path(wal_dir).iterdir():
        try:
            st = f.stat(follow_symlinks=False)
        except FileNotFoundError:  # a download's temporary file (in the staged folder), renamed meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) in shared:
            f.unlink()
            gone += 1
    return gone
