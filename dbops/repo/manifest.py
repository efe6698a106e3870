"""The backup manifest: everything needed to restore one backup on its own.

Stored at ``Layout.manifest(id)``, written last and with ``if_absent``: a backup exists
exactly when its manifest does. Encodings: :mod:`dbops.repo.mformat` (format 5 written,
formats 1 to 4 read); the header's fields: :mod:`dbops.repo.mheader`.

A file's content is a list of fixed-size blocks (``FileEntry.block``, chosen by file size:
see :func:`dbops.repo.blocks.block_size`; the last one may be shorter), each identified by
the sha256 of its raw content. Blocks are stored in frames (several blocks compressed as one
zstd frame), so a block ref names its frame: ``pack`` (id), ``offset`` and ``length`` of the
frame inside that pack object, ``frame_raw`` (its uncompressed length), and the block's place
in the decompressed frame: ``at`` and ``raw`` (its length).

* ``pack is None``: an all-zero block, never stored (restored as a hole);
* ``length == frame_raw``: the frame is stored uncompressed; shorter: a zstd frame;
* ``mask != 0`` (format 4): a page delta: the frame holds only the block's pages set in the
  mask, and ``base`` (a whole-block ref, in this backup's parent chain) holds the rest;
  ``on_base`` (format 5): the frame is compressed with the base block as zstd dictionary.

A manifest read from storage keeps its entries in a local file and hands them out one at a
time (:meth:`Manifest.entries`): memory stays flat in the size of the database.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zstandard

import dbops
from dbops.errors import ConflictError, NotFoundError, ValidationError
from dbops.repo import mformat
from dbops.repo.mlisting import Listed
from dbops.repo.mheader import FORMAT_VERSION, header_dict, header_fields, summary_metadata
from dbops.repo.untrusted import PathGuard
from dbops.repo.model import DIR, FILE, SYMLINK, ChunkRef, FileEntry, PgState, path_key
from dbops.repo.tblspc import Tablespace, check_entry
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.probe import put_file_once

MAGIC = mformat.MAGIC2
NO_PACK = mformat.NO_PACK

__all__ = ["DIR", "FILE", "SYMLINK", "ChunkRef", "FileEntry", "Manifest", "PgState", "load", "save", "path_key"]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# A local copy of a manifest (about 0.5-0.9 MB per GB of database) lives as long as the command that
# holds it: named with that process's id and its PID namespace, so that the copy a killed run left
# (SIGKILL, the OOM killer: no exit handler ran) is recognised by the next command and removed. A
# process of another PID namespace (a container sharing the folder) cannot be seen: its copies are
# never judged.
TMP_PREFIX = "dbops-manifest-"
_STALE_NAME = re.compile(re.escape(TMP_PREFIX) + r"p([0-9]{1,10})n([0-9]{1,20})-[A-Za-z0-9_]+\Z")
_swept = False


def _pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid); 0 where it cannot be read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _tmp_file(tmp_dir: str | None = None) -> str:
    """A new, empty local file for one manifest copy (the system's temporary folder by default,
    swept first, once per process, of the copies killed runs left there)."""
    if tmp_dir is None:
        _sweep_once()
    fd, path = tempfile.mkstemp(prefix=f"{TMP_PREFIX}p{os.getpid()}n{_pid_namespace()}-", dir=tmp_dir)
    os.close(fd)
    return path


def sweep_stale_copies(folder: str | None = None) -> list[str]:
    """Remove the manifest copies in ``folder`` (the system's temporary folder) that killed dbops
    processes left: this user's regular files named by :func:`_tmp_file` in this PID namespace, whose
    process no longer exists (a file is named only by the process it names: when that process is
    gone, so is its user). Anything else is left alone. Returns the paths removed."""
    folder = folder or tempfile.gettempdir()
    ns = _pid_namespace()
    removed: list[str] = []
    if not ns:
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _STALE_NAME.match(name)
        if m is None or int(m.group(2)) != ns or int(m.group(1)) == os.getpid():
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # its process lives
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue  # a process of another user has that id now
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def _sweep_once() -> None:
    global _swept
    if not _swept:
        _swept = True
        sweep_stale_copies()


class Manifest:
    """One backup's manifest: the header fields, and its entries (in memory, or in a local file)."""

    def __init__(self, backup_id: str, pg: PgState, chunk_size: int, compression: dict[str, Any],
                 files: list[FileEntry] | None = None, parent_id: str | None = None, created: float | None = None,
                 dbops_version: str = dbops.__version__, logical_size: int = 0, stored_bytes: int = 0,
                 counts: dict[str, int] | None = None, timings: dict[str, float] | None = None,
                 meta: dict[str, Any] | None = None, format: int = FORMAT_VERSION,
                 tablespaces: list[Tablespace] | None = None):
        self.backup_id, self.pg, self.chunk_size, self.compression = backup_id, pg, chunk_size, compression
        self.parent_id = parent_id
        self.created = time.time() if created is None else created
        self.dbops_version = dbops_version
        self.logical_size, self.stored_bytes = logical_size, stored_bytes
        self.counts = dict(counts or {})  # blocks, new, reused, zero, packs, frames
        self.timings = dict(timings or {})  # seconds per phase
        self.meta = dict(meta or {})  # free-form, filled by the workflow
        self.format = format
        self.tablespaces = list(tablespaces or ())  # user tablespaces (see dbops.repo.tblspc)
        self._files = list(files) if files is not None else None
        self._source: tuple[str, int, int] | None = None  # (local file, offset of the entry stream, format): 3, 4
        self._packs: list[str] | None = None  # formats 3 to 5: the pack table
        self._referenced: int | None = None
        self.entry_count: int | None = None
        self._tables_checked = False  # every entry's blocks read and checked once (see load)
        self._listed: Listed | None = None  # the listing, compact, while kept (see kept_listing)
        self._kept = 0

    # ------------------------------------------------------------------ entries

    def _attach(self, path: str, offset: int, packs: list[str], referenced: int, entries: int, fmt: int) -> None:
        """Back the entries by a local format 3, 4 or 5 file, removed when this object goes."""
        self._files, self._source = None, (path, offset, fmt)
        self._packs, self._referenced, self.entry_count = list(packs), referenced, entries
        weakref.finalize(self, _unlink, path)

    def header_only(self, *, packs: list[str], referenced: int, entries: int) -> None:
        """Mark as read without entries (see :func:`load_header`): asking for them is a bug."""
        self._files, self._source = None, None
        self._packs, self._referenced, self.entry_count = packs, referenced, entries

    def entries(self) -> Iterator[FileEntry]:
        """Every entry, in walk order, one at a time (each checked for consistency)."""
        return self._entries(True)

    def listing(self) -> Iterator[FileEntry]:
        """Every entry's path, type, mode, time, size and link target, in walk order, each checked by
        the path guard; files without their blocks when the manifest is stored (their block tables are
        not decoded: a pass that reads no content costs a fraction of one over :meth:`entries`)."""
        return self._entries(False)

    @contextmanager
    def kept_listing(self) -> Iterator[Listed | None]:
        """Within: :meth:`listing` served from a compact copy (:class:`dbops.repo.mlisting.Listed`),
        read from the stored entries once on entry (each checked by the path guard, as every listing
        is), instead of each listing reading them again; the copy is dropped on leaving. Yields it
        (None for a manifest held in memory: its listing reads no stored entries). A listing kept by
        :func:`load` (``keep_listing``) is used, and dropped on leaving too."""
        if self._source is not None and self._listed is None:
            self._listed = Listed(self._entries(False), f"manifest of backup {self.backup_id}")
        self._kept += 1
        try:
            yield self._listed
        finally:
            self._kept -= 1
            if not self._kept:
                self._listed = None

    def _entries(self, tables: bool) -> Iterator[FileEntry]:
        if not tables and self._listed is not None:  # checked by the guard when it was kept
            yield from self._listed
            return
        if self._source is None and self._files is None and self._packs is not None:
            raise RuntimeError(f"manifest of backup {self.backup_id} was read without its entries")
        guard = PathGuard(f"manifest of backup {self.backup_id}")  # every entry, whatever the format
        if self._source is not None:
            for f in mformat.read_entries(self._source[0], self._source[1], self._packs or [],
                                          self.entry_count or 0, f"manifest of backup {self.backup_id}",
                                          self._source[2], tables=tables):
                yield guard.check(f)
            return
        for f in self._files or ():
            if f.type == FILE and not f.block:
                f = FileEntry(f.path, f.type, f.mode, f.mtime_ns, f.size, f.target, f.chunks, self.chunk_size)
            yield guard.check(f)

    @property
    def files(self) -> list[FileEntry]:
        """Every entry in a list: for small manifests and tests; the workflows use :meth:`entries`."""
        return list(self.entries())

    def packs(self) -> set[str]:
        """Every pack id this backup's files point into."""
        if self._packs is not None:
            return set(self._packs)
        return {r.pack for f in self.entries() for c in f.chunks for r in (c, c.base) if r is not None and r.pack}

    def check(self) -> None:
        """Structural consistency: every file's blocks cover exactly its size; every entry under
        pg_tblspc belongs to a listed tablespace."""
        oids = {t.oid for t in self.tablespaces}
        if self._tables_checked:  # every block table was read and checked when it was loaded
            for f in self.listing():
                check_entry(oids, f.path, f.type)
            return
        for f in self.entries():
            mformat.check_entry(f, f"backup {self.backup_id}")
            check_entry(oids, f.path, f.type)

    def referenced_bytes(self) -> int:
        """Bytes in storage this backup reads: every stored frame it points into, once."""
        if self._referenced is not None:
            return self._referenced
        seen: dict[tuple[str, int], int] = {}  # several blocks may share one frame
        for f in self.entries():
            for c in f.chunks:
                for r in (c, c.base):  # a page delta reads its base block's frame too
                    if r is not None and r.pack is not None:
                        seen[(r.pack, r.offset)] = r.length
        return sum(seen.values())

    # ------------------------------------------------------------------ header

    def to_dict(self) -> dict[str, Any]:
        return header_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(**header_fields(d))

    def header(self, writer: mformat.Writer) -> dict[str, Any]:
        d = self.to_dict()
        d["format"] = writer.format
        d.update(packs=list(writer.packs), referenced_bytes=writer.referenced_bytes, entries=writer.entries)
        return d

    # ------------------------------------------------------------------ files and bytes

    def write_file(self, path: str) -> None:
        """Encode as format 5 into a local file (entries streamed from wherever they are now)."""
        w = mformat.Writer(path)
        try:
            for f in self.entries():
                w.add(f)
            w.finish(self.header(w))
        except BaseException:
            w.abort()
            raise
        self._files = None if self._source else self._files
        self.format = w.format
        self._packs, self._referenced, self.entry_count = list(w.packs), w.referenced_bytes, w.entries

    @classmethod
    def from_file(cls, path: str, *, what: str = "manifest", own: bool = True) -> Manifest:
        """Read a stored manifest from a local file; format 3 to 5 entries stay there (``own``: the
        file is removed with the object), older formats are read whole."""
        try:
            with open(path, "rb") as f:
                fmt, doc, offset = mformat.read_header(f)
            doc.setdefault("format", fmt)
            if fmt >= 3:  # the entry stream's layout is the magic's, whatever the header says
                doc["format"] = fmt
            m = cls.from_dict(doc)
            if fmt == 1:
                m._files = mformat.old_files_from_json(doc)
            elif fmt == 2:
                m._files = doc["files"]
            else:
                m._attach(path, offset, [str(p) for p in doc["packs"]], int(doc["referenced_bytes"]),
                          int(doc["entries"]), fmt)
                return m
        except ValidationError:
            if own:
                _unlink(path)
            raise
        except (OSError, ValueError, KeyError, TypeError, EOFError, zstandard.ZstdError, struct.error) as e:
            if own:
                _unlink(path)
            raise ValidationError(f"{what} is unreadable: {type(e).__name__}: {e}") from None
        if own:
            _unlink(path)
        return m

    def to_bytes(self) -> bytes:
        """The stored form (format 5) in memory: for small manifests and tests."""
        path = _tmp_file()
        try:
            self.write_file(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            _unlink(path)

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "manifest") -> Manifest:
        """Parse a stored manifest held in memory (entries read into memory too)."""
        path = _tmp_file()
        try:
            with open(path, "wb") as f:
                f.write(data)
            m = cls.from_file(path, what=what, own=False)
            if m._source is not None:
                files = list(m.entries())
                m._source, m._files = None, files
            return m
        finally:
            _unlink(path)

    def summary_metadata(self) -> dict[str, str]:
        """Small object metadata so a catalog listing needs a HEAD, not a download."""
        return summary_metadata(self)


# ---------------------------------------------------------------------- storage


def save(store: ObjectStore, layout: Layout, manifest: Manifest, *, path: str | None = None) -> None:
    """Write the manifest (the act that makes the backup exist). Never replaces one.
    ``path``: the manifest already encoded there (format 5)."""
    key = layout.manifest(manifest.backup_id)
    own = path is None
    if path is None:
        path = _tmp_file()
        manifest.write_file(path)
    try:
        # a refused put meeting its own identical object is success (the answer was lost)
        ok = put_file_once(store, key, path, metadata=manifest.summary_metadata())
    finally:
        if own:
            _unlink(path)
    if not ok:
        raise ConflictError(
            f"backup {manifest.backup_id} already exists ({key})",
            hint="backup ids are unique per run; this is a bug or a clock far in the past",
        )


def load(store: ObjectStore, layout: Layout, backup_id: str, *, tmp_dir: str | None = None,
         keep_listing: bool = False) -> Manifest:
    """Read one backup's manifest; NotFoundError when the backup does not exist. A format 3 to 5
    manifest is downloaded to a local file (in ``tmp_dir``) that its entries are read from.
    ``keep_listing``: for a manifest about to be restored, its listing kept compact by the check
    every load makes (not read once more by the restore's :meth:`Manifest.kept_listing`, which
    drops it when it ends)."""
    key = layout.manifest(backup_id)
    path = _tmp_file(tmp_dir)
    try:
        store.get_to_file(key, path)
    except NotFoundError:
        _unlink(path)
        raise NotFoundError(
            f"backup {backup_id} does not exist",
            detail=f"no manifest at {key}",
            hint="`dbops backup list` shows the backups there are",
        ) from None
    except BaseException:
        _unlink(path)
        raise
    m = Manifest.from_file(path, what=f"manifest of backup {backup_id} ({key})")
    if m.backup_id != backup_id:
        raise ValidationError(f"manifest at {key} names backup {m.backup_id}, not {backup_id}")
    if keep_listing and m._source is not None:  # every entry checked once, kept compact for the restore
        m._listed = Listed(m.entries(), f"manifest of backup {backup_id}")
    else:
        for _ in m.entries():  # every entry checked once (dbops.repo.untrusted) before anyone acts on one
            pass
    m._tables_checked = True
    return m


def load_header(store: ObjectStore, layout: Layout, backup_id: str) -> Manifest:
    """One backup's manifest without its entries where the format allows (formats 3 to 5: two ranged
    reads of the header; pack table, sizes and counts included): for the catalog and retention.
    Older formats are loaded whole."""
    key = layout.manifest(backup_id)
    try:
        start = store.get_range(key, 0, len(mformat.MAGIC3) + 4)
    except NotFoundError:
        start = b""
    if start[:len(mformat.MAGIC3)] not in mformat.MAGICS or len(start) < len(mformat.MAGIC3) + 4:
        return load(store, layout, backup_id)
    (n,) = struct.unpack_from("<I", start, len(mformat.MAGIC3))
    what = f"manifest of backup {backup_id} ({key})"
    try:
        doc = json.loads(zstandard.ZstdDecompressor().decompress(store.get_range(key, len(start), n)))
        doc["format"] = mformat.MAGICS[start[:len(mformat.MAGIC3)]]
        m = Manifest.from_dict(doc)
        m.header_only(packs=[str(p) for p in doc["packs"]], referenced=int(doc["referenced_bytes"]),
                      entries=int(doc["entries"]))
    except ValidationError:
        raise
    except (ValueError, KeyError, TypeError, zstandard.ZstdError) as e:
        raise ValidationError(f"{what} is unreadable: {type(e).__name__}: {e}") from None
    if m.backup_id != backup_id:
        raise ValidationError(f"manifest at {key} names backup {m.backup_id}, not {backup_id}")
    return m
