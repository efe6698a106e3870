"""Throwaway PostgreSQL through each runtime (podman with the host rootfs, and a local process),
against real clusters made with initdb and pg_basebackup here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from diskfill import fill_up, tmpfs

from dbops import proc
from dbops.config import RuntimeSettings
from dbops.errors import PostgresError
from dbops.pg import binaries, conn, controldata
from dbops.runtime import InstanceSpec, cleanup_stale, engine_of, open_runtime, probe
from dbops.runtime import container
from dbops.runtime.container import ContainerInstance
from dbops.runtime.local import LocalInstance

pytestmark = [pytest.mark.integration, pytest.mark.container]

PASSWORD = "src-secret-Zq81"
ROWS_BEFORE_TARGET = 30
ROWS_AFTER_TARGET = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg(name: str) -> str:
    return binaries.binary(name)


def copy_cluster(src: Path, dst: Path) -> Path:
    proc.run(["cp", "-a", str(src), str(dst)])
    return dst


def own_folder(base_dir: Path, name: str) -> Path:
    """A test module's own folder under base_dir, owned by postgres (made once per session)."""
    d = base_dir / name
    d.mkdir()
    shutil.chown(d, "postgres", "postgres")
    return d


@pytest.fixture(scope="module")
def work(base_dir) -> Path:
    return own_folder(base_dir, "runtime")


@pytest.fixture(scope="module")
def settings(work) -> dict[str, RuntimeSettings]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install -y podman runc)")
    return {
        "podman": RuntimeSettings(engine="podman", rootfs="/", containers_conf=str(work / "containers.conf")),
        "none": RuntimeSettings(engine="none"),
    }


