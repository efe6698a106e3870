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
import subprocess
import tempfile
import threading
from array import array
from pathlib import Path

from dbops import log, proc
from dbops.pg import binaries, waldump
from dbops.repo.savedpages import SavedPages, Saver, SegmentKey

_log = log.get("backup")

RELSEG_SIZE = 131072  # pages a relation segment file holds (PostgreSQL's default build)
WALDUMP_TIMEOUT = 3600.0
# Pages predicted at most: a side file of 2 GiB, about 3 MiB of memory for the prediction and the
# index together (4 bytes a page, then 12). Past it, the rest of the pages' bases are fetched: a
# rewrite of a big table between two backups costs fetches, never memory.
MAX_PAGES = 262_144


class Predicted:
    """{segment file (:func:`dbops.repo.savedpages.segment_key`): page numbers in it}, in arrays of
    4-byte numbers, never more than ``limit`` pages in all (``full`` once the limit stopped it)."""

    def __init__(self, limit: int = MAX_PAGES):
        self.limit, self.full = limit, False
        self.by_segment: dict[SegmentKey, array] = {}
        self.count = 0
        self.compacted = 0  # count after the last compaction

    def add(self, spc: int, db: int, rel: int, blk: int) -> bool:
        """Add one page (its block number in the relation); False once the limit is reached."""
        seg, page = divmod(blk, RELSEG_SIZE)
        key = (spc, db, rel, seg)
        pages = self.by_segment.get(key)
        if pages is None:
            pages = self.by_segment[key] = array("I")
        pages.append(page)
        self.count += 1
        # Compacted when the count doubled since the last time (and not before the limit): each
        # compaction's work is paid by as many additions, however near the limit the pages stay.
        if self.count >= max(self.limit, 2 * self.compacted):
            self.compact()  # duplicates (a page named once per checkpoint) are not pages
            if self.count >= self.limit:
                self.full = True
                self.trim()
        return not self.full

    def compact(self) -> None:
        """Each segment's numbers sorted, once each."""
        for key, pages in self.by_segment.items():
            self.by_segment[key] = array("I", sorted(set(pages)))
        self.count = self.compacted = sum(len(p) for p in self.by_segment.values())

    def trim(self) -> None:
        """No more than ``limit`` pages (the last segments' go first; compacted)."""
        left = self.limit
        for key, pages in self.by_segment.items():
            if len(pages) > left:
                self.by_segment[key] = pages[:left]
            left -= len(self.by_segment[key])
        self.by_segment = {k: v for k, v in self.by_segment.items() if len(v)}
        self.count = self.compacted = sum(len(p) for p in self.by_segment.values())

    def segments(self) -> dict[SegmentKey, array]:
        self.compact()
        return self.by_segment


def predict(wal_dir: Path, bin_dir: str | None = None, limit: int = MAX_PAGES) -> Predicted:
    """The main-fork pages named by the full-page-image records of the WAL segments in wal_dir (one
    ``pg_waldump`` per timeline, its output read as it comes), at most ``limit`` of them. Best
    effort: on any failure (PostgreSQL before 15 has no ``--fullpage``) fewer or no pages, never an
    error."""
    out = Predicted(limit)
    for segs in waldump.segments_by_timeline(wal_dir):
        with tempfile.TemporaryFile("w+") as err:
            try:
                p = proc.spawn([binaries.binary("pg_waldump", bin_dir), "--fullpage", "--fork=main", "-p",
                                str(wal_dir), segs[0], segs[-1]], env=waldump.ENV, stdout=subprocess.PIPE,
                               stderr=err)
            except OSError as e:
                log.event(_log, logging.WARNING, "pg_waldump could not run; the bases are fetched", error=str(e))
                return out
            late = threading.Timer(WALDUMP_TIMEOUT, proc.stop, (p,))
            late.start()
            try:
                assert p.stdout is not None
                for raw in p.stdout:
                    if not all(out.add(r.spc, r.db, r.rel, r.blk)
                               for r in waldump.block_refs(raw.decode("utf-8", "replace")) if r.fork == "main"):
                        break
            except BaseException:
                proc.stop(p)
                raise
            finally:
                late.cancel()
                if out.full:  # the rest of its output is not wanted
                    proc.stop(p)
                p.stdout.close()  # type: ignore[union-attr]
                p.wait()
            if out.full:
                log.event(_log, logging.INFO, "more pages change than are saved locally; the others' bases are "
                          "fetched", saved_at_most=limit)
                return out
            err.seek(0)
            problem = err.read()
            if p.returncode != 0 and not waldump.ended_at_wal_end(problem):
                log.event(_log, logging.WARNING, "pg_waldump ended early; bases it did not name are fetched",
                          segments=f"{segs[0]}..{segs[-1]}", error=problem.strip()[-300:])
    return out


def predict_into(saver: Saver, wal_dir: Path, bin_dir: str | None = None) -> None:
    """The pages the WAL in wal_dir names, handed to the saver (which copies those of the files
    already downloaded at once); best effort: on any failure nothing is predicted."""
    try:
        wanted = predict(wal_dir, bin_dir).segments()
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
