"""A small HTTP proxy in front of the lab's SeaweedFS that misbehaves on request (test helper).

Faults (attributes, changeable while it runs):

* ``strip_if_none_match``: drop the If-None-Match header from PUTs and re-sign the request (SigV4
  with the lab's keys), so the server sees an unconditional put: a store that ignores it;
* ``fail_every``: answer every n-th request with ``fail_status`` (503 SlowDown by default, or 409
  ConditionalRequestConflict) without forwarding it;
* ``drop_every``: close every n-th connection without an answer, before forwarding (``drop_after``
  False) or after the server handled it (True: the response is lost, the request took effect);
* ``cut_every``: for every n-th request, send the answer's headers and only the first half of
  its body, then close the connection (a body cut short mid-transfer);
* ``latency``: seconds to wait before forwarding each request;
* ``only``: a predicate (method, path) choosing which requests faults apply to.

Counts of what it did are in ``stats``.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}

_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    409: ("ConditionalRequestConflict", "A conflicting operation occurred. Please retry."),
}


class S3FaultProxy:
    def __init__(self, upstream: str, access_key: str, secret_key: str, region: str = "us-east-1"):
        host, port = upstream.replace("http://", "").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.strip_if_none_match = False
        self.fail_every = 0
        self.fail_status = 503
        self.drop_every = 0
        self.drop_after = False
        self.cut_every = 0
        self.latency = 0.0
        self.only: Callable[[str, str], bool] | None = None
        self.stats: Counter[str] = Counter()
        self._n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.strip_if_none_match = False
        self.fail_every = self.drop_every = self.cut_every = 0
        self.fail_status = 503
        self.drop_after = False
        self.latency = 0.0
        self.only = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ one request

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in _HOP]
        applies = self.only is None or self.only(h.command, h.path)
        with self._lock:
            if applies:
                self._n += 1
            n = self._n
        if applies and self.latency:
            time.sleep(self.latency)
            self.stats["delayed"] += 1
        if applies and self.drop_every and n % self.drop_every == 0 and not self.drop_after:
            self.stats["dropped"] += 1
            self._drop(h)
            return
        if applies and self.fail_every and n % self.fail_every == 0:
            self.stats[f"failed_{self.fail_status}"] += 1
            self._error(h, self.fail_status)
            return
        if self.strip_if_none_match and h.command == "PUT" and any(k.lower() == "if-none-match" for k, _ in headers):
            headers = self._resign(h, [(k, v) for k, v in headers if k.lower() != "if-none-match"], body)
            self.stats["stripped"] += 1
        try:
            status, reason, rheaders, rbody = self._forward(h.command, h.path, headers, body)
        except OSError:
            self._drop(h)
            return
        if applies and self.drop_every and n % self.drop_every == 0 and self.drop_after:
            self.stats["dropped_after"] += 1
            self._drop(h)
            return
        h.send_response_only(status, reason)
        for k, v in rheaders:
            if k.lower() not in _HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(rbody) if h.command != "HEAD" else _len(rheaders)))
        h.end_headers()
        if applies and self.cut_every and n % self.cut_every == 0 and h.command != "HEAD" and len(rbody) > 1:
            self.stats["cut"] += 1
            h.wfile.write(rbody[:len(rbody) // 2])
            h.wfile.flush()
            self._drop(h)
            return
        if h.command != "HEAD" and rbody:
            h.wfile.write(rbody)
        self.stats["forwarded"] += 1

    def _forward(self, method: str, path: str, headers, body: bytes):
        c = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                c.putheader(k, v)
            if body and not any(k.lower() == "content-length" for k, _ in headers):
                c.putheader("Content-Length", str(len(body)))
            c.endheaders(body or None)
            r = c.getresponse()
            data = r.read()
            return r.status, r.reason, r.getheaders(), data
        finally:
            c.close()

    def _resign(self, h: BaseHTTPRequestHandler, headers, body: bytes):
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        drop = {"authorization", "x-amz-date", "x-amz-content-sha256"}
        kept = [(k, v) for k, v in headers if k.lower() not in drop]
        host = dict((k.lower(), v) for k, v in headers).get("host", f"127.0.0.1:{self.port}")
        req = AWSRequest(method=h.command, url=f"http://{host}{h.path}", headers=dict(kept), data=body)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(req)
        return list(req.headers.items())

    @staticmethod
    def _drop(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, h: BaseHTTPRequestHandler, status: int) -> None:
        code, msg = _ERRORS.get(status, ("InternalError", "injected"))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
                f"<Resource>{h.path}</Resource><RequestId>fault</RequestId></Error>").encode()
        h.send_response_only(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(body) if h.command != "HEAD" else 0))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)


def _len(headers) -> int:
    for k, v in headers:
        if k.lower() == "content-length":
            return int(v)
    return 0
