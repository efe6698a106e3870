"""Issue #13 item 12: restore follows the history that holds the target, not the highest timeline.

One backup on timeline 1, then two competing branches in the same archive, both made by promoting
a restored copy that keeps archiving: timeline 2 forks from timeline 1 after x1, and later
timeline 3 forks from timeline 1 after x2. Without --timeline:

* a time on timeline 1 after timeline 3's fork point (x3 committed) restores timeline 1's rows.
  Following the highest timeline (3) would leave timeline 1 at 3's fork and silently lose x3;
* a time on timeline 2 restores timeline 2's rows (timeline 3 did not exist yet then).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from dbops.lab.harness import free_port
from labkit import now_on, rows, sql, stop, switch_and_archive, wait_archived

pytestmark = [pytest.mark.integration, pytest.mark.container]


def commit(node, note: str) -> datetime:
    """Insert a row; return a time after its commit (and before the next one)."""
    sql(node, f"INSERT INTO t (note) VALUES ('{note}')")
    time.sleep(0.05)
    t = now_on(node)
    time.sleep(0.05)
    return t


def test_restore_follows_the_branch_that_holds_the_target(make_lab, cli):
    lab = make_lab(replicas=0)
    p = lab.primary
    sql(p, "CREATE TABLE t (id serial PRIMARY KEY, note text)")
    commit(p, "base")
    r = cli(["-c", lab.config_path, "backup", "--json"])
    assert r.exit_code == 0, r
    t_x1 = commit(p, "x1")
    t_x2 = commit(p, "x2")
    t_x3 = commit(p, "x3")
    commit(p, "x4")
    switch_and_archive(lab, p)
    dirs = Path(lab.dir)

    def restore(name: str, *args: str):
        port = free_port()
        res = cli(["-c", lab.config_path, "restore", "--target-dir", str(dirs / name), "--start", "--port", str(port),
                   "--json", *args])
        assert res.exit_code == 0, res
        return json.loads(res.stdout), replace(p, name=name, port=port), dirs / name

    # Timeline 2: a copy restored to x1, promoted, archiving into the same archive.
    d2, n2, dir2 = restore("tl2", "--to", t_x1.isoformat(), "--keep-archiving")
    try:
        assert d2["reached"]["promoted_timeline"] == 2, d2["reached"]
        wait_archived(lab, "00000002.history")  # the branch exists in the archive before its commits
        time.sleep(1.1)  # Last-Modified has whole seconds
        t_2 = commit(n2, "tl2-a")
        commit(n2, "tl2-b")
        switch_and_archive(lab, n2)
    finally:
        stop(dir2)
    time.sleep(1.1)
    # Timeline 3: made later, from an older point of timeline 1 (after x2).
    d3, n3, dir3 = restore("tl3", "--to", t_x2.isoformat(), "--timeline", "1", "--keep-archiving")
    try:
        assert d3["reached"]["promoted_timeline"] == 3, d3["reached"]
        wait_archived(lab, "00000003.history")
        commit(n3, "tl3-a")
        switch_and_archive(lab, n3)
    finally:
        stop(dir3)

    # A time on timeline 1 after timeline 3's fork: timeline 1's rows, x3 included.
    d, node, data = restore("on-tl1", "--to", t_x3.isoformat())
    try:
        assert d["plan"]["timeline"] == 1, d["plan"]["notes"]
        assert rows(node, "t") == ["base", "x1", "x2", "x3"]
    finally:
        stop(data)
    # A time on timeline 2: timeline 2's rows.
    d, node, data = restore("on-tl2", "--to", t_2.isoformat())
    try:
        assert d["plan"]["timeline"] == 2, d["plan"]["notes"]
        assert rows(node, "t") == ["base", "x1", "tl2-a"]
    finally:
        stop(data)
    # --timeline latest is PostgreSQL's 'latest': the highest timeline (3), whose history leaves
    # timeline 1 after x2, so x3 is not there.
    d, node, data = restore("latest", "--to", t_x3.isoformat(), "--timeline", "latest")
    try:
        assert d["plan"]["timeline"] == 3
        assert rows(node, "t") == ["base", "x1", "x2"]
    finally:
        stop(data)
