"""Object storage behind one protocol. Only storage/s3.py imports boto3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbops.storage.base import ObjectInfo, ObjectStore

if TYPE_CHECKING:
    from dbops.config import StorageSettings


def open_store(settings: "StorageSettings") -> ObjectStore:
    """The store for a configuration (boto3 is imported only here, lazily), behind the encryption
    layer: it seals every object when storage.encryption has a key, and refuses what does not
    match the configuration (see dbops.storage.crypt)."""
    from dbops.storage.s3 import S3Store

    return encrypted(S3Store(settings), settings)


def encrypted(store: ObjectStore, settings: "StorageSettings") -> ObjectStore:
    """store behind the encryption layer configured in settings (keys are read now)."""
    from dbops.storage import keys
    from dbops.storage.crypt import EncryptedStore

    return EncryptedStore(store, keys.load(settings.encryption), settings.prefix)


__all__ = ["ObjectInfo", "ObjectStore", "encrypted", "open_store"]
