"""The full backup's first store: the base copy stored as it is made (the direct copy, each range
once written, see :class:`dbops.ops.backup.livecopy.Copied`) or once complete (pg_basebackup),
while the target is captured and a throwaway server replays into it, checks and stops. Its
manifest is only written locally: the final store of the stopped folder reuses every block that
recovery did not touch (``store_snapshot(reuse=...)``), and takes the files recovery did not write
at all unread (their identity recorded once the copy had written them, :mod:`dbops.repo.known`).

It returns once every block is in a pack: the last packs upload while the final store runs
(:class:`dbops.repo.packs.PendingUploads`, finished before the final manifest is stored). At
scale 400 their upload took 0.7-1.5 s after the last block, and the final store waited for it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dbops import log
from dbops.config import Config
from dbops.errors import DbopsError
from dbops.ops.backup import livecopy
from dbops.ops.backup import tablespaces as tbs
from dbops.repo import manifest as mf
from dbops.repo import walk
from dbops.repo.known import Known
from dbops.repo.packs import PendingUploads
from dbops.repo.store import Cancelled, store_snapshot
from dbops.storage import ObjectStore
from dbops.storage.layout import Layout

_log = log.get("backup")

NICE = 5  # the store that follows the direct copy yields the cores to the copy, which validation waits for


def known_folder(data: Path, ts: tbs.ScratchTablespaces) -> Known:
    """The files of a complete base backup (pg_basebackup's, which has exited), recorded as they are
    now, before any server runs on them (:mod:`dbops.repo.known`); nothing on a failure to walk."""
    known = Known()
    try:
        folders = {t.oid: (str(ts.folder(t.oid)), t.location) for t in ts.known.values()}
        for e in walk.walk(str(data), (), None, folders):
            if e.type == mf.FILE:
                known.record(e.path, e.src or str(data / e.path))
    except (OSError, DbopsError) as e:
        log.event(_log, logging.INFO, "the base backup's files were not recorded; the final store reads them all",
                  error=str(e))
        return Known()
    return known


def prestore(cfg: Config, store: ObjectStore, layout: Layout, data: Path, backup_id: str, cancel: threading.Event,
             ts: tbs.ScratchTablespaces, plan: livecopy.CopyPlan | None, copied: livecopy.Copied | None,
             uploads: list[PendingUploads]) -> mf.Manifest | None:
    """Store the base backup as it is (with a copy plan: the files the direct copy is making, each
    range as soon as it is written); its packs still uploading are appended to ``uploads``. Two
    workers, though the server wants a core too: at scale 400 the store took 11.1-11.8 s with two
    against 12.7-14.1 s with one, the validation beside it no slower (docs/backups.md). Best effort:
    on any failure the final store simply hashes everything."""
    files, ready = None, None
    if plan is not None and copied is not None:
        files = plan.entries()

        def ready(path: str, start: int, end: int) -> None:
            if not copied.wait(path, start, end, cancel):
                raise Cancelled("the copy stopped before it was stored")
    try:
        return store_snapshot(
            store, layout, str(data), backup_id=backup_id, compression=cfg.compression,
            chunk_size=cfg.backup.chunk_size, pack_size=cfg.backup.pack_size, parallel=2,
            pg=mf.PgState("", "", 1, 0, 0, 0.0), include_wal=False, tmp_dir=str(data.parent), live=True,
            save=False, cancel=cancel, tablespaces={t: str(ts.folder(t.oid)) for t in ts.known.values()},
            files=files, ready=ready, nice=NICE if files is not None else 0, defer=uploads)
    except (OSError, DbopsError, Cancelled) as e:
        log.event(_log, logging.WARNING, "storing the base backup during validation failed; the store "
                  "after it reads everything", error=str(e))
        return None
