"""The incremental's bases taken locally: which pages replay will change, copied aside first.

Before the throwaway server replays the previous backup (restored into scratch, checked) to the
new target, the pages it is about to change are still the previous backup's own. The store of
the new incremental compresses each page delta against those very pages (its base), which it
would otherwise fetch back from storage. So, beside the download, the WAL to replay is read
(``pg_waldump --fullpage --fork=main``: after the previous backup's REDO point, the first change
of every page carries a full-page image, so these records name every page replay changes, new
pages aside) for the pages it names (:func:`predict`); once the download is done, before the
server starts, those pages are copied from the folder into a side file (:func:`save`,
:class:`dbops.repo.savedpages.SavedPages`). A page predicted wrongly, or one not predicted, costs
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
from dbops.pg import binaries, controldata, waldump
from dbops.pg.lsn import SEGMENT_RE
from dbops.repo.savedpages import SavedPages
from dbops.repo.tblspc import TBLSPC_DIR

_log = log.get("backup")

DEFAULT_TABLESPACE, GLOBAL_TABLESPACE = 1663, 1664
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


def wanted_files(data: Path, predicted: Predicted) -> dict[str, list[int]]:
    """{path of a segment file in the data folder: page numbers in it} for the predicted pages; a
    relation in a tablespace whose version folder is not exactly one is left out."""
    relseg = RELSEG_SIZE
    try:
        raw = controldata.read(str(data)).raw.get("Blocks per segment of large relation", "")
        relseg = int(raw) if raw.isdigit() and int(raw) > 0 else RELSEG_SIZE
    except Exception:  # noqa: BLE001  the default only changes which pages are saved, never their bytes
        pass
    versions: dict[int, str | None] = {}
    out: dict[str, list[int]] = defaultdict(list)
    for (spc, db, rel), blks in predicted.items():
        if spc == DEFAULT_TABLESPACE:
            folder = data / "base" / str(db)
        elif spc == GLOBAL_TABLESPACE:
            folder = data / "global"
        else:
            if spc not in versions:
                try:
                    found = [n for n in os.listdir(data / TBLSPC_DIR / str(spc)) if n.startswith("PG_")]
                except OSError:
                    found = []
                versions[spc] = found[0] if len(found) == 1 else None
            if versions[spc] is None:
                continue
            folder = data / TBLSPC_DIR / str(spc) / str(versions[spc]) / str(db)
        for blk in blks:
            seg, page = divmod(blk, relseg)
            out[str(folder / (f"{rel}.{seg}" if seg else str(rel)))].append(page)
    return dict(out)


def save_beside(data: Path, predicted: Predicted, side_file: Path) -> SavedPages | None:
    """Copy the predicted pages out of data (the previous backup just restored there, no server run
    on it yet) into side_file; None when that fails (the store then fetches every base)."""
    try:
        saved = SavedPages.save(wanted_files(data, predicted), str(side_file))
    except OSError as e:
        side_file.unlink(missing_ok=True)
        log.event(_log, logging.WARNING, "could not save the pages replay will change; the bases are fetched",
                  error=str(e))
        return None
    log.event(_log, logging.INFO, "pages replay will change saved as local bases", pages=saved.saved,
              files=len(saved.index))
    return saved
