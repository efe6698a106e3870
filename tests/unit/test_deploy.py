"""docker-compose.yml and deploy/ agree with each other, with the lab's configuration layout and with the CLI.

No Docker engine runs here, so nothing is started: the files are read, the dbops configurations
are parsed by dbops.config.parse, every command line is parsed by the real typer app (without
running it), and the cron line's lock-conflict path runs through a real sh and flock.
"""

from __future__ import annotations

import fcntl
import json
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from typer.main import get_command

from dbops import config as cfgmod
from dbops.lab import harness as lab
from dbops.lab import postgres as labpg
from dbops.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose" / "dbops.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG_MOUNT = "/etc/dbops/dbops.yaml"
DBOPS_BIN = "/usr/local/bin/dbops"
METRICS_DIR = "/var/lib/node_exporter/textfile_collector"

# Commands the README documents that are not registered yet: their own options cannot be
# checked until they exist (global options always are). Anything else must be registered.
PLANNED_COMMANDS = {"restore", "failover", "status"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}: compose's forms.
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)|:?\?)?[^}]*\}")

# Where the compose configuration may differ from the lab's, key for key: secrets from the
# environment instead of files, and nodes controlled through Docker instead of a local pg_ctl.
NODE_KEYS_ONLY_IN_COMPOSE = {"password", "container"}
NODE_KEYS_ONLY_IN_LAB = {"passfile", "log_file"}  # log_file: pg_ctl -l for local nodes; containers log to the engine
STORAGE_KEYS_ONLY_IN_COMPOSE = {"access_key", "secret_key"}
# encryption: the lab makes its own key file; a compose user sets storage.encryption themselves
# (docs/encryption.md), since a key shipped in .env.example would be the same for everyone.
STORAGE_KEYS_ONLY_IN_LAB = {"credentials_file", "encryption"}

S3_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:GetBucketLocation"}


# --------------------------------------------------------------------------- helpers


def parse_cli(argv: list[str]) -> list[str]:
    """Parse `dbops ARGV` with the real app, running nothing; returns the command path.

    Global options are always checked. A command in PLANNED_COMMANDS that is not registered yet
    stops the walk there (its options are unknown); any other unknown command fails.
    """
    group = get_command(app)
    try:
        ctx = group.make_context("dbops", list(argv))
    except typer.TyperException as e:  # the vendored click's UsageError and friends
        pytest.fail(f"`dbops {shlex.join(argv)}`: {e}")
    path: list[str] = []
    cmd = group
    while hasattr(cmd, "commands"):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            break
        name = rest[0]
        if name not in cmd.commands:
            assert not path and name in PLANNED_COMMANDS, f"`dbops {shlex.join(argv)}`: no command {name!r}"
            return [name]
        cmd = cmd.commands[name]
        path.append(name)
        try:
            ctx = cmd.make_context(name, rest[1:], parent=ctx)
        except typer.TyperException as e:
            pytest.fail(f"`dbops {shlex.join(argv)}`: {e}")
    return path


def dbops_argv(argv: list[str]) -> list[str]:
    """The arguments after the dbops executable in a command line (which must name it)."""
    idx = [i for i, a in enumerate(argv) if Path(a).name == "dbops"]
    assert idx, f"no dbops in {argv}"
    assert argv[idx[0]] == DBOPS_BIN, f"use the absolute path {DBOPS_BIN}, not {argv[idx[0]]}"
    return argv[idx[0] + 1:]


def global_options(argv: list[str]) -> list[str]:
    """The options before the command (dbops's global options)."""
    out = []
    for a in argv:
        if not a.startswith("-") and (not out or out[-1] not in ("-c", "--config", "--log-format")):
            break
        out.append(a)
    return out


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def conf_settings(path: Path) -> dict[str, str]:
    """postgresql.conf-style `name = value` lines (comments and quotes removed)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if value.startswith("'"):
            value = value[1:value.index("'", 1)]
        else:
            value = value.split("#", 1)[0].strip()
        out[key.strip()] = value
    return out


def cron_jobs(path: Path) -> list[tuple[list[str], str, str]]:
    """The job lines of an /etc/cron.d file: [(five time fields, user, command)]."""
    jobs = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#") or re.match(r"^[A-Z_]+=", s):
            continue
        fields = s.split(None, 6)
        jobs.append((fields[:5], fields[5], fields[6]))
    return jobs


def cron_job(path: Path, command: str = "backup") -> tuple[list[str], str, str]:
    """The one job of an /etc/cron.d file that runs `dbops COMMAND`."""
    found = [j for j in cron_jobs(path)
             if parse_cli(dbops_argv(shlex.split(j[2].split("||", 1)[0].split(">", 1)[0])))[:len(command.split())]
             == command.split()]
    assert len(found) == 1, (command, found)
    return found[0]


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def config_vars(text: str) -> set[str]:
    """Variables a dbops configuration needs from the environment (those without a default)."""
    return {m.group(1) for m in cfgmod.ENV_RE.finditer(text) if m.group(2) is None}


def mounts(service: dict) -> dict[str, str]:
    """A service's bind mounts and volumes as {target: source}."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        out[parts[1]] = parts[0]
    return out


