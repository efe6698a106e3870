"""The unit-test guard (tests/unit/conftest.py) refuses PostgreSQL, S3 and TCP connections loudly."""

from __future__ import annotations

import socket

import pytest

from dbops.config import Node, StorageSettings
from dbops.pg import conn as pgconn
from dbops.storage import open_store


def test_postgres_connection_is_refused(network_guard):
    with pytest.raises(network_guard.Refused, match="psycopg.connect"):
        pgconn.connect(Node(name="pg1", host="127.0.0.1", port=1, password="not-shown"))
    assert "not-shown" not in network_guard.attempts[0]
    network_guard.attempts.clear()  # seen and expected: do not fail at teardown


def test_s3_client_is_refused(network_guard):
    with pytest.raises(network_guard.Refused, match="boto3 client"):
        open_store(StorageSettings(bucket="bkt", endpoint="http://127.0.0.1:1")).head("x")
    network_guard.attempts.clear()


def test_tcp_connect_is_refused_and_unix_sockets_are_not(network_guard, tmp_path):
    with pytest.raises(network_guard.Refused, match="socket connect"):
        socket.create_connection(("127.0.0.1", 1), timeout=1)
    network_guard.attempts.clear()
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as srv, socket.socket(socket.AF_UNIX) as cl:
        srv.bind(path)
        srv.listen(1)
        cl.connect(path)  # local, allowed
