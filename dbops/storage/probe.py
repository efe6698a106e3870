"""Prove that a store honours conditional writes before trusting it (issue 13 item 4).

Never overwriting an archived segment, the cluster lock and the uniqueness of a backup's
manifest all rest on ``put(if_absent=True)`` (S3 ``If-None-Match: *``) being refused when the
object exists. A store (or a proxy in front of it) that ignores the header would silently
overwrite instead. :func:`require_conditional_writes` writes a fresh probe object twice,
conditionally: the second put must be refused and the first content must remain. It runs
once per process and store, the first time a run uses it (lock, first WAL push, check).
"""

from __future__ import annotations

import secrets
import threading

from dbops.errors import DbopsError, NotFoundError, PreconditionError, StorageError
from dbops.storage.base import ObjectStore
from dbops.storage.layout import Layout

_proven: set[str] = set()
_lock = threading.Lock()


def store_name(store: ObjectStore) -> str:
    """How a store is named in messages: endpoint and bucket (or a local folder)."""
    settings = getattr(store, "s", None)
    bucket = getattr(store, "bucket", None)
    if bucket is not None:
        return f"{getattr(settings, 'endpoint', None) or 'AWS S3'} bucket {bucket}"
    return f"local store {getattr(store, 'root', type(store).__name__)}"


def conditional_writes_refused(store: ObjectStore, layout: Layout) -> bool:
    """Whether a second conditional put of one fresh key is refused (and the first content stays)."""
    key = layout.probe(f"conditional-{secrets.token_hex(8)}")
    try:
        if not put_once(store, key, b"first"):
            raise StorageError(f"{store_name(store)} refused a conditional put of a fresh probe object {key}")
        second = store.put(key, b"second", if_absent=True)
        return not second and store.get(key) == b"first"
    finally:
        try:
            store.delete(key)
        except DbopsError:
            pass


def require_conditional_writes(store: ObjectStore, layout: Layout) -> None:
    """PreconditionError (exit 11) naming the store when it ignores If-None-Match."""
    name = store_name(store) + "|" + layout.root
    with _lock:
        if name in _proven:
            return
    if not conditional_writes_refused(store, layout):
        raise PreconditionError(
            f"refusing to use {store_name(store)}: it ignores conditional writes (If-None-Match: *)",
            detail="a second conditional put of the same probe object replaced it instead of being refused",
            hint="dbops needs a store that honours If-None-Match (AWS S3, MinIO, SeaweedFS do); check for a "
                 "proxy or gateway in between that drops the header",
        )
    with _lock:
        _proven.add(name)


def put_once(store: ObjectStore, key: str, data: bytes, *, metadata: dict[str, str] | None = None) -> bool:
    """Create key with data, never replacing an object. A refusal where the object already holds
    exactly these bytes is success: the first attempt was stored and its answer lost, so the retry
    met its own object. False when another object is there."""
    if store.put(key, data, metadata=metadata, if_absent=True):
        return True
    try:
        return store.get(key) == data
    except NotFoundError:
        return False


def put_file_once(store: ObjectStore, key: str, path: str, *, metadata: dict[str, str] | None = None) -> bool:
    """put_once for a local file (a pack or manifest spooled to disk): a refusal where the object
    holds exactly the file's bytes is success (its first upload was stored, the answer lost)."""
    if store.put_file(key, path, metadata=metadata, if_absent=True):
        return True
    try:
        body = store.get(key)
    except NotFoundError:
        return False
    with open(path, "rb") as f:
        return f.read() == body