def published(service: dict) -> dict[int, int]:
    """{container port: host port} of a service's `ports`, which must bind 127.0.0.1 only."""
    out = {}
    for p in service.get("ports", []):
        ip, host, container = str(p).split(":")
        assert ip == "127.0.0.1", f"{p}: publish on loopback only"
        out[int(container)] = int(host)
    return out


def strings(value) -> list[str]:
    """Every string in a loaded YAML document (where compose interpolates; comments are gone)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def dockerfile_images(path: Path) -> list[str]:
    """Every image a Dockerfile builds from or copies out of (FROM, COPY --from), ARG defaults applied."""
    text = path.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    stages: set[str] = set()
    out = []
    for line in text.splitlines():
        m = re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            out.append(re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1)))
            if m.group(2):
                stages.add(m.group(2))
        m = re.match(r"^COPY\s+--from=(\S+)", line)
        if m and m.group(1) not in stages:
            out.append(m.group(1))
    return out


# A tag that names one release: MAJOR.MINOR.PATCH (27.5.1, 3.11.13; PostgreSQL's own releases are
# MAJOR.MINOR, 15.18), optionally with a variant (-slim-bookworm), or MinIO's RELEASE.<date>.
_RELEASE_TAG = re.compile(r"^(RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z|\d+\.\d+\.\d+(-[a-z0-9.-]+)?)$")
_PG_RELEASE_TAG = re.compile(r"^\d+\.\d+(-[a-z0-9.-]+)?$")
_PG_IMAGES = {"postgres", "dbops-postgres"}


def pinned(image: str) -> bool:
    """IMAGE:TAG with a release tag (never latest, never a series like postgres:15 or python:3.11), or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return False
    return bool((_PG_RELEASE_TAG if name.rsplit("/", 1)[-1] in _PG_IMAGES else _RELEASE_TAG).match(tag))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def compose_cfg() -> cfgmod.Config:
    return cfgmod.parse(yaml.safe_load(COMPOSE_CONFIG.read_text()), env=env_example(), path=str(COMPOSE_CONFIG))


def config_users(services: dict) -> dict[str, dict]:
    """The services that load deploy/compose/dbops.yaml (mounted at /etc/dbops/dbops.yaml)."""
    return {name: s for name, s in services.items()
            if (ROOT / mounts(s).get(CONFIG_MOUNT, "/nonexistent")).resolve() == COMPOSE_CONFIG.resolve()}


# --------------------------------------------------------------------------- docker-compose.yml