def stopped_cluster(work: Path, name: str, statements: list[str], value: str | None = None) -> tuple[Path, object]:
    """A cluster made by initdb in work/name (checksums on, scram passwords), started on a free port,
    ``statements`` run, stopped. Returns (its data folder, the first column of ``value``'s first
    row, or None)."""
    data = work / name
    pwfile = work / f"pw-{name}"
    pwfile.write_text(PASSWORD + "\n")
    shutil.chown(pwfile, "postgres")
    proc.run([_pg("initdb"), "-D", str(data), "-U", "postgres", "-k", "--auth=scram-sha-256", f"--pwfile={pwfile}"],
             user="postgres", timeout=120)
    port = _free_port()
    proc.run([_pg("pg_ctl"), "start", "-w", "-D", str(data), "-l", str(work / f"{name}.log"),
              "-o", f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="],
             user="postgres", timeout=60)
    got = None
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=PASSWORD, dbname="postgres",
                             autocommit=True) as c:
            for statement in statements:
                c.execute(statement)
            if value is not None:
                got = c.execute(value).fetchone()[0]
    finally:
        proc.run([_pg("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"], user="postgres", timeout=60)
    return data, got


@pytest.fixture(scope="module")
def small_cluster(work) -> Path:
    """A stopped cluster with a table of 5 rows, laid out like Debian's (no config files in it)."""
    data, _ = stopped_cluster(work, "small", ["create table t (id int primary key, v text)",
                                              "insert into t select g, 'row ' || g from generate_series(1, 5) g"])
    for f in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        (data / f).unlink()
    return data


@pytest.fixture(scope="module")
def backup_scenario(work):
    """A base backup of a running source, archived WAL after it, and an LSN target in between.

    Rows 1..30 are committed before the target, rows 31..37 after it (in the same archived
    segment); the source's own postgresql.conf (copied into the backup) archives with cp.
    """
    src, base, archive = work / "source", work / "base", work / "archive"
    archive.mkdir()
    shutil.chown(archive, "postgres", "postgres")
    pwfile = work / "pw2"
    pwfile.write_text(PASSWORD + "\n")
    shutil.chown(pwfile, "postgres")
    proc.run([_pg("initdb"), "-D", str(src), "-U", "postgres", "-k", "--auth=scram-sha-256", f"--pwfile={pwfile}"],
             user="postgres", timeout=120)
    port = _free_port()
    with open(src / "postgresql.conf", "a") as f:
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                f"wal_level = replica\narchive_mode = on\narchive_command = 'cp %p {archive}/%f'\n")
    proc.run([_pg("pg_ctl"), "start", "-w", "-D", str(src), "-l", str(work / "source.log")], user="postgres",
             timeout=60)
    env = {"PGPASSWORD": PASSWORD}
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", password=PASSWORD, dbname="postgres",
                             autocommit=True) as c:
            c.execute("create table t (id int primary key, v text)")
            proc.run([_pg("pg_basebackup"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-D", str(base),
                      "-X", "stream", "-c", "fast"], user="postgres", env=env, timeout=120)
            c.execute(f"insert into t select g, 'before' from generate_series(1, {ROWS_BEFORE_TARGET}) g")
            c.execute("checkpoint")
            target = c.execute("select pg_current_wal_insert_lsn()::text").fetchone()[0]
            c.execute(f"insert into t select g, 'after' from generate_series({ROWS_BEFORE_TARGET + 1}, "
                      f"{ROWS_BEFORE_TARGET + ROWS_AFTER_TARGET}) g")
            c.execute("select pg_switch_wal()")
            want = c.execute("select pg_walfile_name(%s::pg_lsn)", (target,)).fetchone()[0]
            deadline = time.monotonic() + 60
            while (c.execute("select last_archived_wal from pg_stat_archiver").fetchone()[0] or "") < want:
                assert time.monotonic() < deadline, "the source did not archive the target's segment"
                time.sleep(0.2)
    finally:
        proc.run([_pg("pg_ctl"), "stop", "-D", str(src), "-m", "fast", "-w"], user="postgres", timeout=60)
    assert (archive / want).exists()
    return {"base": base, "archive": archive, "target": target}


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(settings):
    """Every container this test process made is gone at the end."""
    yield
    engine = engine_of(settings["podman"])
    res = engine.run(["ps", "-a", "-q", "--filter", f"label=dbops.pid={os.getpid()}"])
    assert res.stdout.strip() == "", f"containers left behind: {res.stdout}"


RUNTIMES = ["podman", "none"]


def _state(data: Path) -> str:
    return controldata.read(str(data), user="postgres").state


@pytest.mark.parametrize("engine", RUNTIMES)
def test_start_query_stop(engine, settings, small_cluster, work):
    data = copy_cluster(small_cluster, work / f"start-{engine}")
    rt = open_runtime(settings[engine])
    with rt.start(InstanceSpec(data_dir=data, port=_free_port(), name=f"start-{engine}")) as inst:
        assert isinstance(inst, ContainerInstance if engine == "podman" else LocalInstance)
        inst.wait_ready(60)
        assert inst.is_running()
        # no password: the generated pg_hba.conf trusts loopback (the cluster itself wants scram)
        with conn.session(inst.node()) as c:
            assert conn.rows(c, "select id, v from t order by id") == [(i, f"row {i}") for i in range(1, 6)]
            c.execute("insert into t values (6, 'written by the throwaway')")
        out = inst.run_tool(["psql", "-Atc", "select count(*) from t"]).stdout
        assert out.strip() == "6"
        if engine == "podman":  # runtime.shm_size: the statistics of a million tables fit
            shm = inst.run_tool(["/bin/df", "-k", "--output=size", "/dev/shm"]).stdout.split()
            assert shm[-1] == str(1024 * 1024), shm
        inst.stop("fast", timeout=60)
        # stop() returns once the server is down and its folder final (a container may not be reported
        # stopped yet); a tool right after it runs in a fresh one-shot environment (pg_checksums needs
        # the server stopped)
        assert _state(data) == "shut down" and not (data / "postmaster.pid").exists()
        res = inst.run_tool(["pg_checksums", "--check", "-D", inst.data_path])
        assert "Bad checksums:  0" in res.stdout
        # podman with the host's root: a one-shot tool runs on the host (no container whose exit would
        # sync the file system), as the folder's owner, the container's paths given as the host's
        seen = inst.run_tool(["/bin/sh", "-c", 'echo "$PGDATA $(id -u)"']).stdout.split()
        assert seen == [str(data.resolve()), str(data.stat().st_uid)]
        assert not inst.is_running()
        assert "database system is shut down" in inst.logs(10)
    assert not (data / "postmaster.pid").exists()


def _container_state(settings, name: str) -> str:
    """'running', 'exited', ... as the engine sees the container; '' once it is gone."""
    res = engine_of(settings["podman"]).run(["inspect", "--format", "{{.State.Status}}", name], check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def test_a_stopped_server_keeps_its_container_until_removed(settings, small_cluster, work):
    """The container outlives its server (its exit, the rootfs overlay's unmount, syncs the file system
    under podman's run root): stop() returns with the container still up, postgres's exit status read,
    and only remove() ends it."""
    data = copy_cluster(small_cluster, work / "kept")
    with open_runtime(settings["podman"]).start(InstanceSpec(data_dir=data, port=_free_port(), name="kept")) as inst:
        inst.wait_ready(60)
        inst.stop("fast", timeout=60)
        assert _state(data) == "shut down" and not (data / "postmaster.pid").exists()
        assert _container_state(settings, inst.name) == "running"
        assert (inst.run_dir / container.SERVER_EXIT).read_text().strip() == "0"  # postgres's own status
        assert not inst.is_running() and inst.ended_by() is None
        assert "database system is shut down" in inst.logs(10)
        res = inst.run_tool(["pg_checksums", "--check", "-D", inst.data_path])
        assert "Bad checksums:  0" in res.stdout
        inst.stop("fast", timeout=60)  # stopped already: nothing to do, no error
        inst.remove()
        assert _container_state(settings, inst.name) == ""
        assert not inst.run_dir.exists()


def kill_postmaster(settings, inst) -> None:
    """SIGKILL to the container's postmaster (as the OOM killer sends it), found as its first process's
    one child (the host's pids)."""
    first = engine_of(settings["podman"]).run(["inspect", "--format", "{{.State.Pid}}", inst.name]).stdout.strip()
    postmaster = Path(f"/proc/{first}/task/{first}/children").read_text().split()
    assert len(postmaster) == 1
    os.kill(int(postmaster[0]), signal.SIGKILL)


def test_a_killed_server_is_reported_while_its_container_stays(settings, small_cluster, work):
    """postgres killed with SIGKILL (as by the OOM killer): status 137 is reported as that, although the
    container lives on; a stop then has nothing to stop."""
    data = copy_cluster(small_cluster, work / "killed-server")
    spec = InstanceSpec(data_dir=data, port=_free_port(), name="killed-server")
    with open_runtime(settings["podman"]).start(spec) as inst:
        inst.wait_ready(60)
        assert inst.is_running() and inst.ended_by() is None
        kill_postmaster(settings, inst)
        deadline = time.monotonic() + 60
        while inst.is_running():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _container_state(settings, inst.name) == "running"
        assert (inst.run_dir / container.SERVER_EXIT).read_text().strip() == "137"
        assert "status 137" in (inst.ended_by() or "") and "terminated by signal 9" in inst.ended_by()
        inst.stop("fast", timeout=60)
    assert _container_state(settings, inst.name) == ""
    assert _state(data) == "in production"  # never shut down


def test_a_server_ending_on_a_full_filesystem_is_seen_at_once(settings, small_cluster, work):
    """The run folder's filesystem full when postgres ends (the scratch disk filled by another process):
    its status still reaches the run folder and is_running() turns false at once, rather than
    after the start timeout (a validation that hung for 600 s in CI, 2026-12-03)."""
    size = sum(f.stat().st_size for f in small_cluster.rglob("*") if f.is_file())
    with tmpfs(work / "full-fs", size + 64 * 2**20) as mnt:
        data = copy_cluster(small_cluster, mnt / "data")
        with open_runtime(settings["podman"]).start(InstanceSpec(data_dir=data, port=_free_port(),
                                                                 name="full-fs")) as inst:
            inst.wait_ready(60)
            assert inst.run_dir.parent == mnt  # the status file is on the filesystem that fills up
            fill_up(mnt / "ballast")
            assert shutil.disk_usage(mnt).free < 4096
            kill_postmaster(settings, inst)
            deadline = time.monotonic() + 60
            while inst.is_running():
                assert time.monotonic() < deadline, "postgres's end on a full filesystem went unseen"
                time.sleep(0.1)
            assert (inst.run_dir / container.SERVER_EXIT).read_text().strip() == "137"
            assert "status 137" in (inst.ended_by() or "")
            with pytest.raises(PostgresError, match="exited before accepting connections"):
                inst.wait_ready(30)


def test_a_smart_stop_waits_for_the_session_and_reads_the_status(settings, small_cluster, work):
    """smart (TERM, passed on by the container's first process) waits for the open session; the stop
    ends once it closed, with status 0, the container still there."""
    data = copy_cluster(small_cluster, work / "smart")
    spec = InstanceSpec(data_dir=data, port=_free_port(), name="smart")
    with open_runtime(settings["podman"]).start(spec) as inst:
        inst.wait_ready(60)
        with conn.session(inst.node()) as c:
            with pytest.raises(PostgresError) as ei:
                inst.stop("smart", timeout=3)  # the session holds it
            assert "did not stop (smart) within 3 s" in ei.value.message
            assert inst.is_running()  # a timed-out stop leaves it running
            assert conn.scalar(c, "select 1") == 1
        inst.stop("smart", timeout=60)
        assert not inst.is_running() and _state(data) == "shut down"
        assert _container_state(settings, inst.name) == "running"
    assert _container_state(settings, inst.name) == ""


def paused_recovery(data: Path, wal: Path, name: str, target: str, **kw) -> InstanceSpec:
    """The spec of a server recovering ``data`` from ``wal`` to ``target``, paused there (recovery.signal made)."""
    (data / "recovery.signal").touch()
    shutil.chown(data / "recovery.signal", "postgres", "postgres")
    return InstanceSpec(data_dir=data, port=_free_port(), wal_dir=wal, name=name, **kw,
                        settings={"recovery_target_lsn": target, "recovery_target_action": "pause",
                                  "hot_standby": "on"})


def wait_for(inst, c, query: str, want: object, timeout: float = 60) -> None:
    """Poll ``query`` on connection ``c`` until it returns ``want`` (the server's log when it never does)."""
    deadline = time.monotonic() + timeout
    while conn.scalar(c, query) != want:
        assert time.monotonic() < deadline, inst.logs(20)
        time.sleep(0.1)


@pytest.mark.parametrize("engine", RUNTIMES)
def test_recovery_to_lsn_then_stop_in_recovery(engine, settings, backup_scenario, work):
    data = copy_cluster(backup_scenario["base"], work / f"recover-{engine}")
    spec = paused_recovery(data, backup_scenario["archive"], f"recover-{engine}", backup_scenario["target"])
    with open_runtime(settings[engine]).start(spec) as inst:
        inst.wait_ready(120)
        with conn.session(inst.node()) as c:
            wait_for(inst, c, "select pg_get_wal_replay_pause_state()", "paused")
            assert conn.scalar(c, "select pg_is_in_recovery()") is True
            assert conn.rows(c, "select v, count(*) from t group by v") == [("before", ROWS_BEFORE_TARGET)]
            # the source's archive_command never ran here (it would have copied into the archive)
            assert conn.scalar(c, "show archive_mode") == "off"
        logs = inst.logs(200)
        assert "restored log file" in logs and "recovery stopping" in logs
        inst.stop("fast", timeout=60)
    assert _state(data) == "shut down in recovery"


@pytest.mark.parametrize("engine", RUNTIMES)
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_removed_when_the_block_raises(engine, exc, settings, small_cluster, work):
    data = copy_cluster(small_cluster, work / f"raise-{engine}-{exc.__name__}")
    rt = open_runtime(settings[engine])
    with pytest.raises(exc):
        with rt.start(InstanceSpec(data_dir=data, port=_free_port(), name="raise")) as inst:
            inst.wait_ready(60)
            run_dir = inst.run_dir
            raise exc()
    assert not inst.is_running()
    assert not run_dir.exists()
    if engine == "podman":
        res = engine_of(settings[engine]).run(["ps", "-a", "-q", "--filter", f"name={inst.name}"])
        assert res.stdout.strip() == ""
    inst.remove()  # idempotent


@pytest.mark.parametrize("engine", RUNTIMES)
def test_start_failure_reports_the_server_log(engine, settings, small_cluster, work):
    data = copy_cluster(small_cluster, work / f"fail-{engine}")
    spec = InstanceSpec(data_dir=data, port=_free_port(), name="fail", settings={"shared_buffers": "nonsense"})
    with open_runtime(settings[engine]).start(spec) as inst:
        with pytest.raises(PostgresError) as ei:
            inst.wait_ready(30)
    assert "exited before accepting connections" in ei.value.message
    assert "shared_buffers" in (ei.value.detail or "")


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dbops.config import RuntimeSettings
    from dbops.runtime import InstanceSpec, open_runtime
    rt = open_runtime(RuntimeSettings(engine="podman", rootfs="/", containers_conf=sys.argv[1]))
    inst = rt.start(InstanceSpec(data_dir=Path(sys.argv[2]), port=int(sys.argv[3]), name="killed"))
    inst.wait_ready(60)
    print(inst.name, flush=True)
    time.sleep(600)
""")


def _killed_run(podman: RuntimeSettings, data: Path) -> str:
    """Start an instance in a child process, SIGKILL the child, return the container left behind."""
    child = proc.spawn([sys.executable, "-c", CHILD, podman.containers_conf, str(data), str(_free_port())],
                       stdout=subprocess.PIPE)
    try:
        name = child.stdout.readline().decode().strip()
        assert name.startswith("dbops-killed-"), name
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    return name


def test_cleanup_stale_after_a_killed_run(settings, small_cluster, work):
    podman = settings["podman"]
    engine = engine_of(podman)

    def running(name: str) -> bool:
        res = engine.run(["inspect", "--format", "{{.State.Running}}", name], check=False)
        return res.stdout.strip() == "true"

    live_data = copy_cluster(small_cluster, work / "live")
    with open_runtime(podman).start(InstanceSpec(data_dir=live_data, port=_free_port(), name="live")) as live:
        data = copy_cluster(small_cluster, work / "killed")
        name = _killed_run(podman, data)
        assert running(name)
        # the killed run's container goes; this process's (alive) one stays
        removed = cleanup_stale(engine)  # may also hold other dead runs' containers on a shared host
        assert name in removed and live.name not in removed
        assert engine.run(["ps", "-a", "-q", "--filter", f"name={name}"]).stdout.strip() == ""
        assert live.is_running()
    # the killed server was stopped by force: its data folder was not shut down cleanly
    assert _state(data) == "in production"

    # and the next run cleans up by itself when it starts its first instance
    data2 = copy_cluster(small_cluster, work / "killed2")
    name2 = _killed_run(podman, data2)
    assert running(name2)
    next_data = copy_cluster(small_cluster, work / "next")
    with open_runtime(podman).start(InstanceSpec(data_dir=next_data, port=_free_port(), name="next")):
        assert engine.run(["ps", "-a", "-q", "--filter", f"name={name2}"]).stdout.strip() == ""

    # or beside other work before its first start (a backup does it beside its download), once
    data3 = copy_cluster(small_cluster, work / "killed3")
    name3 = _killed_run(podman, data3)
    assert running(name3)
    rt = open_runtime(podman)
    rt.prepare()
    assert engine.run(["ps", "-a", "-q", "--filter", f"name={name3}"]).stdout.strip() == ""


TOOLS = ("postgres", "psql", "pg_checksums", "pg_amcheck")


def _image_tar(tar_path: Path) -> None:
    """A minimal image root: PostgreSQL's bin/lib/share folders, their libraries, sh, cp, sleep, C.UTF-8.

    It has no /etc/passwd and no postgres user: the server runs under the data folder's numeric uid,
    as it must with any image whose postgres uid differs from the host's.
    """
    bindir = binaries.bindir()
    sharedir = proc.run([os.path.join(bindir, "pg_config"), "--sharedir"]).stdout.strip()
    elves = [os.path.join(bindir, t) for t in TOOLS] + ["/usr/bin/cp", "/usr/bin/dash", "/usr/bin/sleep"]
    deps: set[str] = set()
    for line in proc.run(["ldd", *elves]).stdout.splitlines():
        parts = line.split()  # "libz.so.1 => /lib/.../libz.so.1 (0x...)", "/lib64/ld-linux... (0x...)", "file:"
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0] if parts else ""
        if path.startswith("/") and not path.endswith(":"):
            deps.add(path)
    with tarfile.open(tar_path, "w") as tar:
        for link in ("/bin", "/lib", "/lib64", "/sbin"):
            if os.path.islink(link):
                tar.add(link, arcname=link[1:], recursive=False)
        # the cluster's locale (C.UTF-8) must exist in the image too, or the server refuses to start
        for tree in (str(Path(bindir).parent), sharedir, "/usr/share/zoneinfo", "/usr/lib/locale/C.utf8"):
            tar.add(tree, arcname=tree[1:])
        seen: set[str] = set()
        todo = [*deps, "/usr/bin/cp", "/usr/bin/sh", "/usr/bin/dash", "/usr/bin/sleep"]
        while todo:
            p = todo.pop()
            p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))  # /lib -> /usr/lib
            if p in seen:
                continue
            seen.add(p)
            tar.add(p, arcname=p[1:], recursive=False)
            if os.path.islink(p):
                todo.append(os.path.join(os.path.dirname(p), os.readlink(p)))


@pytest.fixture(scope="module")
def image(settings, work):
    """A local image (podman import) standing in for postgres:15, which cannot be pulled here."""
    engine = engine_of(settings["podman"])
    tag = f"localhost/dbops-test-pg:{os.getpid()}"
    tar_path = work / "image.tar"
    _image_tar(tar_path)
    bindir = binaries.bindir()
    engine.run(["import", "--change", f"ENV=PATH={bindir}:/usr/bin:/bin", str(tar_path), tag], timeout=300)
    tar_path.unlink()
    yield tag
    engine.run(["rmi", "-f", tag], check=False)


def test_image_mode_recovery(settings, image, backup_scenario, work):
    """The production path (an image, entrypoint bypassed, numeric uid) with podman."""
    rs = RuntimeSettings(engine="podman", image=image, containers_conf=settings["podman"].containers_conf)
    data = copy_cluster(backup_scenario["base"], work / "recover-image")
    (data / "recovery.signal").touch()
    shutil.chown(data / "recovery.signal", "postgres", "postgres")
    spec = InstanceSpec(
        data_dir=data, port=_free_port(), wal_dir=backup_scenario["archive"], name="image",
        settings={"recovery_target_lsn": backup_scenario["target"], "recovery_target_action": "pause"},
    )
    with open_runtime(rs).start(spec) as inst:
        inst.wait_ready(120)
        with conn.session(inst.node()) as c:
            deadline = time.monotonic() + 60
            while conn.scalar(c, "select pg_get_wal_replay_pause_state()") != "paused":
                assert time.monotonic() < deadline, inst.logs(20)
                time.sleep(0.2)
            assert conn.scalar(c, "select count(*) from t") == ROWS_BEFORE_TARGET
        assert inst.run_tool(["psql", "-Atc", "select pg_is_in_recovery()"]).stdout.strip() == "t"
        inst.stop("fast", timeout=60)
        assert _container_state(settings, inst.name) == "running"  # its first process (the image's sh) stays
        res = inst.run_tool(["pg_checksums", "--check", "-D", inst.data_path])
        assert "Bad checksums:  0" in res.stdout
        # an image's programs are not the host's: a one-shot tool still runs in a container
        assert inst.run_tool(["sh", "-c", 'echo "$PGDATA"']).stdout.strip() == "/data"
    assert _state(data) == "shut down in recovery"
    assert "ran postgres --version" in probe(rs)


def test_probe(settings):
    assert "ran postgres --version" in probe(settings["podman"])
    assert "PostgreSQL) 15" in probe(settings["podman"])
    assert "engine none" in probe(settings["none"])


@pytest.mark.parametrize("engine", RUNTIMES)
def test_no_other_local_user_gets_in_and_no_secret_in_the_environment(engine, settings, small_cluster, work,
                                                                       monkeypatch):
    """Issue #13 item 10: a throwaway copy of production trusts no TCP login, its socket sits in a
    0700 folder, and the server's environment carries none of dbops' secrets."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak-me-Qx81")
    monkeypatch.setenv("PGPASSWORD", "leak-me-too-Qx81")
    data = copy_cluster(small_cluster, work / f"isolated-{engine}")
    port = _free_port()
    with open_runtime(settings[engine]).start(InstanceSpec(data_dir=data, port=port, name=f"iso-{engine}")) as inst:
        inst.wait_ready(60)
        sock_dir = Path(inst.host)
        assert sock_dir.is_dir() and (sock_dir.stat().st_mode & 0o777) == 0o700
        psql = _pg("psql")
        for host in ("127.0.0.1", str(sock_dir)):  # as another local user: neither TCP nor the socket
            r = proc.run(["runuser", "-u", "nobody", "--", psql, "-h", host, "-p", str(inst.port), "-U", "postgres",
                          "-d", "postgres", "-Atc", "select 1"], check=False, timeout=30,
                         env={"PGCONNECT_TIMEOUT": "3"})
            assert r.returncode != 0 and r.stdout.strip() != "1", (host, r)
        with conn.session(inst.node()) as c:  # dbops itself gets in, through the socket
            c.execute("create temp table e (line text)")
            c.execute("copy e from program 'env'")
            env = [row[0] for row in c.execute("select line from e").fetchall()]
        assert env and not [line for line in env if "leak-me" in line], env
        assert not [line for line in env if line.startswith(("AWS_", "PGPASSWORD="))], env
