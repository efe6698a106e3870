"""Connections to PostgreSQL nodes (psycopg 3). Passwords never go into a DSN string or a log."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from dbops import secrets
from dbops.config import Node
from dbops.errors import PostgresError


def connect(node: Node, dbname: str | None = None, *, autocommit: bool = True, **extra: Any):
    import psycopg

    kw = node.conninfo(dbname, **extra)
    try:
        return psycopg.connect(autocommit=autocommit, **kw)
    except psycopg.OperationalError as e:
        raise PostgresError(
            f"cannot connect to node {node.name} ({node.host}:{node.port})",
            detail=secrets.redact(str(e).strip()),
            hint="is the server running, and do host, port, user and the password (PGPASSWORD or a passfile) match?",
        ) from None


@contextmanager
def session(node: Node, dbname: str | None = None, **extra: Any) -> Iterator[Any]:
    import psycopg

    c = connect(node, dbname, **extra)
    try:
        yield c
    except psycopg.Error as e:
        raise PostgresError(
            f"PostgreSQL error on node {node.name}",
            detail=secrets.redact(str(e).strip()),
        ) from None
    finally:
        c.close()


def scalar(conn: Any, sql: str, params: tuple | None = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def rows(conn: Any, sql: str, params: tuple | None = None) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


def libpq_env(node: Node) -> dict[str, str]:
    """libpq environment for a child process (pg_basebackup, pg_rewind): the password travels here, never in argv."""
    env = {"PGCONNECT_TIMEOUT": "10"}
    if node.password:
        env["PGPASSWORD"] = node.password
    if node.passfile:
        env["PGPASSFILE"] = node.passfile
    if node.sslmode:
        env["PGSSLMODE"] = node.sslmode
    return env
