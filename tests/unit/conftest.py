"""Unit tests cannot reach the network: any PostgreSQL connection (psycopg), S3 client (boto3) or
socket connect to a non-Unix address from a unit test fails loudly.

The refusal is a BaseException (no ``except Exception`` in dbops can swallow it), and every attempt
is also recorded: a test that made one fails at teardown even if the refusal was caught somewhere.
Tests that need PostgreSQL or S3 belong in tests/integration (real servers, under the test lock).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest


class NetworkRefused(BaseException):
    """A unit test tried to reach PostgreSQL, S3 or another host."""


class Guard:
    Refused = NetworkRefused

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> NetworkRefused:
        self.attempts.append(what)
        return NetworkRefused(f"unit tests cannot reach the network: {what} (move this test to tests/integration)")


@pytest.fixture(autouse=True)
def network_guard(monkeypatch):
    guard = Guard()

    def pg_connect(*a, **kw):
        raise guard.refuse(f"psycopg.connect({', '.join(f'{k}={v!r}' for k, v in kw.items() if k != 'password')})")

    def s3_client(self, *a, **kw):
        raise guard.refuse(f"boto3 client {a[:1]} endpoint {kw.get('endpoint_url')}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def checked(real):
        def connect(sock, address):
            if sock.family != socket.AF_UNIX:
                raise guard.refuse(f"socket connect to {address!r}")
            return real(sock, address)
        return connect

    import psycopg
    import boto3.session
    import botocore.session

    monkeypatch.setattr(psycopg, "connect", pg_connect)
    monkeypatch.setattr(psycopg.Connection, "connect", classmethod(lambda cls, *a, **kw: pg_connect(*a, **kw)))
    monkeypatch.setattr(boto3.session.Session, "client", s3_client)
    monkeypatch.setattr(botocore.session.Session, "create_client", s3_client)
    monkeypatch.setattr(socket.socket, "connect", checked(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", checked(real_connect_ex))
    yield guard
    if guard.attempts:
        pytest.fail("unit test reached for the network: " + "; ".join(guard.attempts), pytrace=False)


@pytest.fixture
def pg_owned_dir():
    """A folder the postgres OS user owns (pytest's tmp_path is private to root), and the argv prefix
    that runs a command as that user; not root: this user's, and no prefix."""
    d = Path(tempfile.mkdtemp(prefix="dbops-unit-", dir="/tmp"))
    as_pg: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    yield d, as_pg
    shutil.rmtree(d, ignore_errors=True)