def test_compose_services_and_images(services):
    assert {"minio", "minio-setup", "pg1", "pg2", "dbops"} <= set(services)
    for name, s in services.items():
        if "build" in s:
            assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).is_file(), name
    assert services["dbops"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["pg1"]["build"]["dockerfile"] == "deploy/Dockerfile.postgres"
    assert services["pg2"]["image"] == services["pg1"]["image"]
    assert dockerfile_images(DEPLOY / "Dockerfile.postgres") == ["postgres:15.18-bookworm"]
    for name, s in services.items():
        for source in mounts(s).values():
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts {source}, which is missing"


def test_every_image_is_pinned_to_a_release(services, compose_cfg):
    """Compose, both Dockerfiles, the images dbops itself starts: a release tag, never `latest`."""
    for bad in ("minio/minio:latest", "minio/minio", "postgres:15", "postgres:15-bookworm", "python:3.11-slim",
                "docker:27-cli"):
        assert not pinned(bad), bad
    images = {f"compose {n}": s["image"] for n, s in services.items() if "image" in s}
    for df in ("Dockerfile", "Dockerfile.postgres"):
        for i, img in enumerate(dockerfile_images(DEPLOY / df)):
            images[f"{df} #{i}"] = img
    images["deploy/compose/dbops.yaml runtime.image"] = compose_cfg.runtime.image
    for where, img in images.items():
        assert pinned(img), f"{where}: {img} is not pinned to a release"
    # MinIO moved to quay.io (Docker Hub's minio/minio and minio/mc were removed); the last
    # community release of both.
    assert services["minio"]["image"] == "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
    assert services["minio-setup"]["image"] == "quay.io/minio/mc:RELEASE.2025-09-07T16-13-09Z"
    # Images built here carry the version they were built from.
    assert services["pg1"]["image"] == "dbops-postgres:" + dockerfile_images(DEPLOY / "Dockerfile.postgres")[0].split(
        ":")[1].split("-")[0]


def test_the_dbops_image_and_the_docs_agree_on_postgresql_majors():
    """One image per major (--build-arg PG_MAJOR); the majors it accepts are the ones the docs
    and `dbops check` call supported; locales for databases created with any of them."""
    text = (DEPLOY / "Dockerfile").read_text()
    accepted = re.search(r'case "\$PG_MAJOR" in ([0-9|]+)\)', text).group(1).split("|")
    assert accepted == ["13", "14", "15", "16", "17"]
    default = re.search(r"^ARG PG_MAJOR=(\d+)$", text, re.MULTILINE).group(1)
    assert default == "15" and "/usr/lib/postgresql/${PG_MAJOR}/bin" in text
    assert '"postgresql-$PG_MAJOR"' in text
    install = (ROOT / "docs" / "installation.md").read_text()
    assert f"PostgreSQL {accepted[0]} to {accepted[-1]}" in install
    assert "PG_MAJOR" in install
    check = (ROOT / "dbops" / "ops" / "check.py").read_text()
    assert f"130000 <= rep.version_num < {int(accepted[-1]) + 1}0000" in check
    assert "locales-all" in text  # a database created with en_US.UTF-8 (or any locale) can start


def test_every_config_variable_reaches_each_container_that_loads_the_config(services):
    users = config_users(services)
    assert {"pg1", "pg2", "dbops"} <= set(users)
    needed = config_vars(COMPOSE_CONFIG.read_text())
    assert {"POSTGRES_PASSWORD", "DBOPS_S3_ACCESS_KEY", "DBOPS_S3_SECRET_KEY"} <= needed
    for name, s in users.items():
        env = s.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        missing = needed - set(env)
        assert not missing, f"service {name} loads the dbops config but lacks {sorted(missing)}"


def test_compose_secrets_come_from_env_example_only(compose):
    required = {m.group(1) for s in strings(compose) for m in _COMPOSE_VAR.finditer(s) if not m.group(2)}
    example = env_example()
    assert required == set(example), "docker-compose.yml's ${VAR}s and .env.example must match"
    # No literal secret: every environment value that names a secret is an interpolation.
    for name, s in compose["services"].items():
        for key, value in (s.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", key):
                pattern = rf"\$\{{{re.escape(key)}(:\?[^}}]*)?\}}"
                assert re.fullmatch(pattern, str(value)), f"{name}.{key} must be ${{{key}}}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_compose_config_parses_and_names_the_compose_services(services, compose_cfg):
    cfg = compose_cfg
    users = config_users(services)
    for node in cfg.nodes:
        assert node.host in services, f"node {node.name}: host {node.host} is not a compose service"
        svc = services[node.host]
        env = svc["environment"]
        # The server listens on the node's port inside the container and is published on the
        # same port on the host's loopback, where the dbops service (host network) reaches it.
        assert int(env["PGPORT"]) == node.port
        assert published(svc) == {node.port: node.port}
        assert str(node.port) in svc["healthcheck"]["test"]
        assert node.controller == "container" and node.container.engine == "docker"
        assert node.container.name == svc["container_name"]
        assert mounts(svc)["/var/lib/postgresql/data"] and node.data_dir == "/var/lib/postgresql/data"
    primary, replica = cfg.nodes[0], cfg.nodes[1]
    assert "CLONE_FROM_HOST" not in services[primary.host]["environment"]
    assert services[replica.host]["environment"]["CLONE_FROM_HOST"] == primary.host
    assert int(services[replica.host]["environment"]["CLONE_FROM_PORT"]) == primary.port

    # Storage: the MinIO service, on the port it listens on (and publishes on loopback).
    ep = urlsplit(cfg.storage.endpoint)
    assert ep.hostname in services
    minio = services[ep.hostname]
    cmd = minio["command"]
    assert cmd[cmd.index("--address") + 1] == f":{ep.port}"
    assert published(minio)[ep.port] == ep.port
    setup = services["minio-setup"]
    assert setup["environment"]["S3_ENDPOINT"] == cfg.storage.endpoint
    assert setup["environment"]["S3_BUCKET"] == cfg.storage.bucket
    assert setup["depends_on"][ep.hostname]
    for name in users:
        if name != ep.hostname:
            assert services[name]["depends_on"]["minio-setup"]["condition"] == "service_completed_successfully"

    # The dbops service: same names and ports from the host's network, the Docker socket for
    # throwaway containers, and the scratch folder at the same path on both sides.
    dbops = services["dbops"]
    assert dbops["network_mode"] == "host"
    hosts = dict(h.split(":", 1) for h in dbops["extra_hosts"])
    assert hosts == {n: "127.0.0.1" for n in {ep.hostname, *(node.host for node in cfg.nodes)}}
    assert cfg.runtime.engine == "docker" and cfg.runtime.network == "host"
    assert cfg.runtime.image.startswith("postgres:15.") and pinned(cfg.runtime.image)
    dm = mounts(dbops)
    assert dm["/var/run/docker.sock"] == "/var/run/docker.sock"
    assert dm[cfg.backup.scratch_dir] == cfg.backup.scratch_dir
    assert dbops["environment"]["DBOPS_CONFIG"] == CONFIG_MOUNT
    # The WAL spool of archive_command lives on a volume of each PostgreSQL service.
    for node in cfg.nodes:
        assert cfg.archive.spool_dir in mounts(services[node.host])
    parse_cli(dbops["command"])


def test_compose_config_has_the_lab_layout(compose_cfg):
    nodes = [labpg.node("pg1", 15432, Path("/lab")), labpg.node("pg2", 15433, Path("/lab"))]
    lab_text = lab.config_yaml(Path("/lab"), {"s3": {"endpoint": "http://127.0.0.1:18333"}}, nodes, "podman")
    lab_raw = yaml.safe_load(lab_text)
    cfgmod.parse(lab_raw, env={})  # the reference is itself valid
    raw = yaml.safe_load(COMPOSE_CONFIG.read_text())

    assert list(raw) == list(lab_raw), "top-level keys (and their order) must match the lab's"
    lab_node, node_keys = set(lab_raw["nodes"][0]), set(raw["nodes"][0])
    assert all(set(n) == node_keys for n in raw["nodes"])
    assert node_keys - lab_node <= NODE_KEYS_ONLY_IN_COMPOSE, node_keys - lab_node
    assert lab_node - node_keys <= NODE_KEYS_ONLY_IN_LAB, lab_node - node_keys
    lab_st, st = set(lab_raw["storage"]), set(raw["storage"])
    assert st - lab_st == STORAGE_KEYS_ONLY_IN_COMPOSE
    assert lab_st - st == STORAGE_KEYS_ONLY_IN_LAB
    assert set(raw["archive"]) == set(lab_raw["archive"])
    assert set(raw["backup"]) == set(lab_raw["backup"])
    assert compose_cfg.compression == cfgmod.parse(lab_raw, env={}).compression


def test_compose_postgres_settings_come_from_deploy_postgresql_as_a_file(services):
    """No `-c` options (they outrank postgresql.auto.conf, so ALTER SYSTEM would not work): the
    servers read deploy/postgresql/dbops.conf, mounted where the image's include points."""
    include = (DEPLOY / "compose" / "include-dbops-conf.sh").read_text()
    target = re.search(r"include = '([^']+)'", include).group(1)
    dockerfile = (DEPLOY / "Dockerfile.postgres").read_text()
    assert "COPY deploy/compose/include-dbops-conf.sh /docker-entrypoint-initdb.d/" in dockerfile
    assert "dbops-include-conf.sh" in (DEPLOY / "compose" / "postgres-entrypoint.sh").read_text()
    for name in ("pg1", "pg2"):
        cmd = services[name]["command"]
        assert cmd == ["postgres"], f"{name}: settings belong in deploy/postgresql/dbops.conf, not {cmd}"
        assert f"./deploy/postgresql/dbops.conf:{target}:ro" in services[name]["volumes"]


def test_the_include_script_adds_the_line_once_and_alter_system_still_wins(pg_owned_dir):
    """Run the image's include script on a real PostgreSQL configuration, twice, then ask
    `postgres -C` which values win (it reads the files without starting a server)."""
    import os

    from dbops.pg import binaries

    tmp_path, as_pg = pg_owned_dir
    data = tmp_path / "data"
    subprocess.run([*as_pg, binaries.binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=120)
    script = (DEPLOY / "compose" / "include-dbops-conf.sh").read_text()
    conf_copy = tmp_path / "dbops.conf"
    conf_copy.write_text((DEPLOY / "postgresql" / "dbops.conf").read_text())
    script = script.replace("/etc/postgresql/dbops.conf", str(conf_copy))
    for _ in range(2):
        subprocess.run([*as_pg, "sh", "-c", script], env={**os.environ, "PGDATA": str(data)}, check=True, timeout=30)
    assert (data / "postgresql.conf").read_text().count(f"include = '{conf_copy}'") == 1

    def setting(name: str) -> str:
        return subprocess.run([*as_pg, binaries.binary("postgres"), "-D", str(data), "-C", name], check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()

    conf = conf_settings(DEPLOY / "postgresql" / "dbops.conf")
    for key in ("archive_mode", "wal_log_hints", "archive_command", "restore_command"):
        assert setting(key) == conf[key]
    subprocess.run([*as_pg, "sh", "-c", f"echo \"archive_command = '/bin/true'\" >> {data}/postgresql.auto.conf"],
                   check=True, timeout=30)  # what ALTER SYSTEM writes
    assert setting("archive_command") == "/bin/true"


# --------------------------------------------------------------------------- deploy/


def test_postgresql_settings():
    conf = conf_settings(DEPLOY / "postgresql" / "dbops.conf")
    assert conf["wal_level"] == "replica"
    assert conf["archive_mode"] == "on"
    assert conf["wal_log_hints"] == "on"
    push, fetch = shlex.split(conf["archive_command"]), shlex.split(conf["restore_command"])
    assert push[-2:] == ["wal-push", "%p"]
    assert fetch[-3:] == ["wal-fetch", "%f", "%p"]
    for argv in (push, fetch):
        args = dbops_argv(argv)
        assert global_options(args) == ["-c", CONFIG_MOUNT]
        assert parse_cli(args) == [args[2]]


def test_cron_line():
    when, user, command = cron_job(DEPLOY / "cron" / "dbops")
    assert len(when) == 5 and user == "root"
    subprocess.run(["sh", "-n", "-c", command], check=True)
    first = shlex.split(command.split("||", 1)[0])
    assert first[:4] == ["flock", "-n", "-E", "75"]
    args = dbops_argv(first)
    assert "-q" in global_options(args), "-q (a global option) keeps a successful run silent"
    assert parse_cli(args) == ["backup"]
    metrics = args[args.index("--metrics-file") + 1]
    assert metrics.startswith(METRICS_DIR + "/") and metrics.endswith(".prom")


def test_cron_line_reports_a_held_lock_in_one_line(tmp_path):
    """Run the job as written, with the lock held: no dbops runs, one line for the mail, exit 0."""
    _, _, command = cron_job(DEPLOY / "cron" / "dbops")
    lock_path = shlex.split(command)[4]
    lock = tmp_path / "dbops-backup.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        res = subprocess.run(["sh", "-c", command.replace(lock_path, str(lock))], check=False,
                             capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert res.stderr == ""
    assert res.stdout.splitlines() == [f"dbops backup skipped: the previous run still holds {lock}"]


def test_systemd_service_and_timer():
    svc = unit_file(DEPLOY / "systemd" / "dbops-backup.service")
    timer = unit_file(DEPLOY / "systemd" / "dbops-backup.timer")
    s = svc["Service"]
    assert s["Type"] == ["oneshot"]
    assert s["User"][0] == "root"
    (exec_start,) = s["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "flock" and argv[0].startswith("/")
    assert "--nonblock" in argv[:argv.index(DBOPS_BIN)]
    args = dbops_argv(argv)
    assert "-q" in global_options(args)
    assert parse_cli(args) == ["backup"]
    # The timer and cron run the very same dbops command line.
    _, _, command = cron_job(DEPLOY / "cron" / "dbops")
    assert dbops_argv(shlex.split(command.split("||", 1)[0])) == args
    t = timer["Timer"]
    assert t["Persistent"] == ["true"] and t["OnCalendar"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    # flock's exit 75 (another run holds the lock) is not a failure of this unit.
    conflict = argv[argv.index("--conflict-exit-code") + 1]
    assert s["SuccessExitStatus"] == [conflict] == ["75"]


def test_wal_status_is_scheduled_with_metrics_in_every_deployment():
    """cron, systemd and Kubernetes all run `wal status --metrics-file` (RPO, gaps, archiver)."""
    _, user, command = cron_job(DEPLOY / "cron" / "dbops", "wal status")
    assert user == "root"
    subprocess.run(["sh", "-n", "-c", command], check=True)
    assert command.rstrip().endswith(">/dev/null"), "the status table must not mail every 5 minutes"
    args = dbops_argv(shlex.split(command.split(">", 1)[0]))
    assert "-q" in global_options(args)
    assert args[args.index("--metrics-file") + 1] == f"{METRICS_DIR}/dbops_wal.prom"

    svc = unit_file(DEPLOY / "systemd" / "dbops-wal-status.service")
    timer = unit_file(DEPLOY / "systemd" / "dbops-wal-status.timer")
    (exec_start,) = svc["Service"]["ExecStart"]
    assert dbops_argv(shlex.split(exec_start)) == args
    assert parse_cli(args) == ["wal", "status"]
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == ["timers.target"]

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text()))
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CronJob"}
    (c,) = jobs["dbops-wal-status"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert parse_cli(c["args"]) == ["wal", "status"] and "--metrics-file" in c["args"]

    compose_svc = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["dbops-wal-status"]
    script = compose_svc["entrypoint"][-1]
    subprocess.run(["sh", "-n", "-c", script], check=True)
    words = shlex.split(script.split(";")[1].split(">", 1)[0])  # `do dbops ARGS >/dev/null`, in the image
    loop_args = words[words.index("dbops") + 1:]
    assert parse_cli(loop_args) == ["wal", "status"] and "--metrics-file" in loop_args and "sleep 300" in script


def test_kubernetes_cronjob():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "cronjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    text = kinds["ConfigMap"]["data"]["dbops.yaml"]
    cfg = cfgmod.parse(yaml.safe_load(text), env={v: "x" * 12 for v in config_vars(text)})
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CronJob"}
    job = jobs["dbops-backup"]["spec"]
    assert job["concurrencyPolicy"] == "Forbid"
    pod = job["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    parse_cli(args)
    assert args[args.index("-c") + 1] == CONFIG_MOUNT
    vm = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert vm["config"] == str(Path(CONFIG_MOUNT).parent)
    assert vm["scratch"] == cfg.backup.scratch_dir
    assert cfg.runtime.engine == "none"  # no container engine inside a pod
    assert pod["securityContext"]["runAsUser"] != 0
    # The scratch emptyDir's sizeLimit is invisible to statvfs: backup.scratch_limit says it.
    (scratch,) = [v for v in pod["volumes"] if v["name"] == "scratch"]
    assert cfg.backup.scratch_limit == cfgmod.parse_size(scratch["emptyDir"]["sizeLimit"])
    assert cfg.backup.retention.auto
    assert "--metrics-file" in args
    # The image is one built from deploy/Dockerfile for one PostgreSQL major.
    assert re.fullmatch(r"dbops:[0-9.]+-pg1[3-7]", container["image"])


def test_s3_policies_grant_what_dbops_needs_on_its_prefix_only(compose_cfg):
    bucket, prefix = compose_cfg.storage.bucket, compose_cfg.storage.prefix
    user = json.loads((DEPLOY / "s3" / "user-policy.json").read_text())
    bucket_policy = json.loads((DEPLOY / "s3" / "bucket-policy.json").read_text())
    for policy in (user, bucket_policy):
        grants: dict[str, set[str]] = {}
        for st in policy["Statement"]:
            assert st["Effect"] == "Allow"
            for action in st["Action"]:
                grants.setdefault(action, set()).update(st["Resource"])
        assert set(grants) == S3_ACTIONS
        for action in ("s3:ListBucket", "s3:GetBucketLocation"):
            assert grants[action] == {f"arn:aws:s3:::{bucket}"}
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert grants[action] == {f"arn:aws:s3:::{bucket}/{prefix}/*"}
    assert all("Principal" in st for st in bucket_policy["Statement"])
    assert not any("Principal" in st for st in user["Statement"])
    assert [{k: v for k, v in st.items() if k != "Principal"} for st in bucket_policy["Statement"]] == user["Statement"]
