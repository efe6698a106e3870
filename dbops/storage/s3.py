"""S3-compatible storage (AWS S3, MinIO, SeaweedFS, ...). The only module that imports boto3's botocore.

The client comes from botocore directly (boto3's session only adds resources and s3transfer's
managed transfers, which dbops does not use, and costs a tenth of a second of import at start-up)."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections import Counter
from email.utils import parsedate_to_datetime
from typing import Iterable, Iterator

import botocore.exceptions as bexc
import botocore.session
from botocore.config import Config as BotoConfig

from dbops import retry, secrets
from dbops.config import StorageSettings
from dbops.errors import NotFoundError, StorageError
from dbops.storage.base import ObjectInfo, batches

_AUTH_CODES = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken",
               "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidSecurity", "Forbidden", "403"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}
# 409 ConditionalRequestConflict: a concurrent conditional write to the same key was in flight.
# It is not a refusal (nothing was compared yet): retried like any transient fault.
_CONFLICT_RETRY = {"ConditionalRequestConflict", "OperationAborted"}


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _add_content_md5(request=None, **_kw) -> None:
    body = request.body if request is not None else None
    if isinstance(body, (bytes, bytearray)) and "Content-MD5" not in request.headers:
        request.headers["Content-MD5"] = _md5_b64(bytes(body))


def _code(e: BaseException) -> str:
    if isinstance(e, bexc.ClientError):
        return str(e.response.get("Error", {}).get("Code", ""))
    return ""


def _status(e: BaseException) -> int:
    if isinstance(e, bexc.ClientError):
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                      bexc.ConnectionClosedError, bexc.ResponseStreamingError)):
        return True
    if isinstance(e, bexc.ClientError):
        st = _status(e)
        return st >= 500 or st == 429 or _code(e) in {"SlowDown", "RequestTimeout", "InternalError",
                                                     "ServiceUnavailable", "BadDigest", *_CONFLICT_RETRY}
    return isinstance(e, (ConnectionError, TimeoutError))


class S3Store:
    def __init__(self, settings: StorageSettings):
        self.s = settings
        if settings.credentials_file:
            # botocore reads this variable when the session resolves credentials.
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = settings.credentials_file
        cfg = BotoConfig(
            region_name=settings.region,
            s3={"addressing_style": "path" if settings.path_style else "auto"},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            retries={"max_attempts": 1, "mode": "standard"},  # dbops retries itself (dbops.retry)
            # botocore >= 1.36 adds CRC checksums by default, which several S3-compatible
            # stores reject; dbops sends Content-MD5 itself and verifies sha256 in metadata.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        kw = {"config": cfg}
        if settings.endpoint:
            kw["endpoint_url"] = settings.endpoint
        if settings.access_key and settings.secret_key:
            kw["aws_access_key_id"] = settings.access_key
            kw["aws_secret_access_key"] = settings.secret_key
        if settings.endpoint and settings.endpoint.startswith("https://"):
            kw["verify"] = settings.ca_file if settings.ca_file else settings.verify_tls
        try:
            session = botocore.session.Session(profile=settings.profile or None)
            self.client = session.create_client("s3", **kw)
        except bexc.BotoCoreError as e:  # ProfileNotFound, a bad configuration file and friends
            raise StorageError(f"cannot set up S3 credentials: {e}") from None
        self.bucket = settings.bucket
        # Every HTTP request sent, by operation (S3 bills per request): see requests().
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self.client.meta.events.register("before-send.s3", self._count_request)
        # DeleteObjects needs a body checksum; botocore >= 1.36 sends CRC32 only, which several
        # S3-compatible stores do not accept: send Content-MD5 as well.
        self.client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)

    def _count_request(self, request=None, event_name: str = "", **_kw) -> None:
        op = event_name.rsplit(".", 1)[-1] or "unknown"
        with self._counts_lock:
            self._counts[op] += 1
        return None  # go on and send it

    def requests(self) -> dict[str, int]:
        """HTTP requests sent so far, by S3 operation (PutObject, GetObject, ...)."""
        with self._counts_lock:
            return dict(self._counts)

    # ------------------------------------------------------------------ error mapping

    def _where(self) -> str:
        return f"{self.s.endpoint or 'AWS S3'} bucket {self.bucket}"

    def _raise(self, e: BaseException, key: str | None, op: str):
        code = _code(e)
        what = f"{op} {key}" if key else op
        if code in _NOT_FOUND:
            raise NotFoundError(f"object {key} not found in {self._where()}") from None
        if code in _AUTH_CODES or _status(e) == 403:
            raise StorageError(
                f"storage refused {what}: {code if code and not code.isdigit() else 'access denied (HTTP 403)'}",
                detail=secrets.redact(str(e)),
                hint="check the access key and secret key (and that they may use this bucket)",
            ) from None
        if code == "NoSuchBucket":
            raise StorageError(f"bucket {self.bucket} does not exist at {self.s.endpoint or 'AWS S3'}",
                               hint="create the bucket, or fix storage.bucket") from None
        if isinstance(e, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, ConnectionError)):
            raise StorageError(
                f"storage unreachable at {self.s.endpoint or 'AWS S3'} ({op})",
                detail=secrets.redact(str(e)) + self._retried(),
                hint="is the S3 server running and storage.endpoint right?",
            ) from None
        if isinstance(e, (bexc.ReadTimeoutError,)):
            raise StorageError(f"storage timed out during {what}",
                               detail=secrets.redact(str(e)) + self._retried()) from None
        if isinstance(e, bexc.NoCredentialsError):
            raise StorageError("no S3 credentials found",
                               hint="set storage.access_key/secret_key (from ${ENV}), storage.credentials_file, "
                                    "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
        raise StorageError(f"storage error during {what}: {code or type(e).__name__}",
                           detail=secrets.redact(str(e))) from None

    def _retried(self) -> str:
        return f"; retried for {self.s.retry_deadline:g} s (storage.retry_deadline)"

    def _call(self, fn, key: str | None, op: str):
        try:
            return retry.call(fn, deadline=self.s.retry_deadline, is_transient=is_transient)
        except (bexc.BotoCoreError, bexc.ClientError, ConnectionError, TimeoutError) as e:
            self._raise(e, key, op)

    # ------------------------------------------------------------------ protocol

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, if_absent: bool = False,
            if_match: str | None = None) -> bool:
        kw = {"Bucket": self.bucket, "Key": key, "Body": data, "ContentMD5": _md5_b64(data),
              "Metadata": dict(metadata or {})}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        if if_match:
            kw["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        return self._call(lambda: self._conditional(lambda: self.client.put_object(**kw)), key, "put")

    @staticmethod
    def _conditional(fn) -> bool:
        """Run a put; an If-None-Match / If-Match refusal becomes False instead of an error (and a
        412 to a retry whose first attempt took effect with its answer lost is told apart by callers)."""
        try:
            fn()
        except bexc.ClientError as e:
            if _code(e) in _PRECONDITION or _status(e) == 412:
                return False
            raise
        return True

    def put_file(self, key: str, path: str, *, metadata: dict[str, str] | None = None, if_absent: bool = False) -> bool:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        md5 = base64.b64encode(h.digest()).decode()

        def do():
            with open(path, "rb") as f:
                kw = {"Bucket": self.bucket, "Key": key, "Body": f, "ContentMD5": md5,
                      "Metadata": dict(metadata or {})}
                if if_absent:
                    kw["IfNoneMatch"] = "*"
                return self.client.put_object(**kw)

        return self._call(lambda: self._conditional(do), key, "put")

    def get(self, key: str) -> bytes:
        def do():
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            return r["Body"].read()

        return self._call(do, key, "get")

    def get_with_info(self, key: str) -> tuple[bytes, ObjectInfo]:
        def do():
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            body = r["Body"].read()
            return body, ObjectInfo(key=key, size=len(body), etag=r.get("ETag", "").strip('"'),
                                    last_modified=r["LastModified"].timestamp() if r.get("LastModified") else 0.0,
                                    metadata=dict(r.get("Metadata") or {}))

        return self._call(do, key, "get")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        def do():
            r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            return r["Body"].read()

        return self._call(do, key, "get")

    def open_range(self, key: str, start: int, length: int) -> _S3Range:
        return _S3Range(self, key, start, length)

    def _open_body(self, key: str, start: int, end: int):
        """The body of a ranged GET of [start, end) (the request retried on transient faults)."""
        return self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=key,
                                                         Range=f"bytes={start}-{end - 1}")["Body"], key, "get")

    def get_to_file(self, key: str, path: str) -> ObjectInfo:
        def do():
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            n = 0
            with open(path, "wb") as f:
                for block in r["Body"].iter_chunks(1 << 20):
                    f.write(block)
                    n += len(block)
            return ObjectInfo(key=key, size=n, etag=r.get("ETag", "").strip('"'),
                              last_modified=r["LastModified"].timestamp() if r.get("LastModified") else 0.0,
                              metadata=dict(r.get("Metadata") or {}))

        return self._call(do, key, "get")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=key), key, "head")
        except NotFoundError:
            return None
        return ObjectInfo(key=key, size=int(r.get("ContentLength", 0)), etag=r.get("ETag", "").strip('"'),
                          last_modified=r["LastModified"].timestamp() if r.get("LastModified") else 0.0,
                          metadata=dict(r.get("Metadata") or {}))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            r = self._call(lambda: self.client.list_objects_v2(**kw), prefix, "list")
            for o in r.get("Contents", []) or []:
                yield ObjectInfo(key=o["Key"], size=int(o.get("Size", 0)), etag=str(o.get("ETag", "")).strip('"'),
                                 last_modified=o["LastModified"].timestamp() if o.get("LastModified") else 0.0)
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=key), key, "delete")

    def delete_many(self, keys: Iterable[str]) -> None:
        for batch in batches(keys):
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        """One DeleteObjects request for up to 1,000 keys; a key already gone is not an error."""
        delete = {"Objects": [{"Key": k} for k in keys], "Quiet": True}
        r = self._call(lambda: self.client.delete_objects(Bucket=self.bucket, Delete=delete), keys[0],
                       f"delete ({len(keys)} objects)")
        failed = [e for e in (r.get("Errors") or []) if str(e.get("Code", "")) not in _NOT_FOUND]
        if failed:
            first = failed[0]
            code = first.get("Code") or "error"
            raise StorageError(
                f"storage refused to delete {len(failed)} of {len(keys)} objects: {code} ({first.get('Key')})",
                detail=secrets.redact("; ".join(f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}"
                                                for e in failed[:10])),
                hint="the keys need s3:DeleteObject on the prefix" if code in _AUTH_CODES else None,
            )

    def check(self) -> None:
        # A GET (not HEAD) so an auth failure comes with its error code (SignatureDoesNotMatch, ...).
        self._call(lambda: self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1, Prefix=self.s.prefix or ""),
                   None, f"list bucket {self.bucket}")

    def server_time(self) -> float | None:
        r = self._call(lambda: self.client.head_bucket(Bucket=self.bucket), None, f"access bucket {self.bucket}")
        date = (r.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
        if not date:
            return None
        try:
            return parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return None


RESUMES = 10  # a ranged read resumes this many times in a row without progress, then fails


class _S3Range:
    """A ranged GET read as it arrives. A transient fault while the body is read (a dropped
    connection, a read timeout, a body cut short) resumes with a new ranged GET from the first
    byte not yet read, as long as each attempt makes progress."""

    def __init__(self, s3: S3Store, key: str, start: int, length: int):
        self.s3, self.key, self.pos, self.end = s3, key, start, start + length
        self.body = s3._open_body(key, start, self.end) if length > 0 else None

    def read(self, n: int) -> bytes:
        n = min(n, self.end - self.pos)
        parts: list[bytes] = []
        got = failures = 0
        while got < n and self.body is not None:
            try:
                b = self.body.read(n - got)
            except (bexc.BotoCoreError, ConnectionError, TimeoutError) as e:
                if not (is_transient(e) or isinstance(e, bexc.IncompleteReadError)) or failures >= RESUMES:
                    self.s3._raise(e, self.key, "get")
                failures += 1
                self.body.close()
                self.body = None
                self.body = self.s3._open_body(self.key, self.pos, self.end)
                continue
            if not b:
                break  # the object ends before the range does
            failures = 0
            parts.append(b)
            got += len(b)
            self.pos += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def __enter__(self) -> _S3Range:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
