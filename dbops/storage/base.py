"""The ObjectStore protocol every workflow is written against.

Atomicity a store must provide (S3 and MinIO/SeaweedFS do):
* ``put`` is all-or-nothing: a reader sees the old object, nothing, or the whole new one;
* ``put`` verifies a content checksum server-side (Content-MD5) before it returns;
* ``put(..., if_absent=True)`` never replaces an existing object (returns False instead);
* ``put(..., if_match=etag)`` replaces the object only while its ETag is still ``etag``
  (returns False otherwise). Both are proven on first use (dbops.storage.probe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

DELETE_BATCH = 1000  # S3's DeleteObjects takes at most this many keys a request


def batches(keys: Iterable[str], size: int = DELETE_BATCH) -> Iterator[list[str]]:
    """`keys` in lists of at most `size` (the batches of :meth:`ObjectStore.delete_many`)."""
    batch: list[str] = []
    for k in keys:
        batch.append(k)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    last_modified: float = 0.0  # epoch seconds
    metadata: dict[str, str] = field(default_factory=dict)


class RangeReader(Protocol):
    """A ranged read in progress: ``read(n)`` returns exactly n bytes unless the range (or the
    object, when it is shorter) ends first; b"" at the end. Close it (or use it in ``with``)."""

    def read(self, n: int) -> bytes:
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> RangeReader:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class BytesRange:
    """A RangeReader over bytes already in memory (a store that reads whole ranges)."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def read(self, n: int) -> bytes:
        out = bytes(self.data[self.pos:self.pos + max(0, n)])
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.data = memoryview(b"")

    def __enter__(self) -> BytesRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, if_absent: bool = False,
            if_match: str | None = None) -> bool:
        """Store data. With if_absent, returns False (and changes nothing) when the key exists; with
        if_match, returns False (and changes nothing) unless the object's ETag is still if_match."""
        ...

    def put_file(self, key: str, path: str, *, metadata: dict[str, str] | None = None, if_absent: bool = False) -> bool:
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises NotFoundError."""
        ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        ...

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        """The same bytes as get_range, read as they arrive (memory: what the reader asks for,
        not the range); NotFoundError when the object is absent. A transient fault while the body
        is read resumes from where it stopped."""
        ...

    def get_to_file(self, key: str, path: str) -> ObjectInfo:
        """Download to path (written in place; callers rename). Raises NotFoundError."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size and metadata, or None when absent."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under prefix, in key order (metadata not filled)."""
        ...

    def delete(self, key: str) -> None:
        ...

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete every key (a key already gone is fine). S3: DeleteObjects, in batches of
        1,000 keys (one request each) instead of one request per object."""
        ...

    def requests(self) -> dict[str, int]:
        """Requests sent to the store so far, by operation (S3 bills per request)."""
        ...

    def check(self) -> None:
        """Raise StorageError unless the bucket is reachable with these credentials."""
        ...

    def server_time(self) -> float | None:
        """The server's clock (epoch seconds) from its Date header, for skew checks."""
        ...
