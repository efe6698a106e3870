"""pg_checksums over what the throwaway server did not verify itself.

PostgreSQL verifies a page's checksum whenever it reads the page from disk into shared buffers
(``PageIsVerifiedExtended``): a bad page is an ERROR for the query (FATAL for replay), since the
throwaway forces ``ignore_checksum_failure`` and ``zero_damaged_pages`` off (its settings, and
again in the checks' sessions, where a role's or database's setting would apply). The checks
read the main fork of every table in full (``count(*)`` by a sequential scan, which reads every
block of the file, in the databases checked that way), so every page of those files was, by the
time the server stopped, either

* read from disk by the server (during replay or by the checks), hence verified, and not changed
  on disk since (a page is written only by the server, and in recovery setting hint bits does not
  dirty a page, see ``wal_log_hints`` in the validation's settings), or
* in shared buffers without having been read (replay initialised it from a full-page image or
  extended the file): such a page is dirty, so the restart point made once replay paused
  (:func:`dbops.ops.backup.replay.restartpoint_beside`) wrote it, with a checksum computed from
  the buffer, before the stop.

The second holds only when that restart point ran (the server logs it, ``restartpoint starting:
immediate wait``): when it was skipped (no checkpoint record replayed since the last one),
pages replay changed may never have been written, and the copy's own version of them was never
read. Then every file is left to pg_checksums, as are all files when a database was checked by
pg_amcheck instead.

So pg_checksums needs to read only the rest (indexes, free space and visibility maps, the tables
of databases not read by count(*), and files of no table: what a DROP left): it runs on a shadow
folder beside the copy with a copy of ``global/pg_control`` and hard links to every other file
it would read (``global``, ``base``, ``pg_tblspc/*/PG_*``; names kept, as a page's checksum
includes its block number), except the main-fork segments of the tables verified by the server.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from typing import Any, Callable, Container, Mapping, Sequence

from dbops import proc
from dbops.errors import ValidationError
from dbops.ops.backup.checks import tool_path
from dbops.ops.backup.environment import ended_cause, environment_error
from dbops.repo.model import PAGE

# pg_checksums reads these folders of a data folder (and follows pg_tblspc's links).
SCANNED = ("global", "base", "pg_tblspc")
CONTROL = "global/pg_control"
SHADOW = "checksums"  # the shadow folder's name beside the copy (in the run's scratch folder)

# pg_checksums exits 1 for a bad page and for any error alike. What it says of a page is the backup's
# fault; a file it could not read for one of these reasons is the machine's (the backup keeps its status).
BAD_PAGES = re.compile(r"checksum verification failed|^Bad checksums:\s+[1-9]", re.M)
ENVIRONMENT = re.compile(r"Permission denied|Operation not permitted|Input/output error|Too many open files|"
                         r"Cannot allocate memory|out of memory", re.I)
DENIALS = ("permission denied", "operation not permitted")
_DENIED = re.compile(r'could not (?:open|stat|read)[^"\n]*"([^"\n]+)"[^\n]*(?:Permission denied|Operation not permitted)')


def denied_by_the_copy(out: str, owner_uid: int, roots: Sequence[Path],
                       seen_as: Mapping[str, str] | None = None) -> bool:
    """Whether a file pg_checksums could not open was denied by the copy itself: the file, or a
    folder on its way inside one of ``roots`` (the copy, the shadow folder; the root included),
    owned by the owner (everything the restore wrote is) without the owner's read (a file) or search
    (a folder) permission: modes come from the manifest, so that is the backup's fault. False when
    they all grant it: something above the copy denied it (the machine). True too when the path is
    not named, or is not inside a root once ``seen_as`` ({a container's path: the host's}) is applied:
    then nothing says it was the machine."""
    m = _DENIED.search(out)
    if m is None:
        return True
    raw = m.group(1)
    for inside, host in (seen_as or {}).items():
        if raw == inside or raw.startswith(inside.rstrip("/") + "/"):
            raw = host + raw[len(inside.rstrip("/")):]
            break
    p = Path(raw)
    root = next((r for r in roots if p == r or r in p.parents), None)
    if root is None:
        return True
    on_the_way = [p, *p.parents[:len(p.parents) - len(root.parents)]]  # p up to root, root included
    for k, q in enumerate(on_the_way):
        try:
            st = os.stat(q)
        except OSError:
            return True
        need = 0o400 if k == 0 and not stat.S_ISDIR(st.st_mode) else 0o100 if k else 0o500
        if st.st_uid == owner_uid and st.st_mode & need != need:
            return True
    return False


def machine_cause(out: str, data: Path, data_path: str) -> str | None:
    """Why pg_checksums (output ``out``) failed when the machine is to blame, not the copy ``data``
    (``data_path``: the copy's path as the tool was given it): no bad page named, an environment
    cause named, and for a denial, nothing of the copy's own denying (:func:`denied_by_the_copy`)."""
    if BAD_PAGES.search(out) or (cause := ENVIRONMENT.search(out)) is None:
        return None
    if cause.group(0).lower() in DENIALS and denied_by_the_copy(
            out, data.stat().st_uid, [data.resolve(), (data.parent / SHADOW).resolve()],
            {data_path: str(data.resolve())}):
        return None
    return cause.group(0)


_SEGMENT = re.compile(r"^(.*?)(?:\.(\d+))?$")


@dataclass
class Shadow:
    path: Path
    linked: int  # files linked for pg_checksums to read
    left_out: int  # main-fork segments left out: verified by the server's reads
    left_out_bytes: int


SEGMENT_BYTES = 131072 * PAGE  # a relation segment file of PostgreSQL's default build (1 GiB)


def _segment_of(rel: str) -> tuple[str, int]:
    """A relation segment's path without its number, and the number (``base/5/1234.2`` -> (``base/5/1234``, 2))."""
    m = _SEGMENT.match(rel)
    assert m is not None
    return (m.group(1), int(m.group(2))) if m.group(2) is not None else (rel, 0)


def _read_by_scan(dirpath: str, name: str, seg: int) -> bool:
    """Whether a sequential scan reads segment ``seg`` of the relation file ``name`` (its base name):
    PostgreSQL counts a relation's blocks segment by segment up to the first that is not full, so a
    segment after a short one (which it never reads) is left to pg_checksums."""
    for k in range(seg):
        try:
            if os.stat(os.path.join(dirpath, f"{name}.{k}" if k else name)).st_size != SEGMENT_BYTES:
                return False
        except OSError:
            return False
    return True


def build(data: Path, shadow: Path, verified: Container[str], owner: str | None = None,
          linked: Callable[[str, os.stat_result, os.stat_result], None] | None = None) -> Shadow | None:
    """The shadow folder (new) for pg_checksums: every file it would read in ``data`` hard-linked
    at the same relative path, but the segments of the main forks in ``verified`` (paths relative to
    the data folder, as ``pg_relation_filepath`` gives them) that a sequential scan reads (every one
    up to the first that is not full); ``global/pg_control`` copied. Folders
    are owned by ``owner``. None when a link cannot be made (another filesystem, a link limit):
    pg_checksums then reads the copy itself. ``linked(path, before, after)``: each file linked, with
    its stat before and after (a link changes its ctime: see :meth:`dbops.repo.known.Known.linked`)."""
    count = left = left_bytes = 0
    made: set[str] = set()

    def folder(rel: str) -> None:
        if rel in made:
            return
        (shadow / rel).mkdir(mode=0o700, parents=True, exist_ok=True)
        made.add(rel)

    try:
        shadow.mkdir(mode=0o700)
    except OSError:
        return None
    try:
        for top in SCANNED:
            root = data / top
            if not root.is_dir():
                continue
            for dirpath, dirs, files in os.walk(root, followlinks=True):
                rel_dir = os.path.relpath(dirpath, data)
                folder(rel_dir)
                for name in files:
                    rel = os.path.join(rel_dir, name)
                    src = os.path.join(dirpath, name)
                    if rel == CONTROL:
                        shutil.copyfile(src, shadow / rel)
                        continue
                    base, seg = _segment_of(rel)
                    size = os.lstat(src).st_size
                    # a partial last block: a scan ignores it, pg_checksums refuses it (as before)
                    if base in verified and not size % PAGE and _read_by_scan(dirpath, os.path.basename(base), seg):
                        left += 1
                        left_bytes += size
                        continue
                    before = os.stat(src)
                    os.link(src, shadow / rel, follow_symlinks=False)
                    count += 1
                    if linked is not None:
                        linked(rel, before, os.stat(src))
                dirs.sort()
        if owner is not None:
            for rel in made:
                proc.chown_to(shadow / rel, owner)
            proc.chown_to(shadow, owner)
    except OSError:
        remove(shadow, data, linked)
        return None
    return Shadow(shadow, count, left, left_bytes)


def remove(shadow: Path, data: Path, linked: Callable[[str, os.stat_result, os.stat_result], None] | None) -> None:
    """Remove the shadow folder. Unlinking a link changes its file's ctime again: ``linked`` is told
    of each (as when it was made), so that the store's record of files not written since follows."""
    if linked is not None:
        for dirpath, _dirs, files in os.walk(shadow):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), shadow)
                try:
                    before = os.stat(data / rel)
                    os.unlink(os.path.join(dirpath, name))
                    linked(rel, before, os.stat(data / rel))
                except OSError:
                    continue  # left to rmtree; the file's record no longer matches: it is read
    shutil.rmtree(shadow, ignore_errors=True)


