"""What the lab tests share: SQL on a node, waiting for a segment to reach the archive, backups and
restores through dbops, and reading a restored copy. (tests/ is on sys.path: `from labkit import sql`.)

Every wait here is for a condition with a deadline, never for a fixed time."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from dbops import config as cfgmod
from dbops import proc
from dbops.errors import PostgresError
from dbops.pg import binaries
from dbops.pg import conn as pgconn
from dbops.storage import open_store
from dbops.storage.layout import Layout


class CliResult:
    def __init__(self, exit_code: int, stdout: str, stderr: str):
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.output = stdout + stderr

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-800:]!r}, stderr={self.stderr[-2500:]!r})"


def make_cli():
    """`run(ARGS, env=None, input=None)`: `dbops ARGS` in this process through typer's CliRunner (the
    `cli` fixture; call it directly where a module-scoped fixture needs one)."""
    from typer.testing import CliRunner

    from dbops.cli.app import app

    runner = CliRunner()

    def run(args: list, env: dict[str, str] | None = None, input: str | None = None) -> CliResult:
        r = runner.invoke(app, [str(a) for a in args], env=env, input=input, catch_exceptions=False)
        return CliResult(r.exit_code, r.stdout, r.stderr)

    return run


def own_lab(lab_factory, name: str, replicas: int = 0):
    """A module's own lab, torn down when the module ends: `yield from own_lab(lab_factory, NAME)` in a
    module-scoped fixture."""
    info = lab_factory.create(name, replicas=replicas)
    yield info
    lab_factory.destroy(info.dir)


def sql(node, statement: str, params: tuple | None = None):
    """Run one statement (30 s statement timeout); its rows, or None. A failure names the statement."""
    try:
        with pgconn.session(node, options="-c statement_timeout=30000") as c:
            cur = c.execute(statement, params)
            return cur.fetchall() if cur.description else None
    except PostgresError as e:
        raise AssertionError(f"{statement}: {e.detail or e.message}") from None


def now_on(node) -> datetime:
    return sql(node, "SELECT clock_timestamp()")[0][0]


def wait_archived(lab, name: str, timeout: float = 60) -> None:
    """Wait until WAL file `name` (a segment or a history file) is in the lab's archive. The
    configuration is read from the lab's file, as archive_command does (a test may rewrite it)."""
    cfg = cfgmod.load(lab.config_path)
    store, layout = open_store(cfg.storage), Layout(cfg.storage.prefix)
    deadline = time.monotonic() + timeout
    while store.head(layout.wal_key(name)) is None:
        assert time.monotonic() < deadline, f"{name} was not archived within {timeout} s"
        time.sleep(0.2)


def switch_and_archive(lab, node=None, timeout: float = 60) -> str:
    """Close the current segment on `node` (default: the lab's primary) and wait until it is in the
    archive; returns its name."""
    name = sql(node or lab.primary, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_archived(lab, name, timeout)
    return name


def backup(lab) -> str:
    """A backup of the lab run in this process (quicker than the CLI); returns its id."""
    from dbops.ops.backup.run import run_backup

    os.environ["DBOPS_LOCK_DIR"] = str(lab.dir / "run")  # labs share bucket names: keep host locks apart
    try:
        return run_backup(lab.config).backup_id
    finally:
        os.environ.pop("DBOPS_LOCK_DIR", None)


def backup_cli(cli, config: str, *extra, env: dict[str, str] | None = None):
    """`dbops -c CONFIG backup --json EXTRA...`: the result and its JSON (None when it printed none)."""
    r = cli(["-c", str(config), "backup", "--json", *extra], env=env)
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def restore(cli, lab, *args, env: dict[str, str] | None = None):
    return cli(["-c", lab.config_path, "restore", *map(str, args)], env=env)


def restored(lab, port: int):
    """The lab's primary as a node on `port`: how a test reaches a restored copy it started there."""
    return replace(lab.primary, name="restored", port=port)


def pg_ctl(data: Path, *args: str) -> None:
    proc.run([binaries.binary("pg_ctl"), "-D", str(data), *args], user="postgres", timeout=120, check=False)


def stop(data: Path) -> None:
    """Stop the PostgreSQL on `data` (fast), waiting until it is down; nothing when none runs."""
    pg_ctl(data, "stop", "-m", "fast", "-w")


def rows(node, table: str) -> list[str] | None:
    """The notes in `table` by id, or None when the table does not exist."""
    if not sql(node, "SELECT to_regclass(%s) IS NOT NULL", (table,))[0][0]:
        return None
    return [r[0] for r in sql(node, f"SELECT note FROM {table} ORDER BY id")]


def iso(t: datetime, tz: timezone = timezone.utc) -> str:
    return t.astimezone(tz).isoformat()


def same_zstd() -> bool:
    """Both writers bundle the same zstd release (zstandard's cffi backend, backports.zstd): only then
    are their frames promised to be the same bytes (another release may find other matches; the
    frames still decode either way)."""
    from dbops.repo import codec

    fns = codec.zstd_compress_functions()
    major, minor, patch = codec.prefix_zstd().zstd_version_info
    return fns is not None and fns[1].ZSTD_versionNumber() == major * 10000 + minor * 100 + patch
