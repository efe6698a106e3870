"""Issue #13, the kill -9 part of the fault suite for `dbops backup`, `dbops backup prune` and
`dbops restore`: each is killed with SIGKILL right after each of its phases (found by its own log
line), in a loop over the phases, on one lab shared by the loop. After every kill:

* right away: every backup listed is whole (`dbops verify` reads every object it names);
* after the following normal run (the next backup, the next prune, the restore run again with
  --force or --delta): every segment PostgreSQL was told is archived is in the archive byte for
  byte; no backup is marked failed (a kill says nothing about a backup); nothing is left in scratch,
  no throwaway container or PostgreSQL of the killed run still runs; no object of an unlisted
  backup is left in the bucket; a restored folder is complete and nothing beside it was touched.

At the end every listed backup restores (tests/faults/invariants.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from labkit import own_lab
from invariants import archived_segments_are_in_the_archive, every_listed_backup_restores, scratch_is_empty, sql
from killrun import run_killed

from dbops.pg import running
from dbops.repo import catalog
from dbops.storage import open_store
from dbops.storage.layout import Layout

pytestmark = [pytest.mark.integration, pytest.mark.container, pytest.mark.timeout(900)]

# An incremental `dbops backup`, killed right after: the lock taken; the previous backup restored into
# scratch; its container started; WAL replayed to the target; the checks (container still running);
# the packs stored (the manifest next); the manifest written (the status record next); the retention
# applied (auto-prune). Points in between leave the same state (the target captured ~ the lock taken,
# PostgreSQL ready ~ the container started, the container stopped ~ the checks).
BACKUP_KILLS = ["acquired lock", "restored backup", "container started", "phase replay done", "phase checks done",
                "packs of backup", "backup stored", "pruned"]
# `dbops backup prune --confirm`: the lock taken; the manifests deleted; the rest of those backups;
# the packs; the WAL before the oldest kept backup.
PRUNE_KILLS = ["acquired lock", "removed backup", "deleted the other objects", "deleted the packs", "pruned"]
# `dbops restore`: planned (WAL fetched ahead); the files written; the recovery settings written;
# PostgreSQL started on the folder; ready; replayed to the target; promoted; stopped.
RESTORE_KILLS = ["restore planned", "restored backup", "phase configure done", "local instance started",
                 "instance ready", "phase replay done", "phase promote done", "local instance stopped"]


@pytest.fixture(scope="module")
def klab(lab_factory):
    yield from own_lab(lab_factory, "faults-killruns")


@pytest.fixture(scope="module")
def env(klab, dbops_bin) -> dict[str, str]:
    global DBOPS
    DBOPS = dbops_bin
    e = {**os.environ, "DBOPS_CONFIG": klab.config_path}
    r = run(e, "backup")  # the first (full) backup: the loops below take incremental ones
    assert r.returncode == 0, r.stderr[-3000:]
    return e


DBOPS = ""  # the dbops executable (set by the env fixture)


def run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DBOPS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def config_copy(lab, name: str, retention: dict) -> str:
    raw = yaml.safe_load(Path(lab.config_path).read_text())
    raw.setdefault("backup", {}).setdefault("retention", {}).update(retention)
    path = lab.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def write_some(lab) -> None:
    sql(lab.primary, "CREATE TABLE IF NOT EXISTS killruns (n int, t timestamptz default now())")
    sql(lab.primary, "INSERT INTO killruns SELECT g FROM generate_series(1, 500) g")
    sql(lab.primary, "SELECT pg_switch_wal()")


def listed(env) -> dict[str, str]:
    r = run(env, "backup", "list", "--json")
    assert r.returncode == 0, r.stderr
    out = {}
    for b in json.loads(r.stdout):
        st = b.get("status")
        out[b["backup_id"]] = (st.get("state") if isinstance(st, dict) else st) or "stored"
    return out


def whole(env, ids) -> None:
    """Every object the backup names is there and matches its hash."""
    for bid in ids:
        r = run(env, "verify", bid)
        assert r.returncode == 0, f"listed backup {bid} is not whole: {r.stdout}{r.stderr[-2000:]}"


def containers_of(pid: int) -> list[str]:
    r = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}", "--filter", f"label=dbops.pid={pid}"],
                       capture_output=True, text=True, check=False, timeout=60)
    return r.stdout.split()


def servers_under(folder: Path) -> list[Path]:
    f = folder.resolve()
    return [d for d in running.running_data_dirs() if d == f or f in d.parents]


def unlisted_leftovers(lab) -> tuple[list[str], list[str]]:
    """(objects of a backup without a manifest that has status records: what a killed prune left and
    the next one must remove; the others: a backup killed before its manifest, removed by a prune
    once older than orphan_grace, like its packs)."""
    store, layout = open_store(lab.config.storage), Layout(lab.config.storage.prefix)
    ids = {b.backup_id for b in catalog.list_backups(store, layout, with_status=False)}
    base = layout.backups_prefix()
    left = [o.key for o in store.list(base) if o.key[len(base):].split("/", 1)[0] not in ids]
    deleted = {k[len(base):].split("/", 1)[0] for k in left if "/status/" in k}
    return (sorted(k for k in left if k[len(base):].split("/", 1)[0] in deleted),
            sorted(k for k in left if k[len(base):].split("/", 1)[0] not in deleted))


def nothing_left(lab, killed_pid: int) -> None:
    scratch = Path(lab.config.backup.scratch_dir)
    scratch_is_empty(scratch)
    assert containers_of(killed_pid) == [], f"containers of the killed run {killed_pid} still there"
    assert servers_under(scratch) == [], "a throwaway PostgreSQL still runs in scratch"
    copies = sorted(Path(tempfile.gettempdir()).glob(f"dbops-manifest-p{killed_pid}n*"))
    assert copies == [], f"manifest copies of the killed run {killed_pid} still there: {copies}"


def test_kill_9_at_every_phase_of_a_backup(klab, env, tmp_path):
    results = {}
    for point in BACKUP_KILLS:
        write_some(klab)
        before = listed(env)
        k = run_killed(DBOPS, env, ["backup"], point)
        assert k.killed, (point, k.returncode, k.stderr[-3000:])
        now = listed(env)
        whole(env, [b for b in now if b not in before])  # a half-written backup is never listed
        r = run(env, "backup", "--json")  # the following normal run
        assert r.returncode == 0, (point, r.stderr[-3000:])
        after = listed(env)
        assert "failed" not in after.values(), (point, after)
        nothing_left(klab, k.pid)
        deleted, unfinished = unlisted_leftovers(klab)
        assert deleted == [], point
        assert archived_segments_are_in_the_archive(klab, tmp_path) > 0
        results[point] = ("listed after the kill: " + ("+1" if len(now) > len(before) else "unchanged")
                          + (f"; {len(unfinished)} object(s) of an unlisted backup" if unfinished else ""))
    every_listed_backup_restores(DBOPS, env)
    print("kill -9 backup:", results)


def test_kill_9_at_every_phase_of_a_prune(klab, env, tmp_path):
    keep_all = config_copy(klab, "keep-all", {"auto": False, "keep_last": 100})
    keep_one = config_copy(klab, "keep-one", {"auto": False, "keep_last": 1})
    for point in PRUNE_KILLS:
        write_some(klab)
        r = run(env, "-c", keep_all, "backup")  # something for the prune to remove
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(listed(env)) >= 2
        k = run_killed(DBOPS, env, ["-c", keep_one, "backup", "prune", "--confirm"], point)
        assert k.killed, (point, k.returncode, k.stderr[-3000:])
        whole(env, listed(env))  # what is still listed is whole: manifests go first
        r = run(env, "-c", keep_one, "backup", "prune", "--confirm", "--json")  # the following normal run
        assert r.returncode == 0, (point, r.stderr[-3000:])
        whole(env, listed(env))
        assert unlisted_leftovers(klab)[0] == [], point
        nothing_left(klab, k.pid)
        assert archived_segments_are_in_the_archive(klab, tmp_path) > 0
    every_listed_backup_restores(DBOPS, env)


@pytest.mark.parametrize("rerun", ["--force", "--delta"])
def test_kill_9_at_every_phase_of_a_restore(klab, env, tmp_path, rerun):
    write_some(klab)
    r = run(env, "backup")
    assert r.returncode == 0, r.stderr[-3000:]
    for i, point in enumerate(RESTORE_KILLS):
        if (i % 2 == 0) != (rerun == "--force"):
            continue  # each re-run mode takes every other phase: both together cover every phase once each
        parent = klab.dir / f"kill-restore-{i}"
        parent.mkdir()
        neighbour = parent / "neighbour"
        neighbour.write_text("not dbops'")
        target = parent / "target"
        k = run_killed(DBOPS, env, ["restore", "--to", "latest", "--target-dir", str(target)], point)
        assert k.killed, (point, k.returncode, k.stderr[-3000:])
        r = run(env, "restore", "--to", "latest", "--target-dir", str(target), rerun, "--json")
        assert r.returncode == 0, (point, rerun, r.stderr[-3000:])
        res = json.loads(r.stdout)
        assert res["final_state"] == "promoted"
        assert sorted(p.name for p in parent.iterdir()) == ["neighbour", "target"], (point, list(parent.iterdir()))
        assert neighbour.read_text() == "not dbops'"
        assert not (target / "DBOPS_RESTORE_INCOMPLETE").exists()
        assert (target / "global" / "pg_control").exists()
        assert servers_under(target) == []
        nothing_left(klab, k.pid)
        subprocess.run(["rm", "-rf", str(parent)], check=True)
