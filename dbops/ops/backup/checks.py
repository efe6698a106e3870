"""The checks run on a restored backup while its throwaway instance is up (paused at the target).

A new check goes here: it gets the configuration, the running instance and the list of check
records, appends its record, and raises ValidationError when the backup fails it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

from dbops.config import Config, Node
from dbops.errors import PostgresError, ValidationError
from dbops.ops.backup.environment import ended_cause, environment_cause, environment_error, killed_cause
from dbops.ops.backup.relfiles import RelFiles
from dbops.pg import binaries
from dbops.pg import conn as pgconn


# Planner switches that leave a sequential scan, which reads every page of the table (and, in a
# standby, checks every tuple's visibility against pg_xact: nothing is taken from the visibility map).
SEQ_SCAN_ONLY = ("enable_indexonlyscan", "enable_indexscan", "enable_bitmapscan")
TABLE_PAGE = 5000  # tables listed per query
SMALL_PAGES = 1024  # under min_parallel_table_scan_size's default (8 MB): read in batches
COUNT_BATCH = 200  # small tables read per statement (a UNION ALL of their count(*)): a round trip each, not
                   # one per table (100,000 empty tables took 15-19 s one at a time)
LOCK_BUDGET = 1000  # locks one such statement may take (the shared lock table holds max_locks_per_transaction
                    # x max_connections: 6,400 by default; 200 tables of 100 indexes each ran it out)


def _databases(node: Node) -> list[str]:
    with pgconn.session(node) as c:
        return [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]


# A session's own settings first: a role's or database's setting (ALTER ROLE/DATABASE ... SET) must not
# let a bad page through, nor make the server zero it (the throwaway's own settings force both off too).
VERIFY_PAGES = ("ignore_checksum_failure", "zero_damaged_pages")


# what pg_amcheck prints for each problem it finds: "heap table ...", "btree index ...", with the relation
_CORRUPTION = re.compile(r"^(heap table|btree index) \"", re.M)


def amcheck_cause(inst, returncode: int, out: str) -> str | None:
    """Why pg_amcheck failed when the machine is to blame, not the backup; None: the backup's fault.
    On its own it exits 2 for corruption found and 1 when a check could not complete (a lost
    connection, an error): 1 is the machine's only when the server was killed or the output names a
    cause of the machine's (no connection slot, out of memory). Any other status is the tool killed
    (the OOM killer: 137 through a container) or its engine unable to run it (125-127), unless its
    output already named corruption: what names corruption is always the backup's."""
    if returncode == 2 or _CORRUPTION.search(out):
        return None
    if returncode == 1:
        return killed_cause(inst) or environment_cause(out)
    return killed_cause(inst) or ended_cause(returncode, "pg_amcheck")