def pg_checksums(cfg, inst, data: Path, verified: Container[str] | None, checks: list[dict[str, Any]],
                 linked: Callable[[str, os.stat_result, os.stat_result], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
    """``pg_checksums --check`` of the stopped copy data: on a shadow folder beside it without the
    main forks in ``verified`` (the checks' tables, when the restart point was written; None: every
    file), else on the copy itself. Appends its record to checks (what it read, what it left to
    the server's own verification); raises ValidationError when it finds a bad page. ``linked``: see
    :func:`build`. ``cancel``: once set, the tool is stopped and :class:`dbops.proc.Cancelled` raised
    (its outcome is no longer wanted: the store it ran beside failed)."""
    shadow = build(data, data.parent / SHADOW, verified, cfg.os_user, linked) if verified else None
    try:
        if shadow is None:
            r = inst.run_tool([tool_path(cfg, "pg_checksums"), "--check", "-D", inst.data_path], check=False,
                              timeout=24 * 3600, cancel=cancel)
            record: dict[str, Any] = {"check": "pg_checksums", "files": "all"}
        else:
            where = str(shadow.path.resolve())
            r = inst.run_tool([tool_path(cfg, "pg_checksums"), "--check", "-D", where], check=False,
                              timeout=24 * 3600, reads=[Path(where)], cancel=cancel)
            record = {"check": "pg_checksums", "files": shadow.linked, "verified_by_server": shadow.left_out,
                      "verified_by_server_bytes": shadow.left_out_bytes}
        out = (r.stdout + r.stderr)[-2000:]
        # judged before the shadow folder goes: a denial is placed by looking at the path it names
        cause = machine_cause(out, data, inst.data_path) if r.returncode else None
        if cause is None and r.returncode not in (0, 1) and not BAD_PAGES.search(out):
            cause = ended_cause(r.returncode, "pg_checksums")
    finally:
        if shadow is not None:
            remove(shadow.path, data, linked)
    ok = r.returncode == 0
    checks.append({**record, "ok": ok})
    if not ok:
        if cause is not None:
            raise environment_error("pg_checksums could not read the restored copy", cause, out)
        raise ValidationError("pg_checksums found bad pages in the restored backup", detail=out)
