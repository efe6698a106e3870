"""Tablespaces in the chunk store: contents walked from a given folder (never through the link),
recorded with OID, name and original location, restored into the folder chosen for each, and a
damaged manifest entry refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbops.repo import manifest as mf
from dbops.repo import tblspc
from dbops.repo.restore import restore_snapshot
from dbops.repo.tblspc import Tablespace
from dbops.errors import PreconditionError, ValidationError
from dbops.storage.layout import Layout
from dbops.storage.local import LocalStore
from test_backup_store import make_datadir, pages, snapshot

VERSION_DIR = "PG_15_202209061"


def tablespace_folder(root: Path, seed: int) -> Path:
    d = root / f"ts-copy-{seed}"
    (d / VERSION_DIR / "5").mkdir(parents=True)
    (d / VERSION_DIR / "5" / "30000").write_bytes(pages(100 + seed, 3))
    (d / VERSION_DIR / "5" / "30001_init").write_bytes(pages(200 + seed, 1))  # an unlogged relation
    (d / VERSION_DIR / "5" / "30001").write_bytes(pages(300 + seed, 2))
    return d


@pytest.fixture
def env(tmp_path):
    store = LocalStore(tmp_path / "store")
    d = make_datadir(tmp_path)
    os.unlink(d / "pg_tblspc/16400")
    live = tmp_path / "live-ts1"  # the original location: must never be read
    live.mkdir()
    (live / "DO-NOT-READ").write_text("live")
    copy = tablespace_folder(tmp_path, 1)
    os.symlink(str(live), d / "pg_tblspc/16400")  # as after a replay of CREATE TABLESPACE in a container
    return store, Layout("c"), d, live, copy


def test_round_trip_into_a_chosen_folder(env, tmp_path):
    store, layout, d, live, copy = env
    ts = Tablespace(16400, "fast", str(live))
    m = snapshot(store, layout, d, "b1", tablespaces={ts: str(copy)})
    assert m.tablespaces == [Tablespace(16400, "fast", str(live), 8192 * 4)]  # the size: its stored files
    ts = m.tablespaces[0]
    paths = {f.path: f for f in m.files}
    assert paths["pg_tblspc/16400"].type == "symlink" and paths["pg_tblspc/16400"].target == str(live)
    assert f"pg_tblspc/16400/{VERSION_DIR}/5/30000" in paths
    assert not any("DO-NOT-READ" in p for p in paths)  # the link was not followed
    assert f"pg_tblspc/16400/{VERSION_DIR}/5/30001" not in paths  # unlogged main fork left out

    loaded = mf.load(store, layout, "b1")
    assert loaded.tablespaces == [ts]
    target, dest = tmp_path / "restored", tmp_path / "elsewhere" / "fast"
    restore_snapshot(store, layout, loaded, str(target), parallel=2, tablespace_dirs={16400: str(dest)})
    assert os.readlink(target / "pg_tblspc/16400") == str(dest)
    assert (dest / VERSION_DIR / "5" / "30000").read_bytes() == pages(101, 3)
    # the unlogged relation's main fork is reset from its init fork, inside the tablespace too
    assert (dest / VERSION_DIR / "5" / "30001").read_bytes() == pages(201, 1)
    assert oct(dest.stat().st_mode & 0o777) == oct(0o700)
    assert (live / "DO-NOT-READ").read_text() == "live" and sorted(os.listdir(live)) == ["DO-NOT-READ"]


def test_restore_needs_an_empty_folder_for_each_tablespace(env, tmp_path):
    store, layout, d, live, copy = env
    snapshot(store, layout, d, "b1", tablespaces={Tablespace(16400, "fast", str(live)): str(copy)})
    m = mf.load(store, layout, "b1")
    with pytest.raises(PreconditionError, match="no folder given for tablespace fast"):
        restore_snapshot(store, layout, m, str(tmp_path / "r1"), parallel=1)
    with pytest.raises(PreconditionError, match="tablespace fast"):
        restore_snapshot(store, layout, m, str(tmp_path / "r2"), parallel=1, tablespace_dirs={16400: str(live)})
    assert sorted(os.listdir(live)) == ["DO-NOT-READ"]


def test_unknown_tablespace_link_is_refused_when_tablespaces_are_given(env):
    store, layout, d, live, copy = env
    with pytest.raises(PreconditionError, match="pg_tblspc/16400"):
        snapshot(store, layout, d, "b1", tablespaces={})


def test_manifest_entries_outside_listed_tablespaces_are_refused():
    ts = [Tablespace(16400, "a", "/x")]
    tblspc.check_entries(ts, [("pg_tblspc/16400", "symlink"), ("pg_tblspc/16400/PG_15/5/1", "file"),
                              ("pg_tblspc/99", "symlink")])  # a legacy bare link is tolerated
    with pytest.raises(ValidationError):
        tblspc.check_entries(ts, [("pg_tblspc/99/PG_15/5/1", "file")])
    with pytest.raises(ValidationError):
        tblspc.check_entries(ts, [("pg_tblspc/16400", "dir")])
    with pytest.raises(ValidationError):
        Tablespace.from_dict({"oid": 1, "name": "a", "location": "relative/path"})


# --------------------------------------------------------------------------- where a restore puts them


from dbops.errors import ExitCode, UsageError  # noqa: E402
from dbops.ops.backup.tablespaces import ScratchTablespaces  # noqa: E402
from dbops.ops.restore import tablespaces as rts  # noqa: E402
from dbops.runtime import mountns  # noqa: E402
from dbops.runtime.base import InstanceSpec, Owner  # noqa: E402
from dbops.runtime.container import ContainerRuntime  # noqa: E402
from dbops.runtime.engine import Engine  # noqa: E402


def spaces(tmp_path):
    a = Tablespace(16400, "fast", str(tmp_path / "live-fast"), 100)
    b = Tablespace(16401, "slow", str(tmp_path / "live-slow"), 7)
    return [a, b], None


def test_restore_destinations_map_map_all_and_original(tmp_path):
    ts, files = spaces(tmp_path)
    target = tmp_path / "data"
    got = rts.destinations(ts, target_dir=target, mapping=rts.parse_map(["16400=" + str(tmp_path / "x")]),
                           map_all=tmp_path / "all")
    assert [(d.folder, d.how, d.size) for d in got] == [(tmp_path / "x", "mapped", 100),
                                                        (tmp_path / "all" / "slow", "map-all", 7)]
    got = rts.destinations(ts, target_dir=target)  # absent original locations may be used
    assert [(d.folder, d.how, d.state) for d in got] == [(Path(ts[0].location), "original", "absent"),
                                                         (Path(ts[1].location), "original", "absent")]


def test_restore_refuses_a_non_empty_original_location_naming_the_flag(tmp_path):
    ts, files = spaces(tmp_path)
    Path(ts[1].location).mkdir()
    (Path(ts[1].location) / "PG_15_x").mkdir()
    with pytest.raises(PreconditionError) as e:
        rts.destinations(ts, target_dir=tmp_path / "data")
    assert e.value.exit_code == ExitCode.PRECONDITION
    assert "tablespace slow (OID 16401)" in e.value.message and "--tablespace-map slow=DIR" in e.value.hint
    with pytest.raises(PreconditionError, match="not empty"):  # a mapped folder must be empty too
        rts.destinations(ts, target_dir=tmp_path / "data", mapping=(("slow", ts[1].location),))
    got = rts.destinations(ts, target_dir=tmp_path / "data", mapping=(("slow", ts[1].location),), force=True)
    assert got[1].state == "not empty"


def test_restore_map_errors(tmp_path):
    ts, files = spaces(tmp_path)
    with pytest.raises(UsageError, match="no tablespace nope"):
        rts.destinations(ts, target_dir=tmp_path / "d", mapping=(("nope", "/x"),))
    with pytest.raises(UsageError, match="NAME=DIR"):
        rts.parse_map(["fast"])
    with pytest.raises(UsageError, match="more than once"):
        rts.parse_map(["fast=/a", "fast=/b"])
    with pytest.raises(PreconditionError, match="same folder"):
        rts.destinations(ts, target_dir=tmp_path / "d", mapping=(("fast", "/s"), ("slow", "/s")))
    with pytest.raises(PreconditionError, match="inside the target"):
        rts.destinations(ts, target_dir=tmp_path / "d", mapping=(("fast", str(tmp_path / "d" / "t")),))


def test_created_in_wal_needs_a_free_location_or_a_map(tmp_path):
    live = tmp_path / "live-new"
    live.mkdir()
    (live / "PG_15_x").mkdir()
    with pytest.raises(PreconditionError, match="OID 16500, created after the backup"):
        rts.created_destinations({16500: str(live)}, [])
    got = rts.created_destinations({16500: str(live), 16400: "/old"}, [Tablespace(16400, "fast", "/old")],
                                   map_all=tmp_path / "all")
    assert got == {16500: (str(live), tmp_path / "all" / "16500")}
    # a folder this replay gave an earlier CREATE (dropped and created anew there) is given again, filled
    assert rts.created_destinations({16501: str(live)}, [], given={live}) == {16501: (str(live), live)}
    with pytest.raises(PreconditionError, match="OID 16501, created after the backup"):
        rts.created_destinations({16501: str(live)}, [], given={tmp_path / "other"})


# --------------------------------------------------------------------------- the throwaway instance


def test_scratch_tablespaces_mounts_and_relink(tmp_path):
    st = ScratchTablespaces(tmp_path, known={16400: Tablespace(16400, "fast", "/srv/fast")},
                            created={16500: "/srv/new"})
    f400, f500 = str(tmp_path / "tblspc/16400"), str(tmp_path / "tblspc/16500")
    assert st.mounts("podman") == ((f400, f400), (f500, f500), (f500, "/srv/new"))
    assert st.mounts("none") == ((f500, "/srv/new"),)
    assert st.mapping_args() == [f"--tablespace-mapping=/srv/fast={f400}"]
    data = tmp_path / "data"
    (data / "pg_tblspc").mkdir(parents=True)
    os.symlink("/srv/new", data / "pg_tblspc/16500")  # as replay of the CREATE left it
    os.symlink(f400, data / "pg_tblspc/16400")
    st.relink(data)
    assert os.readlink(data / "pg_tblspc/16500") == f500
    snap = st.snapshot(data, {16400: "fast", 16500: "new"})
    assert snap == {Tablespace(16400, "fast", "/srv/fast"): f400, Tablespace(16500, "new", "/srv/new"): f500}
    os.symlink("/srv/other", data / "pg_tblspc/16600")
    with pytest.raises(ValidationError, match="16600"):
        st.relink(data)


def test_container_mounts_each_tablespace_folder(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(), run.mkdir()
    rt = ContainerRuntime(Engine("docker"), image="postgres:15")
    spec = InstanceSpec(data_dir=data, port=5999, mounts=((str(tmp_path / "s"), "/srv/new"),))
    argv = rt.tool_argv(["pg_checksums"], spec, name="x", owner=Owner(999, 999), run_dir=run, env_names=[],
                        labels={})
    assert f"{tmp_path / 's'}:/srv/new" in argv


def test_private_mount_namespace_argv():
    argv = mountns.wrap(["/usr/bin/postgres", "-D", "/d"], [("/scratch/t", "/srv/new")], "postgres")
    assert argv[1:5] == ["--mount", "--propagation", "private", "--"]
    assert argv[-10:] == ["1", "/scratch/t", "/srv/new", argv[-7], "-u", "postgres", "--", "/usr/bin/postgres",
                          "-D", "/d"]
    assert argv[-7].endswith("runuser")
    assert mountns.moved([("/a", "/a"), ("/b", "/c")]) == [("/b", "/c")]


def test_delta_restore_repairs_a_tablespace_folder(env, tmp_path):
    from dbops.ops.restore.delta import restore_delta

    store, layout, d, live, copy = env
    snapshot(store, layout, d, "b1", tablespaces={Tablespace(16400, "fast", str(live)): str(copy)})
    m = mf.load(store, layout, "b1")
    target, dest = tmp_path / "restored", tmp_path / "ts-fast"
    restore_snapshot(store, layout, m, str(target), parallel=2, tablespace_dirs={16400: str(dest)})
    rel = dest / VERSION_DIR / "5" / "30000"
    damaged = bytearray(rel.read_bytes())
    damaged[9000] ^= 0xFF
    rel.write_bytes(bytes(damaged))
    (dest / VERSION_DIR / "5" / "99999").write_bytes(b"extra")
    os.unlink(target / "pg_tblspc/16400")
    os.symlink("/somewhere/else", target / "pg_tblspc/16400")
    got = restore_delta(store, layout, m, target, parallel=2, tablespace_dirs={16400: str(dest)})
    assert rel.read_bytes() == pages(101, 3)
    assert not (dest / VERSION_DIR / "5" / "99999").exists()
    assert os.readlink(target / "pg_tblspc/16400") == str(dest)
    assert 0 < got["fetched_bytes"] and got["kept_bytes"] > 0 and got["removed"] >= 1
    assert sorted(os.listdir(live)) == ["DO-NOT-READ"]
