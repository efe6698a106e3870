"""Object storage behind one protocol. Only storage/s3.py imports boto3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbops.storage.base import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from dbops.config import StorageSettings


def open_store(settings: "StorageSettings") -> ObjectStore:
    """The store for a configuration (boto3 is imported only here, lazily)."""
    from dbops.storage.s3 import S3Store

    return S3Store(settings)


__all__ = ["ObjectInfo", "ObjectStore", "open_store"]
