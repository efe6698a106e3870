"""Manifest entries come from the bucket: untrusted input (issue 13 item 3).

:class:`PathGuard` checks each entry as it is read, in stream order, with memory that grows
only with the folder depth (format 3 streams entries one at a time). Every entry is checked
by the one function :meth:`PathGuard.check`; :meth:`dbops.repo.manifest.Manifest.entries`
applies it to every entry it hands out, whatever the format, and loading a manifest reads
every entry once through it, so a hostile manifest is refused before a restore acts on it.

Rules: a path is relative and "/"-separated, without empty, "." or ".." parts (only the data
folder itself is "."); entries come in walk order (parents first, siblings by name: strictly
increasing), so none is listed twice; an entry's parent is a folder listed before it (or a
tablespace's link pg_tblspc/<oid>, which a restore points at a folder it chose itself), so nothing
is ever written through a link the bucket names; links only where PostgreSQL makes them
(pg_tblspc/<oid>, pg_wal); a mode holds permission bits only (no setuid, setgid on folders
only); sizes are not negative.
"""

from __future__ import annotations

import re

from dbops.errors import ValidationError
from dbops.repo.model import DIR, FILE, SYMLINK, FileEntry, path_key

_TBLSPC_LINK_RE = re.compile(r"^pg_tblspc/[0-9]+$")
LINK_PATHS = ("pg_wal",)  # besides pg_tblspc/<oid>: where PostgreSQL itself makes symbolic links


class PathGuard:
    def __init__(self, what: str):
        self.what = what
        self.last: tuple[str, ...] | None = None
        self.dirs: list[tuple[str, ...]] = []  # the folders enclosing the current entry

    def _bad(self, e: FileEntry, reason: str) -> ValidationError:
        return ValidationError(f"{self.what}: refusing a hostile or damaged entry {e.path!r}: {reason}",
                               hint="the bucket's content is not what dbops wrote; restore another backup and "
                                    "investigate who can write to the bucket")

    def check(self, e: FileEntry) -> FileEntry:
        path = e.path
        if not isinstance(path, str) or not path or "\0" in path:
            raise self._bad(e, "not a path")
        if e.type not in (FILE, DIR, SYMLINK):
            raise self._bad(e, f"unknown type {e.type!r}")
        if path == ".":
            if e.type != DIR:
                raise self._bad(e, "the data folder itself must be a folder")
        else:
            if path.startswith("/"):
                raise self._bad(e, "an absolute path")
            if any(p in ("", ".", "..") for p in path.split("/")):
                raise self._bad(e, "empty, '.' or '..' path components")
        key = path_key(path)
        if self.last is not None and key <= self.last:
            raise self._bad(e, "listed twice or out of walk order")
        self.last = key
        while self.dirs and self.dirs[-1] != key[:len(self.dirs[-1])]:
            self.dirs.pop()
        parent = key[:-1]
        if parent and (not self.dirs or self.dirs[-1] != parent):
            raise self._bad(e, f"its parent {'/'.join(parent)!r} is not a folder listed before it")
        mode = e.mode
        if not isinstance(mode, int) or mode < 0 or mode & ~0o777 & ~(0o2000 if e.type == DIR else 0):
            raise self._bad(e, f"mode {mode!r} is not plain permission bits")
        if e.type == FILE and (not isinstance(e.size, int) or e.size < 0):
            raise self._bad(e, f"size {e.size!r}")
        if e.type == SYMLINK:
            if not (_TBLSPC_LINK_RE.match(path) or path in LINK_PATHS):
                raise self._bad(e, "a symbolic link where PostgreSQL makes none (only pg_tblspc/<oid> and pg_wal)")
            if not isinstance(e.target, str) or not e.target or "\0" in e.target:
                raise self._bad(e, "a symbolic link without a target")
        if e.type == DIR or (e.type == SYMLINK and _TBLSPC_LINK_RE.match(path)):
            # a tablespace's entries live under its link: a restore points the link at a folder it
            # chose itself (dbops.repo.tblspc) and writes them there, never where the bucket says
            self.dirs.append(key)
        return e
