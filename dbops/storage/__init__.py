"""Object storage behind one protocol. Only storage/s3.py imports boto3."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from dbops.storage.base import ObjectInfo, ObjectStore
from dbops.storage.layout import Layout

if TYPE_CHECKING:
    from dbops.config import StorageSettings


class Archive(NamedTuple):
    """An opened archive: the store and the names of its keys (``store, layout = open_archive(...)``)."""

    store: ObjectStore
    layout: Layout


def open_store(settings: "StorageSettings") -> ObjectStore:
    """The store for a configuration (boto3 is imported only here, lazily), behind the encryption
    layer: it seals every object when storage.encryption has a key, and refuses what does not
    match the configuration (see dbops.storage.crypt)."""
    from dbops.storage.s3 import S3Store

    return encrypted(S3Store(settings), settings)


def open_archive(settings: "StorageSettings", store: ObjectStore | None = None) -> Archive:
    """The one place a configuration's archive is opened: its store (or `store`, when the caller
    already holds one open) and the key layout under its prefix."""
    return Archive(store if store is not None else open_store(settings), Layout(settings.prefix))


def encrypted(store: ObjectStore, settings: "StorageSettings") -> ObjectStore:
    """store behind the encryption layer configured in settings (keys are read now)."""
    from dbops.storage import keys
    from dbops.storage.crypt import EncryptedStore

    return EncryptedStore(store, keys.load(settings.encryption), settings.prefix)


# S3's two price classes: writes and listings cost more than reads; deletes are free.
WRITE_CLASS = frozenset({"PutObject", "CopyObject", "ListObjectsV2", "ListObjects", "CreateMultipartUpload",
                         "UploadPart", "CompleteMultipartUpload"})
READ_CLASS = frozenset({"GetObject", "HeadObject", "HeadBucket"})


def request_counts(store: ObjectStore) -> dict[str, int]:
    """Requests a store has sent so far, by operation ({} for a store that does not count)."""
    counts = getattr(store, "requests", None)
    return dict(counts()) if callable(counts) else {}


def requests_since(store: ObjectStore, before: dict[str, int]) -> dict[str, object]:
    """Requests sent since ``before`` (a :func:`request_counts` result): total, per price class, per operation."""
    now = request_counts(store)
    ops = {k: now[k] - before.get(k, 0) for k in sorted(now) if now[k] - before.get(k, 0)}
    return {"total": sum(ops.values()),
            "write_class": sum(v for k, v in ops.items() if k in WRITE_CLASS),
            "read_class": sum(v for k, v in ops.items() if k in READ_CLASS),
            "by_operation": ops}


__all__ = ["Archive", "Layout", "ObjectInfo", "ObjectStore", "encrypted", "open_archive", "open_store", "request_counts", "requests_since"]
