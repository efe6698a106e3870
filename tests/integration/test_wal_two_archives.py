"""Issue 13 item 1 on a real lab: archive_command pushing to two archives (two configurations that
differ only in storage.prefix), with a backlog of .ready files waiting when the second archive is
added. Every segment PostgreSQL was told is archived is in both archives, byte for byte."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import yaml

from dbops.ops.wal.archive import WalArchive
from dbops.pg import conn
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def sql(node, q: str):
    with conn.session(node) as c:
        cur = c.execute(q)
        return cur.fetchall() if cur.description else None


def switch(node) -> str:
    sql(node, "CREATE TABLE IF NOT EXISTS t_two (i int)")
    sql(node, "INSERT INTO t_two SELECT generate_series(1, 100)")
    return sql(node, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]


def set_archive_command(node, command: str) -> None:
    sql(node, f"ALTER SYSTEM SET archive_command = '{command}'")
    sql(node, "SELECT pg_reload_conf()")
    time.sleep(0.5)


def test_two_archives_each_get_every_segment(make_lab, dbops_bin, tmp_path):
    lab = make_lab(replicas=0)
    node = lab.primary
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    raw["storage"]["prefix"] = "lab-b"
    b_path = lab.dir / "dbops-b.yaml"
    b_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.chmod(b_path, 0o644)
    a_path = lab.config_path
    # one store per prefix: with storage.encryption, objects are bound to their prefix
    arc_a = WalArchive(open_store(lab.config.storage), Layout("lab"))
    arc_b = WalArchive(open_store(dataclasses.replace(lab.config.storage, prefix="lab-b")), Layout("lab-b"))

    # a backlog first: archiving fails, three segments wait as .ready
    set_archive_command(node, "/bin/false")
    names = [switch(node) for _ in range(3)]
    set_archive_command(node, f"{dbops_bin} -c {a_path} wal-push %p && {dbops_bin} -c {b_path} wal-push %p")
    names += [switch(node) for _ in range(3)]
    deadline = time.monotonic() + 120
    done_dir = Path(node.data_dir) / "pg_wal" / "archive_status"
    while time.monotonic() < deadline and not all((done_dir / f"{n}.done").exists() for n in names):
        time.sleep(0.3)
    assert all((done_dir / f"{n}.done").exists() for n in names), sorted(os.listdir(done_dir))
    for name in names:
        local = (Path(node.data_dir) / "pg_wal" / name).read_bytes()
        for arc, label in ((arc_a, "a"), (arc_b, "b")):
            dest = tmp_path / f"{label}-{name}"
            arc.fetch(name, dest)  # NotFoundError here is the bug: acknowledged, never archived
            assert dest.read_bytes() == local, (label, name)
