"""A run's view of the store while it holds a cluster lock (issue 13 item 5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbops.storage.base import ObjectStore, batches

if TYPE_CHECKING:
    from dbops.storage.lock import ClusterLock


class GuardedStore:
    """A run's view of the store while it holds a lock: every write and delete first checks that
    the lock is still held (ClusterLock.check), so a run that lost it stops before its next
    destructive step (storing a pack or manifest, recording a status, deleting)."""

    def __init__(self, store: ObjectStore, lock: ClusterLock):
        self.inner = store
        self.lock = lock

    def put(self, key: str, data: bytes, **kw) -> bool:
        self.lock.check()
        return self.inner.put(key, data, **kw)

    def put_file(self, key: str, path: str, **kw) -> bool:
        self.lock.check()
        return self.inner.put_file(key, path, **kw)

    def delete(self, key: str) -> None:
        self.lock.check()
        self.inner.delete(key)

    def delete_many(self, keys) -> None:
        """DeleteObjects batches (S3 bills per request), the lock checked before each one."""
        for batch in batches(keys):
            self.lock.check()
            self.inner.delete_many(batch)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
