"""The WAL archive: push, fetch and range fetch against any ObjectStore.

Object format: ``Layout.wal_key(name)`` holds the file, zstd-compressed or as is;
its metadata names the compression, the uncompressed size and the SHA-256 of the
uncompressed content. Rules:

* a push never replaces an object (``put(if_absent=True)``): the same name with the
  same SHA-256 is success, a different SHA-256 is a :class:`ConflictError` naming both;
* the archive's identity object (system identifier, major version, segment size) is
  written by the first push; a file from another cluster is refused;
* a fetch writes a temporary file, verifies size and SHA-256, fsyncs, then renames.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard

from dbops import log
from dbops.config import CompressionSettings
from dbops.errors import ConflictError, NotFoundError, ValidationError
from dbops.pg import walchain
from dbops.pg.walfile import ClusterIdentity, check_segment
from dbops.pg.lsn import (
    DEFAULT_SEGMENT_SIZE,
    PARTIAL_RE,
    SEGMENT_RE,
    is_wal_file,
    parse_history,
    parse_segment_name,
    segment_of_lsn,
)
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout
from dbops.storage.probe import require_conditional_writes

_log = log.get("archive")

META_SHA256 = "sha256"
META_SIZE = "size"
META_COMPRESSION = "compression"
META_SYSID = "system-identifier"
IDENTITY_FORMAT = 1
_BLOCK = 1 << 20


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    sha256: str
    size: int  # uncompressed bytes
    stored_bytes: int  # bytes sent (compressed)
    already_archived: bool  # an identical object was there already
    seconds: float


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: str
    sha256: str
    size: int
    seconds: float


@dataclass(frozen=True)
class RangeResult:
    segments: list[str]
    histories: list[str]
    bytes: int
    seconds: float


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def identity_to_bytes(ident: ClusterIdentity, cluster_name: str = "") -> bytes:
    return json.dumps({
        "format": IDENTITY_FORMAT,
        "system_identifier": str(ident.system_identifier),
        "pg_major": ident.pg_major,
        "wal_segment_size": ident.wal_segment_size,
        "cluster": cluster_name,
        "created": time.time(),
    }, indent=2).encode()


def identity_from_bytes(data: bytes, key: str) -> ClusterIdentity:
    try:
        d = json.loads(data)
        return ClusterIdentity(int(d["system_identifier"]), int(d["pg_major"]),
                               int(d.get("wal_segment_size", DEFAULT_SEGMENT_SIZE)))
    except (ValueError, KeyError, TypeError) as e:
        raise ValidationError(f"the archive's identity object {key} is unreadable: {e}",
                              hint="restore it from the cluster that owns this archive, or use another prefix") from None


class WalArchive:
    """One archive (store + layout) and how files are compressed into it. Thread-safe."""

    def __init__(self, store: ObjectStore, layout: Layout, *,
                 compression: CompressionSettings | None = None, cluster_name: str = ""):
        self.store = store
        self.layout = layout
        self.compression = compression or CompressionSettings()
        self.cluster_name = cluster_name
        self._verified: ClusterIdentity | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ identity

    def read_identity(self) -> ClusterIdentity | None:
        key = self.layout.identity()
        try:
            return identity_from_bytes(self.store.get(key), key)
        except NotFoundError:
            return None

    def ensure_identity(self, ident: ClusterIdentity) -> None:
        """Claim the archive for this cluster at the first push; refuse any other cluster."""
        with self._lock:
            if self._verified == ident:
                return
            key = self.layout.identity()
            owner = self.read_identity()
            if owner is None:
                # first use of this archive: never overwriting a segment rests on If-None-Match
                require_conditional_writes(self.store, self.layout)
                if self.store.put(key, identity_to_bytes(ident, self.cluster_name), if_absent=True):
                    _log.info("archive claimed for system identifier %s", ident.system_identifier)
                    owner = ident
                else:
                    owner = self.read_identity()
            if owner is None:
                raise ValidationError(f"the archive's identity object {key} vanished while it was being read")
            self._check_owner(owner, ident)
            self._verified = ident

    def _check_owner(self, owner: ClusterIdentity, ident: ClusterIdentity) -> None:
        where = self._where()
        if owner.system_identifier != ident.system_identifier:
            raise ConflictError(
                f"refusing to archive: {where} belongs to another cluster",
                detail=f"archive system identifier {owner.system_identifier}, "
                       f"this cluster's {ident.system_identifier}",
                hint="give each cluster its own storage.prefix (or bucket)",
            )
        if owner.pg_major != ident.pg_major:
            raise ConflictError(
                f"refusing to archive: {where} holds PostgreSQL {owner.pg_major} WAL, this cluster runs {ident.pg_major}",
                hint="after a major upgrade, archive to a new storage.prefix",
            )

    def _where(self) -> str:
        return f"the archive at {self.layout.root}"

    # ------------------------------------------------------------------ push

    def push(self, path: str | os.PathLike, ident: ClusterIdentity) -> PushResult:
        """Store one WAL file; returns only once it is stored (or an identical copy already was)."""
        t0 = time.monotonic()
        name = os.path.basename(path)
        if not is_wal_file(name):
            raise ValidationError(f"{name} is not a WAL file name",
                                  hint="archive_command passes %p: a path under pg_wal")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise NotFoundError(f"WAL file {path} does not exist") from None
        sysid = ident.system_identifier
        if SEGMENT_RE.match(name) or PARTIAL_RE.match(name):
            hdr = check_segment(name, data)
            if hdr.system_identifier != ident.system_identifier:
                raise ConflictError(
                    f"{name} belongs to another cluster than the data folder it was found in",
                    detail=f"segment header system identifier {hdr.system_identifier}, "
                           f"pg_control's {ident.system_identifier}",
                )
        self.ensure_identity(ident)
        sha = hashlib.sha256(data).hexdigest()
        body, algo = self._compress(data)
        meta = {META_SHA256: sha, META_SIZE: str(len(data)), META_COMPRESSION: algo, META_SYSID: str(sysid)}
        key = self.layout.wal_key(name)
        if self.store.put(key, body, metadata=meta, if_absent=True):
            return PushResult(name, key, sha, len(data), len(body), False, time.monotonic() - t0)
        info = self.store.head(key)
        if info is None:  # deleted between the refused put and the head: try once more
            if self.store.put(key, body, metadata=meta, if_absent=True):
                return PushResult(name, key, sha, len(data), len(body), False, time.monotonic() - t0)
            info = self.store.head(key)
        archived = (info.metadata.get(META_SHA256) if info else None) or "unknown (no sha256 metadata)"
        if archived != sha:
            raise ConflictError(
                f"the archive already holds a different {name}; it was left unchanged",
                detail=f"archived sha256 {archived}, local sha256 {sha} (object {key})",
                hint="two servers are archiving the same timeline (split brain?) or the archive "
                     "belongs to an older incarnation of this cluster; investigate before archiving on",
            )
        return PushResult(name, key, sha, len(data), 0, True, time.monotonic() - t0)

    def _compress(self, data: bytes) -> tuple[bytes, str]:
        if self.compression.algorithm == "zstd":
            return zstandard.ZstdCompressor(level=self.compression.level).compress(data), "zstd"
        return data, "none"

    # ------------------------------------------------------------------ fetch

    def fetch(self, name: str, dest: str | os.PathLike) -> FetchResult:
        """Download, verify, decompress, fsync and rename into dest. NotFoundError when absent."""
        t0 = time.monotonic()
        dest = Path(dest)
        key = self.layout.wal_key(name)
        tag = f"{os.getpid()}-{threading.get_ident()}"
        raw = dest.with_name(f".{dest.name}.{tag}.download")
        part = dest.with_name(f".{dest.name}.{tag}.part")
        try:
            info = self.store.get_to_file(key, str(raw))
            sha, size = decode_verified(raw, part, info.metadata, f"{name} ({key})")
            os.replace(part, dest)
            fsync_dir(dest.parent)
        finally:
            raw.unlink(missing_ok=True)
            part.unlink(missing_ok=True)
        return FetchResult(name, str(dest), sha, size, time.monotonic() - t0)

    def exists(self, name: str) -> bool:
        return self.store.head(self.layout.wal_key(name)) is not None

    def history(self, timeline: int) -> list[tuple[int, int, str]]:
        """The parsed history of a timeline (empty for timeline 1). NotFoundError when missing."""
        if timeline <= 1:
            return []
        name = walchain.history_name(timeline)
        return parse_history(self.read_small(name).decode(errors="replace"))

    def read_small(self, name: str) -> bytes:
        """A small WAL file (history, .backup) verified, into memory."""
        key = self.layout.wal_key(name)
        info = self.store.head(key)
        if info is None:
            raise NotFoundError(f"{name} is not in the archive", detail=f"no object {key}")
        body = self.store.get(key)
        data = zstandard.ZstdDecompressor().decompress(body) if info.metadata.get(META_COMPRESSION) == "zstd" else body
        expected = info.metadata.get(META_SHA256)
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValidationError(f"archived {name} fails its sha256 check", detail=f"object {key}")
        return data


def decode_verified(src: Path, dst: Path, metadata: dict[str, str], what: str, *, fsync: bool = True,
                    hint: str = "the stored object is damaged; fetch it from another copy or take a new backup",
                    ) -> tuple[str, int]:
    """Decompress an archived WAL object src into dst while hashing; ValidationError unless it
    matches the object's metadata (sha256, size). fsync dst unless told not to (a scratch copy)."""
    expected = metadata.get(META_SHA256)
    if not expected:
        raise ValidationError(f"archived {what} has no sha256 metadata; refusing to use it unverified")
    algo = metadata.get(META_COMPRESSION, "none")
    if algo not in ("zstd", "none"):
        raise ValidationError(f"archived {what} uses unknown compression {algo!r}")
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        reader = zstandard.ZstdDecompressor().stream_reader(fin) if algo == "zstd" else fin
        try:
            while block := reader.read(_BLOCK):
                h.update(block)
                fout.write(block)
                size += len(block)
        except zstandard.ZstdError as e:
            raise ValidationError(f"archived {what} does not decompress: {e}") from None
        if fsync:
            fout.flush()
            os.fsync(fout.fileno())
    sha = h.hexdigest()
    if sha != expected or (metadata.get(META_SIZE) and int(metadata[META_SIZE]) != size):
        raise ValidationError(
            f"archived {what} fails verification",
            detail=f"expected sha256 {expected} ({metadata.get(META_SIZE, '?')} bytes), got {sha} ({size} bytes)",
            hint=hint,
        )
    return sha, size


