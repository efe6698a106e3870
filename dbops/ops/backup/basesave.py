"""The incremental's bases taken locally: which pages replay will change, copied aside first.

Before the throwaway server replays the previous backup (restored into scratch, checked) to the
new target, the pages it is about to change are still the previous backup's own. The store of
the new incremental compresses each page delta against those very pages (its base), which it
would otherwise fetch back from storage. So, beside the download, the WAL to replay is read
(``pg_waldump --fullpage --fork=main``: after the previous backup's REDO point, the first change
of every page carries a full-page image, so these records name every page replay changes, new
pages aside) for the pages it names (:func:`predict`); once the download is done, before the
server starts, those pages are copied from the folder into a side file
(:class:`dbops.repo.savedpages.Saver`: a file's pages as soon as the download wrote it and the
pages are known, the rest once the download is done, :func:`finish`). A page predicted wrongly, or one not predicted, costs
nothing but a fetch: the store takes a delta's base locally only when every page it needs is
saved and the parent's ref of the block is a whole block (then the folder's pages are that
block's), else it fetches the base from storage as before.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

from dbops import log, proc
from dbops.pg import binaries, waldump
from dbops.pg.lsn import SEGMENT_RE
from dbops.repo.savedpages import SavedPages, Saver, SegmentKey

_log = log.get("backup")

RELSEG_SIZE = 131072  # pages a relation segment file holds (PostgreSQL's default build)
WALDUMP_TIMEOUT = 3600.0

# {(tablespace OID, database OID, relfilenode): page numbers} of the main fork.
Predicted = dict[tuple[int, int, int], set[int]]


def predict(wal_dir: Path, bin_dir: str | None = None) -> Predicted:
    """The main-fork pages named by the full-page-image records of the WAL segments in wal_dir (one
    ``pg_waldump`` per timeline, its output streamed through a file). Best effort: on any failure
    (PostgreSQL before 15 has no ``--fullpage``) fewer or no pages, never an error."""
    by_tli: dict[str, list[str]] = {}
    for name in sorted(os.listdir(wal_dir)):
        if SEGMENT_RE.match(name):
            by_tli.setdefault(name[:8], []).append(name)
    out: Predicted = defaultdict(set)
    for segs in by_tli.values():
        with tempfile.TemporaryFile("w+") as dump, tempfile.TemporaryFile("w+") as err:
            try:
                p = proc.spawn([binaries.binary("pg_waldump", bin_dir), "--fullpage", "--fork=main", "-p",
                                str(wal_dir), segs[0], segs[-1]], env=waldump.ENV, stdout=dump, stderr=err)
            except OSError as e:
                log.event(_log, logging.WARNING, "pg_waldump could not run; the bases are fetched", error=str(e))
                return out
            try:
                p.wait(timeout=WALDUMP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.stop(p)
                p.wait()
                log.event(_log, logging.WARNING, "pg_waldump timed out; the bases are fetched")
                return out
            except BaseException:
                proc.stop(p)
                raise
            dump.seek(0)
            for line in dump:
                for ref in waldump.block_refs(line):
                    if ref.fork == "main":
                        out[(ref.spc, ref.db, ref.rel)].add(ref.blk)
            err.seek(0)
            problem = err.read()
            if p.returncode != 0 and "invalid record length" not in problem and "could not find file" not in problem:
                log.event(_log, logging.WARNING, "pg_waldump ended early; bases it did not name are fetched",
                          segments=f"{segs[0]}..{segs[-1]}", error=problem.strip()[-300:])
    return dict(out)


def segments(predicted: Predicted) -> dict[SegmentKey, list[int]]:
    """{segment file (:func:`dbops.repo.savedpages.segment_key`): page numbers in it} of the predicted
    pages (segments of RELSEG_SIZE pages: in a build with another size, pages are looked for in the
    wrong places and their bases fetched)."""
    out: dict[SegmentKey, list[int]] = defaultdict(list)
    for (spc, db, rel), blks in predicted.items():
        for blk in blks:
            seg, page = divmod(blk, RELSEG_SIZE)
            out[(spc, db, rel, seg)].append(page)
    return dict(out)


def predict_into(saver: Saver, wal_dir: Path, bin_dir: str | None = None) -> None:
    """The pages the WAL in wal_dir names, handed to the saver (which copies those of the files
    already downloaded at once); best effort: on any failure nothing is predicted."""
    try:
        wanted = segments(predict(wal_dir, bin_dir))
    except Exception as e:  # noqa: BLE001  the bases are then fetched, as without a prediction
        log.event(_log, logging.WARNING, "could not read the WAL for the pages replay will change; the bases "
                  "are fetched", error=str(e))
        wanted = {}
    saver.predicted(wanted)


def finish(saver: Saver) -> SavedPages | None:
    """The saved pages, once the download is done (``saver.finish()``, logged); None when saving failed
    (the store then fetches every base)."""
    saved = saver.finish()
    if saved is None:
        Path(saver.path).unlink(missing_ok=True)
        log.event(_log, logging.WARNING, "could not save the pages replay will change; the bases are fetched",
                  error=saver.problem)
        return None
    log.event(_log, logging.INFO, "pages replay will change saved as local bases", pages=saved.saved,
              files=len(saved.index))
    return saved