def run_checks(cfg: Config, inst, checks: list[dict[str, Any]], verified: RelFiles | set[str] | None = None) -> None:
    """Connect to every database, read every table in full (a sequential scan of each; pg_amcheck where
    amcheck is installed), run assertions. ``verified``: the main fork of each table read in full
    by a sequential scan is added there (its path in the data folder, as ``pg_relation_filepath``
    gives it): the server verified the checksum of every page it read from disk (see
    :mod:`dbops.ops.backup.shadow`)."""
    v = cfg.backup.validation
    for db in _databases(inst.node()):
        node = inst.node(db)
        try:
            with pgconn.session(node, db) as c:
                has_amcheck = bool(pgconn.scalar(c, "SELECT count(*) FROM pg_extension WHERE extname = 'amcheck'"))
                pages_verified = _verify_pages(c)
                n = int(pgconn.scalar(c, "SELECT count(*) FROM pg_class WHERE relkind IN ('r', 'm', 't') "
                                         "AND relpersistence = 'p' AND (relkind <> 'm' OR relispopulated)"))
                if not (v.amcheck and has_amcheck):
                    # count(*) would otherwise be answered from an index where the visibility map says
                    # all-visible (an index-only scan reads no heap page there): read the tables themselves
                    for knob in SEQ_SCAN_ONLY:
                        c.execute(f"SET {knob} = off")
                    rows = 0
                    for page in _table_pages(c):
                        small = [(t, path, locks) for t, path, pages, locks in page if pages < SMALL_PAGES]
                        large = [(t, path) for t, path, pages, _locks in page if pages >= SMALL_PAGES]
                        # Small tables up to 200 to a statement, as long as it takes at most LOCK_BUDGET
                        # locks (a table and each of its indexes: the lock table is shared and fixed in
                        # size), without parallel workers; a large one alone, as the server plans it.
                        c.execute("SET max_parallel_workers_per_gather = 0")
                        for part in _batches(small):
                            counts = c.execute(" UNION ALL ".join(f"SELECT count(*) FROM {t}" for t, _, _ in part))
                            rows += sum(int(r[0]) for r in counts.fetchall())
                        c.execute("RESET max_parallel_workers_per_gather")
                        for t, _ in large:
                            rows += int(pgconn.scalar(c, f"SELECT count(*) FROM {t}"))
                        if verified is not None and pages_verified:
                            verified.update(path for t, path, *_ in small + large if path)
                    checks.append({"check": "read_tables", "database": db, "ok": True, "tables": n,
                                   "rows": rows, "pages_verified": pages_verified})
        except PostgresError as e:
            checks.append({"check": "read_tables", "database": db, "ok": False, "error": e.detail or e.message})
            cause = environment_cause(e.detail or e.message) or killed_cause(inst)
            if cause:
                raise environment_error(f"database {db} of the restored backup could not be read", cause,
                                        e.detail or e.message) from None
            raise ValidationError(f"database {db} of the restored backup cannot be read",
                                  detail=e.detail or e.message) from None
        if v.amcheck and has_amcheck:
            r = inst.run_tool([tool_path(cfg, "pg_amcheck"), "-d", db, "--no-strict-names"], check=False, timeout=24 * 3600)
            ok = r.returncode == 0
            checks.append({"check": "pg_amcheck", "database": db, "ok": ok, "tables": n})
            if not ok and (cause := amcheck_cause(inst, r.returncode, r.stdout + r.stderr)):
                raise environment_error(f"pg_amcheck on database {db} of the restored backup was cut short", cause,
                                        (r.stdout + r.stderr)[-1000:] + "\n" + inst.logs(20))
            if not ok:
                raise ValidationError(f"pg_amcheck found corruption in database {db} of the restored backup",
                                      detail=(r.stdout + r.stderr)[-2000:])
    for a in v.assertions:
        try:
            with pgconn.session(inst.node(a.database), a.database) as c:
                val = pgconn.scalar(c, a.sql)
        except PostgresError as e:
            checks.append({"check": "assertion", "name": a.name, "ok": False, "error": e.detail or e.message})
            raise ValidationError(f"assertion {a.name!r} failed with an error", detail=e.detail or e.message) from None
        ok = val is True
        checks.append({"check": "assertion", "name": a.name, "ok": ok, "value": repr(val)})
        if not ok:
            raise ValidationError(f"assertion {a.name!r} did not hold on the restored backup",
                                  detail=f"{a.sql} returned {val!r}, expected true")


def _batches(tables: list[tuple[str, str | None, int]]) -> Iterator[list[tuple[str, str | None, int]]]:
    """Consecutive runs of at most COUNT_BATCH tables taking at most LOCK_BUDGET locks (one alone
    when it takes more)."""
    part: list[tuple[str, str | None, int]] = []
    locks = 0
    for t in tables:
        if part and (len(part) >= COUNT_BATCH or locks + t[2] > LOCK_BUDGET):
            yield part
            part, locks = [], 0
        part.append(t)
        locks += t[2]
    if part:
        yield part


def _table_pages(c) -> Iterator[list[tuple[str, str | None, int, int]]]:
    """The database's tables to read, TABLE_PAGE at a time (by OID; never the whole list): each
    one's quoted name, for a heap table the path of its main fork (a sequential scan of another
    table access method need not read every block of it: that stays with pg_checksums), its size
    in pages as the catalog last estimated it, and the locks reading it takes (itself and each
    index: the planner opens them). A materialized view never populated (WITH NO DATA) cannot be
    read and holds nothing: it is left out."""
    last = 0
    while True:
        found = c.execute(
            "SELECT c.oid, format('%%I.%%I', n.nspname, c.relname), "
            "CASE WHEN a.amname = 'heap' THEN pg_relation_filepath(c.oid) END, c.relpages, "
            "1 + (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_am a ON a.oid = c.relam "
            "WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p' AND (c.relkind <> 'm' OR c.relispopulated) "
            "AND c.oid > %s "
            "ORDER BY c.oid LIMIT %s", (last, TABLE_PAGE)).fetchall()
        if not found:
            return
        yield [(name, path, int(pages), int(locks)) for _oid, name, path, pages, locks in found]
        last = found[-1][0]


def _verify_pages(c) -> bool:
    """Set VERIFY_PAGES off in this session; True when both are off (a user other than a superuser
    may not set them: then nothing this session reads counts as verified)."""
    for knob in VERIFY_PAGES:
        try:
            if pgconn.scalar(c, f"SELECT current_setting('{knob}')") != "off":
                c.execute(f"SET {knob} = off")
        except PostgresError:
            return False
    return all(pgconn.scalar(c, f"SELECT current_setting('{knob}')") == "off" for knob in VERIFY_PAGES)


def tool_path(cfg: Config, name: str) -> str:
    """A PostgreSQL tool's path as the runtime sees it (host bin dir for rootfs/none, PATH in an image)."""
    if cfg.runtime.engine != "none" and cfg.runtime.image:
        return os.path.join(cfg.runtime.bin_dir, name) if cfg.runtime.bin_dir else name
    return binaries.binary(name, cfg.runtime.bin_dir)
