"""The one way dbops talks to PostgreSQL (psycopg 3), and the only module that imports psycopg's
connection API. Every psycopg error becomes a :class:`PostgresError` here (secrets redacted), so
workflows catch dbops errors only. Passwords never go into a DSN string or a log.

    with session(node) as c:                 # connect, run, close; errors are PostgresError
        scalar(c, "SELECT pg_is_in_recovery()")
    c = connect(node, connect_timeout=2)     # a connection kept open (a switchover's candidate)
    alter_system(c, "primary_slot_name", None); reload(c)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from dbops import secrets
from dbops.config import Node
from dbops.errors import PostgresError, QueryError


def preload() -> None:
    """Import the driver now (0.1-0.2 s on this machine kind), e.g. in a thread beside a download,
    so that the first connection after it does not wait for the import."""
    import psycopg  # noqa: F401


class Connection:
    """A psycopg connection (autocommit) whose errors are PostgresError."""

    def __init__(self, raw: Any, name: str) -> None:
        self.raw = raw
        self.name = name

    def error(self, e: BaseException) -> QueryError:
        err = QueryError(f"PostgreSQL error on node {self.name}", detail=secrets.redact(str(e).strip()))
        err.sqlstate = getattr(e, "sqlstate", None)
        return err

    def execute(self, query: Any, params: Any = None) -> Any:
        import psycopg

        try:
            return self.raw.execute(query, params)
        except psycopg.Error as e:
            raise self.error(e) from None

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(node: Node, dbname: str | None = None, *, autocommit: bool = True, **extra: Any) -> Connection:
    import psycopg

    kw = node.conninfo(dbname, **extra)
    try:
        return Connection(psycopg.connect(autocommit=autocommit, **kw), node.name)
    except psycopg.Error as e:
        raise PostgresError(
            f"cannot connect to node {node.name} ({node.host}:{node.port})",
            detail=secrets.redact(str(e).strip()),
            hint="is the server running, and do host, port, user and the password (PGPASSWORD or a passfile) match?",
        ) from None


def connect_console(host: str, port: int, user: str, dbname: str, password: str | None, *, what: str,
                    hint: str) -> Connection:
    """A connection to an admin console that speaks the simple query protocol only (PgBouncer's)."""
    import psycopg

    kw: dict[str, Any] = {"host": host, "port": port, "user": user, "dbname": dbname, "connect_timeout": 5,
                          "autocommit": True, "cursor_factory": psycopg.ClientCursor, "application_name": "dbops"}
    if password:
        kw["password"] = password
    try:
        return Connection(psycopg.connect(**kw), what)
    except psycopg.Error as e:
        raise PostgresError(f"cannot reach the {what} at {host}:{port}", detail=secrets.redact(str(e).strip()),
                            hint=hint) from None


@contextmanager
def session(node: Node, dbname: str | None = None, **extra: Any) -> Iterator[Connection]:
    import psycopg

    c = connect(node, dbname, **extra)
    try:
        yield c
    except psycopg.Error as e:
        raise c.error(e) from None
    finally:
        c.close()


def scalar(conn: Any, sql: str, params: tuple | None = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def rows(conn: Any, sql: str, params: tuple | None = None) -> list[tuple]:
    return conn.execute(sql, params).fetchall()


def alter_system(conn: Connection, name: str, value: str | None) -> None:
    """ALTER SYSTEM SET name = 'value' (quoted by the driver), or RESET name for None."""
    from psycopg import sql

    if value is None:
        conn.execute(sql.SQL("alter system reset {}").format(sql.Identifier(name)))
    else:
        conn.execute(sql.SQL("alter system set {} = {}").format(sql.Identifier(name), sql.Literal(value)))


def reload(conn: Connection) -> None:
    conn.execute("select pg_reload_conf()")


def ping(host: str, port: int) -> bool:
    """Whether a server accepts connections there (libpq's PQping: no login, no password needed)."""
    from psycopg import pq

    conninfo = f"host={host} port={port} dbname=postgres connect_timeout=2".encode()
    return pq.PGconn.ping(conninfo) == pq.Ping.OK


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