# ---------------------------------------------------------------------- ranges


class WalGapError(ValidationError):
    """A segment is missing from the archive with later ones archived after it: a hole, not the end.

    ``missing``: the first missing segment; ``complete``: the segments of the range before it (all
    archived), oldest first."""

    def __init__(self, message: str, *, missing: str, complete: list[str], detail: str | None = None,
                 hint: str | None = None):
        super().__init__(message, detail=detail, hint=hint)
        self.missing = missing
        self.complete = list(complete)


def fetch_range(store: ObjectStore, layout: Layout, start_segment: str, end: str | int, dest_dir: str | os.PathLike,
                *, timeline: int | None = None, parallel: int = 4, seg_size: int | None = None) -> RangeResult:
    """Download every segment replay needs from start_segment to end into dest_dir, verified.

    end is a segment name or an LSN (then on `timeline`, default: start's timeline). When the
    end's timeline differs from the start's, its history is followed and the history files
    are written to dest_dir too. Files already in dest_dir are kept (only verified files are
    ever renamed into place). Raises ValidationError for a hole, NotFoundError when the
    range runs past the end of the archive.
    """
    t0 = time.monotonic()
    arc = WalArchive(store, layout)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if seg_size is None:
        owner = arc.read_identity()
        seg_size = owner.wal_segment_size if owner else DEFAULT_SEGMENT_SIZE
    start_tli, _ = parse_segment_name(start_segment[:24], seg_size)
    if isinstance(end, int):
        end_name = segment_of_lsn(timeline or start_tli, end, seg_size)
    else:
        end_name = end
    end_tli, _ = parse_segment_name(end_name[:24], seg_size)
    histories: list[str] = []
    spans = walchain.chain(end_tli, [])
    if end_tli > 1:
        hist_name = walchain.history_name(end_tli)
        try:
            data = arc.read_small(hist_name)
        except NotFoundError:
            raise ValidationError(f"timeline {end_tli}'s history file {hist_name} is missing from the archive",
                                  hint="replay cannot follow the timeline switch without it") from None
        _write_verified(dest / hist_name, data)
        histories.append(hist_name)
        spans = walchain.chain(end_tli, parse_history(data.decode(errors="replace")))
    names = walchain.needed_segments(start_segment, end_name, spans, seg_size)
    todo = [n for n in names if not (dest / n).exists()]

    def one(name: str) -> int:
        try:
            return arc.fetch(name, dest / name).size
        except NotFoundError:
            return -1

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        sizes = dict(zip(todo, pool.map(one, todo)))
    missing = [n for n in todo if sizes[n] < 0]
    if missing:
        lost = set(missing)
        last_present = max((i for i, n in enumerate(names) if n not in lost), default=-1)
        holes = [m for m in missing if names.index(m) < last_present]
        shown = holes or missing
        listed = ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")
        if holes:
            first = names.index(holes[0])
            raise WalGapError(f"the WAL archive has a gap: {listed} missing",
                              detail=f"needed {names[0]} .. {names[-1]}", missing=holes[0],
                              complete=names[:first])
        raise NotFoundError(f"WAL not archived (yet): {listed}", detail=f"needed {names[0]} .. {names[-1]}",
                            hint="the range runs past the newest archived segment")
    total = sum(s for s in sizes.values() if s > 0)
    return RangeResult(names, histories, total, time.monotonic() - t0)


def _write_verified(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

