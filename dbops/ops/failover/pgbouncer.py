"""PgBouncer during a switchover: PAUSE, repoint its [databases] at the new primary, RESUME.

PAUSE waits for running transactions to finish and then closes every server
connection, so clients queue instead of failing while the primary moves. The
caller must make RESUME certain (``with paused(...)``): a pooler left paused is an
outage of its own.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dbops import log, proc
from dbops.config import Node, PgBouncerSettings
from dbops.errors import DbopsError, PostgresError, PreconditionError
from dbops.pg import conn as pgconn

_log = log.get("pgbouncer")

_SECTION_RE = re.compile(r"^\s*\[(?P<name>[^\]]+)\]\s*$")
_ENTRY_RE = re.compile(r"^(?P<lead>\s*(?P<db>[^=#;\s][^=]*?)\s*=\s*)(?P<conn>.*)$")
_DB_NAME_RE = re.compile(r"^[A-Za-z0-9_.*-]+$")


class PgBouncer:
    def __init__(self, settings: PgBouncerSettings):
        self.settings = settings
        self.paused = False

    def _connect(self) -> Any:
        s = self.settings
        return pgconn.connect_console(s.host, s.port, s.user, s.database, s.password,
                                      what="PgBouncer admin console",
                                      hint="check failover.pgbouncer (host, port, user in admin_users, password)")

    def command(self, stmt: str) -> str:
        c = self._connect()
        try:
            return c.execute(stmt).statusmessage or ""
        except PostgresError as e:
            raise PostgresError(f"PgBouncer refused {stmt}", detail=e.detail) from None
        finally:
            c.close()

    def _targets(self) -> list[str]:
        for db in self.settings.databases:
            if not _DB_NAME_RE.match(db):
                raise PreconditionError(f"invalid PgBouncer database name {db!r}")
        return list(self.settings.databases) or [""]

    def check(self) -> None:
        """Reachable, and the admin user may run commands."""
        self.command("SHOW VERSION")

    def paused_databases(self) -> list[str]:
        """The [databases] entries PgBouncer holds paused now (SHOW DATABASES, column ``paused``)."""
        c = self._connect()
        try:
            cur = c.execute("SHOW DATABASES")
            cols = [d.name for d in cur.description or ()]
            rows = cur.fetchall()
        except PostgresError as e:
            raise PostgresError("PgBouncer refused SHOW DATABASES", detail=e.detail) from None
        finally:
            c.close()
        if "paused" not in cols:
            return []
        i, n = cols.index("paused"), cols.index("name")
        return [str(r[n]) for r in rows if str(r[i]) in ("1", "True", "true")]

    def pause(self, timeout: float) -> None:
        """PAUSE (the configured databases, else all); undone with RESUME when it takes too long."""
        errors: list[BaseException] = []
        done = threading.Event()
        conn = self._connect()

        def work() -> None:
            try:
                for db in self._targets():
                    conn.execute(f"PAUSE {db}".strip())
            except (PostgresError, PreconditionError) as e:  # reported to the caller below
                errors.append(e)
            finally:
                done.set()

        self.paused = True  # from the first PAUSE on, a RESUME is owed
        t = threading.Thread(target=work, name="pgbouncer-pause", daemon=True)
        t.start()
        finished = done.wait(timeout)
        if not finished or errors:
            self.resume()
            conn.close()
            if not finished:
                raise PreconditionError(
                    f"PgBouncer could not pause within {timeout:.0f} s (transactions still running)",
                    hint="long transactions or session pooling keep server connections busy; retry when quiet")
            e = errors[0]
            raise PostgresError("PgBouncer PAUSE failed",
                                detail=e.detail if isinstance(e, PostgresError) else str(e).strip())
        conn.close()

    def resume(self, attempts: int = 5) -> None:
        """RESUME everything paused; retried, because a paused pooler is an outage."""
        last: Exception | None = None
        for i in range(attempts):
            try:
                for db in self._targets():
                    try:
                        self.command(f"RESUME {db}".strip())
                    except PostgresError as e:
                        if "not paused" not in (e.detail or "").lower():
                            raise
                self.paused = False
                return
            except PostgresError as e:
                last = e
                time.sleep(0.2 * (i + 1))
        raise PostgresError("PgBouncer RESUME failed: clients stay paused",
                            detail=last.detail if last else None,
                            hint=f"run RESUME on the PgBouncer admin console ({self.settings.host}:{self.settings.port}) now")

    def repoint(self, old: Node, new: Node) -> list[str]:
        """Rewrite [databases] entries that point at `old` (or the configured names) to `new`; RELOAD."""
        path = self.settings.config_file
        if not path:
            return []
        with open(path) as f:
            text = f.read()
        new_text, changed = repoint_ini(text, old, new, self.settings.databases)
        if changed:
            write_preserving(path, new_text)
            self.command("RELOAD")
        return changed


@contextmanager
def paused(bouncer: PgBouncer | None, timeout: float,
           on_resumed: Callable[[], None] | None = None) -> Iterator[PgBouncer | None]:
    """PAUSE on entry (when configured) and a guaranteed RESUME on the way out; ``on_resumed`` once
    the pooler is no longer paused (the pause record is deleted then)."""
    if bouncer is None:
        yield None
        return
    try:
        bouncer.pause(timeout)
    except BaseException:
        if not bouncer.paused and on_resumed:
            on_resumed()
        raise
    try:
        yield bouncer
    except BaseException as e:
        if bouncer.paused:
            with proc.unwinding():
                try:
                    bouncer.resume()
                except PostgresError as failed:  # keep the original error (and its exit code), add this one
                    chain_resume_failure(e, failed)
        if not bouncer.paused and on_resumed:
            on_resumed()
        raise
    if bouncer.paused:
        with proc.unwinding():
            bouncer.resume()
    if on_resumed:
        on_resumed()


def chain_resume_failure(err: BaseException, failed: PostgresError) -> None:
    """Attach a failed RESUME to the error that ended the switch, without replacing it."""
    if isinstance(err, DbopsError):
        err.detail = ((err.detail + "\n") if err.detail else "") + f"also: {failed.message}" + (
            f" ({failed.detail})" if failed.detail else "")
        err.hint = f"{failed.hint}; then: {err.hint}" if err.hint else failed.hint
    err.__context__ = failed
    log.event(_log, logging.ERROR, failed.message, detail=failed.detail, hint=failed.hint)


def _kv(conn: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conn))


def repoint_ini(text: str, old: Node, new: Node, names: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """pgbouncer.ini text with [databases] entries moved to `new` (pure; returns the changed names).

    An entry moves when it is named in `names`, or (no names given) when its host and port
    are the old primary's.
    """
    out: list[str] = []
    changed: list[str] = []
    section = None
    for line in text.splitlines(keepends=True):
        m = _SECTION_RE.match(line)
        if m:
            section = m.group("name").strip().lower()
            out.append(line)
            continue
        e = _ENTRY_RE.match(line.rstrip("\n"))
        if section != "databases" or not e or line.lstrip().startswith(("#", ";")):
            out.append(line)
            continue
        db, conn = e.group("db").strip(), e.group("conn")
        kv = _kv(conn)
        host, port = kv.get("host", "").strip("'"), kv.get("port", "5432").strip("'")
        if names:
            move = db in names
        else:
            move = host == old.host and port == str(old.port)
        if not move:
            out.append(line)
            continue
        conn = _set_kv(conn, "host", new.host)
        conn = _set_kv(conn, "port", str(new.port))
        out.append(e.group("lead") + conn + ("\n" if line.endswith("\n") else ""))
        changed.append(db)
    return "".join(out), changed


def _set_kv(conn: str, key: str, value: str) -> str:
    pat = re.compile(rf"(?<![\w]){key}\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
    if pat.search(conn):
        return pat.sub(f"{key}={value}", conn, count=1)
    return f"{conn.rstrip()} {key}={value}"


def write_preserving(path: str, text: str) -> None:
    """Replace a file atomically, keeping its owner and mode."""
    st = os.stat(path)
    tmp = f"{path}.dbops-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, st.st_mode & 0o7777)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
