"""The command lines the container runtime builds, for docker + image (the production path that
cannot run here: no Docker engine), plus the settings every runtime shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dbops.errors import ConfigError, UsageError
from dbops.runtime import base, instance, serverconf, walfolder
from dbops.runtime.base import InstanceSpec, Owner
from dbops.runtime.container import KEEPER, ContainerRuntime
from dbops.runtime.engine import (
    CONTAINERS_CONF,
    Engine,
    creator_alive,
    creator_labels,
    ensure_containers_conf,
    process_start,
)

OWNER = Owner(999, 998)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    data, wal, run = tmp_path / "data", tmp_path / "wal", tmp_path / "run"
    for d in (data, wal, run):
        d.mkdir()
    (data / "postgresql.conf").write_text("")
    return data, wal, run


def _server_argv(rt: ContainerRuntime, spec: InstanceSpec, run: Path) -> list[str]:
    settings = serverconf.server_settings(spec, run, wal_path=base.WAL_PATH, run_path=base.RUN_PATH, owner=OWNER,
                                          socket_path=base.SOCKET_PATH, port=rt.inner_port(spec))
    return rt.server_argv(spec, name="dbops-x-1", owner=OWNER, run_dir=run, settings=settings,
                          labels=creator_labels("1", "x"))


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_docker_image_server_argv(dirs):
    data, wal, run = dirs
    rt = ContainerRuntime(Engine("docker"), image="postgres:15", extra_args=("--shm-size", "256m"))
    spec = InstanceSpec(data_dir=data, port=5433, wal_dir=wal, settings={"recovery_target_lsn": "0/3000060"})
    argv = _server_argv(rt, spec, run)

    assert argv[:4] == ["run", "-d", "--name", "dbops-x-1"]
    assert "--rootfs" not in argv
    assert _pairs(argv, "--user") == ["999:998"]
    assert _pairs(argv, "--network") == ["host"] and "-p" not in argv
    assert _pairs(argv, "-v") == [f"{data}:/data", f"{run}:/dbops-run", f"{run}:/dbops-sock", f"{wal}:/wal:ro"]
    labels = _pairs(argv, "--label")
    assert "dbops=1" in labels and f"dbops.pid={os.getpid()}" in labels and "dbops.run=1" in labels
    # extra args before the image; the image's entrypoint script is bypassed: postgres runs under the
    # keeper (the image's sh), which keeps the container once postgres exited
    i = argv.index("--entrypoint")
    assert argv[i - 2:i] == ["--shm-size", "256m"]
    assert argv[i + 1:i + 8] == ["/bin/sh", "postgres:15", "-c", KEEPER, "dbops-server", "postgres", "-D"]
    assert _pairs(argv, "--stop-signal") == ["SIGUSR2"]  # `docker stop` by hand: a fast stop, the container ends
    settings = _pairs(argv, "-c")
    # no TCP at all: a Unix socket in a private folder, reachable only by its owner (and root)
    assert "port=5433" in settings and "listen_addresses=" in settings
    assert "unix_socket_directories=/dbops-sock" in settings and "unix_socket_permissions=0700" in settings
    assert 'restore_command=cp /wal/%f "%p"' in settings
    assert "recovery_target_lsn=0/3000060" in settings
    assert "archive_mode=off" in settings and "primary_conninfo=" in settings
    assert "hba_file=/dbops-run/pg_hba.conf" in settings
    assert not any(s.startswith("config_file=") for s in settings)  # the data folder has its own


def test_shm_size_default_and_bad_value(dirs):
    data, wal, run = dirs
    argv = _server_argv(ContainerRuntime(Engine("podman"), rootfs="/"), InstanceSpec(data_dir=data, port=5433), run)
    assert _pairs(argv, "--shm-size") == ["1g"]  # PostgreSQL 15's statistics live there: 64 MB is too small
    argv = _server_argv(ContainerRuntime(Engine("docker"), image="p", shm_size="512M"), InstanceSpec(data_dir=data,
                                                                                              port=5433), run)
    assert _pairs(argv, "--shm-size") == ["512m"]
    for bad in ("", "0", "1 g", "1t", "-5m", "1g; rm"):
        with pytest.raises(ConfigError, match="shm_size"):
            ContainerRuntime(Engine("podman"), rootfs="/", shm_size=bad)


def test_docker_publish_network(dirs):
    data, wal, run = dirs
    rt = ContainerRuntime(Engine("docker"), image="postgres:15", network="publish")
    argv = _server_argv(rt, InstanceSpec(data_dir=data, port=6001, wal_dir=wal), run)
    assert "-p" not in argv and "--network" not in argv
    settings = _pairs(argv, "-c")
    assert "port=5432" in settings and "listen_addresses=" in settings
    hba = (run / "pg_hba.conf").read_text()
    assert "local all all trust" in hba and "host" not in hba.replace("# dbops", "")


def test_docker_image_tool_and_exec_argv(dirs):
    data, wal, run = dirs
    rt = ContainerRuntime(Engine("docker"), image="registry.example/pg:15", bin_dir="/usr/lib/postgresql/15/bin")
    spec = InstanceSpec(data_dir=data, port=5433, wal_dir=wal)
    tool = rt.tool_argv(["pg_checksums", "--check"], spec, name="t1", owner=OWNER, run_dir=run,
                        env_names=["PGDATA", "PGPASSWORD"], labels={"dbops": "1"})
    assert tool[:4] == ["run", "--rm", "--name", "t1"]
    assert _pairs(tool, "-e") == ["PGDATA", "PGPASSWORD"]  # names only: values never on a command line
    i = tool.index("--entrypoint")
    assert tool[i + 1:] == ["/usr/lib/postgresql/15/bin/pg_checksums", "registry.example/pg:15", "--check"]
    ex = rt.exec_argv(["psql", "-Atc", "select 1"], container="c1", owner=OWNER, env_names=["PGPORT"])
    assert ex == ["exec", "--user", "999:998", "-e", "PGPORT", "c1", "/usr/lib/postgresql/15/bin/psql",
                  "-Atc", "select 1"]


def test_podman_rootfs_payload(dirs):
    data, wal, run = dirs
    rt = ContainerRuntime(Engine("podman"), rootfs="/", bin_dir="/usr/lib/postgresql/15/bin")
    argv = _server_argv(rt, InstanceSpec(data_dir=data, port=5433), run)
    i = argv.index("--rootfs")
    assert argv[i + 1:i + 8] == ["/:O", "/bin/sh", "-c", KEEPER, "dbops-server",
                                 "/usr/lib/postgresql/15/bin/postgres", "-D"]
    assert "--entrypoint" not in argv


def test_invalid_combinations():
    with pytest.raises(ConfigError):
        ContainerRuntime(Engine("docker"), rootfs="/")
    with pytest.raises(ConfigError):
        ContainerRuntime(Engine("podman"), image="postgres:15", rootfs="/")
    with pytest.raises(ConfigError):
        ContainerRuntime(Engine("podman"))
    with pytest.raises(ConfigError):
        ContainerRuntime(Engine("podman"), image="postgres:15", network="bridge")
    with pytest.raises(ConfigError):
        Engine("lxc")


def test_spec_refuses_runtime_owned_settings(tmp_path):
    with pytest.raises(UsageError):
        InstanceSpec(data_dir=tmp_path, port=5433, settings={"port": "1"})
    with pytest.raises(UsageError):
        InstanceSpec(data_dir=tmp_path, port=0)


def test_settings_for_a_data_folder_without_config_files(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir(), run.mkdir()
    spec = InstanceSpec(data_dir=data, port=5433, settings={"archive_mode": "on", "hot_standby": "on"})
    s = serverconf.server_settings(spec, run, wal_path=None, run_path="/r", owner=OWNER, socket_path="/s")
    assert s["archive_mode"] == "on"  # the caller may override the safe defaults
    assert "restore_command" not in s  # no WAL folder
    assert s["config_file"] == "/r/postgresql.conf" and (run / "postgresql.conf").exists()
    assert s["ident_file"] == "/r/pg_ident.conf" and (run / "pg_ident.conf").read_text() == ""
    assert s["unix_socket_directories"] == "/s" and s["listen_addresses"] == "" and s["logging_collector"] == "off"
    no_trust = InstanceSpec(data_dir=data, port=5433, trust_local=False)
    assert "hba_file" not in serverconf.server_settings(no_trust, run, wal_path=None, run_path="/r", owner=OWNER,
                                                        socket_path="/s")


def test_a_long_run_folder_gets_a_short_private_socket_folder(tmp_path):
    short, created = serverconf.socket_dir(tmp_path, Owner(os.getuid(), os.getgid()))
    assert short == tmp_path.resolve() and not created
    deep = tmp_path / ("x" * 100)
    deep.mkdir()
    sock, created = serverconf.socket_dir(deep, Owner(os.getuid(), os.getgid()))
    try:
        assert created and len(str(sock)) <= serverconf.SOCKET_PATH_MAX and (sock.stat().st_mode & 0o777) == 0o700
    finally:
        serverconf.remove_run_dir(deep, False, sock, created)
    assert not sock.exists()


def test_restore_command_quotes_host_paths():
    assert walfolder.restore_command("/wal") == 'cp /wal/%f "%p"'
    assert walfolder.restore_command("/tmp/my wal") == "cp '/tmp/my wal/'%f \"%p\""


def test_restore_command_declines_what_is_linked_into_pg_wal(dirs):
    assert walfolder.restore_command("/wal", linked=True) == 'test -f pg_wal/%f && exit 1; cp /wal/%f "%p"'
    data, wal, run = dirs
    spec = InstanceSpec(data_dir=data, port=5433, wal_dir=wal, wal_linked=True)
    settings = serverconf.server_settings(spec, run, wal_path=base.WAL_PATH, run_path=base.RUN_PATH, owner=OWNER,
                                          socket_path=base.SOCKET_PATH)
    assert settings["restore_command"] == 'test -f pg_wal/%f && exit 1; cp /wal/%f "%p"'


def test_link_wal_links_every_file_replacing_pg_wal_copies(dirs):
    data, wal, _ = dirs
    (data / "pg_wal").mkdir()
    (data / "pg_wal" / "000000010000000000000003").write_bytes(b"partial")  # the snapshot's own, replaced
    (data / "pg_wal" / "000000010000000000000002").write_bytes(b"older")  # not fetched: left alone
    for name, body in (("000000010000000000000003", b"seg3"), ("000000010000000000000004", b"seg4"),
                       ("00000002.history", b"1\t0/3000000\tno recovery target specified\n")):
        (wal / name).write_bytes(body)
    assert walfolder.link_wal(wal, data) is True
    for f in wal.iterdir():
        linked = data / "pg_wal" / f.name
        assert linked.read_bytes() == f.read_bytes() and os.path.samefile(linked, f)
    assert (data / "pg_wal" / "000000010000000000000002").read_bytes() == b"older"
    assert not [p for p in (data / "pg_wal").iterdir() if p.name.startswith(walfolder.LINK_PREFIX)]


def test_link_wal_declines_a_pg_wal_it_cannot_link_into(dirs, tmp_path):
    data, wal, _ = dirs
    (wal / "000000010000000000000003").write_bytes(b"seg3")
    assert walfolder.link_wal(wal, data) is False  # no pg_wal at all
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (data / "pg_wal").symlink_to(elsewhere)  # pg_wal on another volume: restore_command copies instead
    assert walfolder.link_wal(wal, data) is False
    assert list(elsewhere.iterdir()) == []


def test_setting_args_are_stable():
    assert serverconf.setting_args({"b": "2", "a": "x y"}) == ["-c", "a=x y", "-c", "b=2"]


def test_ensure_containers_conf_writes_once(tmp_path):
    p = tmp_path / "sub" / "containers.conf"
    assert ensure_containers_conf(p) == p
    assert p.read_text() == CONTAINERS_CONF
    assert 'cgroup_manager = "cgroupfs"' in CONTAINERS_CONF and 'runtime = "runc"' in CONTAINERS_CONF
    p.write_text("# mine\n")
    ensure_containers_conf(p)
    assert p.read_text() == "# mine\n"


def test_creator_alive_checks_pid_and_start_time():
    me = creator_labels("r", "n")
    assert creator_alive(me)
    assert not creator_alive({**me, "dbops.pid_start": str(int(process_start(os.getpid())) + 1)})  # pid reused
    assert not creator_alive({**me, "dbops.pid": "999999999"})
    assert not creator_alive({"dbops": "1"})


def test_pid_file_status(tmp_path):
    assert instance.pid_file_status(tmp_path) is None
    (tmp_path / "postmaster.pid").write_text("123\n/data\n1700000000\n5433\n\n127.0.0.1\n  1 2\nstandby \n")
    assert instance.pid_file_status(tmp_path) == "standby"
