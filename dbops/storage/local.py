"""A filesystem-backed ObjectStore with the same atomicity rules as S3.

Used by unit tests as a fake (no network), and usable for a mounted archive folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from dbops.errors import NotFoundError
from dbops.storage.base import ObjectInfo, batches

_MATCH_LOCK = threading.Lock()  # if_match compares and replaces as one step (within this process)


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counts: dict[str, int] = {}

    def _count(self, op: str) -> None:
        self._counts[op] = self._counts.get(op, 0) + 1

    def requests(self) -> dict[str, int]:
        """Calls so far by the S3 operation they stand for (no network here; for the same report)."""
        return dict(self._counts)

    def path_of(self, key: str) -> Path:
        """The file that holds the object `key` (a key with a '..' part is refused)."""
        if ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / "objects" / key

    def _meta(self, key: str) -> Path:
        return self.root / "meta" / (key + ".json")

    def _write(self, key: str, data: bytes, metadata: dict[str, str] | None, if_absent: bool,
               if_match: str | None = None) -> bool:
        self._count("PutObject")
        p = self.path_of(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        m = self._meta(key)
        m.parent.mkdir(parents=True, exist_ok=True)
        if if_absent:
            try:
                os.link(tmp, p)
            except FileExistsError:  # refused: the existing object and its metadata stay as they are
                os.unlink(tmp)
                return False
            os.unlink(tmp)
            m.write_text(json.dumps(metadata or {}))
            return True
        with _MATCH_LOCK:
            if if_match is not None:
                cur = self.head(key)
                if cur is None or cur.etag != if_match:
                    os.unlink(tmp)
                    return False
            m.write_text(json.dumps(metadata or {}))
            os.replace(tmp, p)
        return True

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, if_absent: bool = False,
            if_match: str | None = None) -> bool:
        return self._write(key, bytes(data), metadata, if_absent, if_match)

    def put_file(self, key: str, path: str, *, metadata: dict[str, str] | None = None, if_absent: bool = False,
                 if_match: str | None = None) -> bool:
        return self._write(key, Path(path).read_bytes(), metadata, if_absent, if_match)

    def get(self, key: str) -> bytes:
        self._count("GetObject")
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found") from None

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._count("GetObject")
        try:
            with open(self.path_of(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found") from None

    def open_range(self, key: str, start: int, length: int) -> "_FileRange":
        self._count("GetObject")
        try:
            f = open(self.path_of(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"object {key} not found") from None
        f.seek(start)
        return _FileRange(f, length)

    def get_to_file(self, key: str, path: str) -> ObjectInfo:
        data = self.get(key)
        Path(path).write_bytes(data)
        info = self.head(key)
        assert info is not None
        return info

    def head(self, key: str) -> ObjectInfo | None:
        self._count("HeadObject")
        p = self.path_of(key)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(self._meta(key).read_text())
        except (FileNotFoundError, ValueError):
            meta = {}
        return ObjectInfo(key=key, size=st.st_size, etag=f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}",
                          last_modified=st.st_mtime, metadata=meta)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._count("ListObjectsV2")
        base = self.root / "objects"
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / fn
                key = str(full.relative_to(base))
                if key.startswith(prefix):
                    st = full.stat()
                    out.append(ObjectInfo(key=key, size=st.st_size, last_modified=st.st_mtime))
        yield from sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._count("DeleteObject")
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        for p in (self.path_of(key), self._meta(key)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def delete_many(self, keys: Iterable[str]) -> None:
        """Like S3's DeleteObjects: batches of up to 1,000 keys, one counted request each."""
        for batch in batches(keys):
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        self._count("DeleteObjects")
        for k in keys:
            self._unlink(k)

    def check(self) -> None:
        return None

    def server_time(self) -> float | None:
        return time.time()


class _FileRange:
    """A RangeReader over an open file: at most `left` bytes from where it stands."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def read(self, n: int) -> bytes:
        out = self.f.read(max(0, min(n, self.left)))
        self.left -= len(out)
        return out

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "_FileRange":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
