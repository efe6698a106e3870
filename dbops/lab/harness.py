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

import os
import secrets as pysecrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dbops import config as cfgmod
from dbops import log, proc
from dbops.config import Config, Node
from dbops.errors import DbopsError
from dbops.lab import common
from dbops.lab import postgres as labpg
from dbops.lab import s3 as labs3
from dbops.lab.common import PG_USER, STATE_FILE, free_port
from dbops.lab.postgres import DEFAULT_PG_PORT
from dbops.lab.s3 import BUCKET, DEFAULT_S3_PORT

_log = log.get("lab")

DEFAULT_DIR = ".lab"

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


dbops_executable = proc.dbops_executable


def config_yaml(d: Path, state: dict, nodes: list[Node], engine: str) -> str:
    lines = ["# Written by `dbops lab up`: the local lab on loopback.", "cluster: lab", "nodes:"]
    for n in nodes:
        lines += [f"  - name: {n.name}", f"    host: {n.host}", f"    port: {n.port}", f"    user: {n.user}",
                  f"    passfile: {n.passfile}", f"    data_dir: {n.data_dir}", "    controller: local",
                  f"    os_user: {n.os_user}", f"    log_file: {d / 'logs' / (n.name + '.log')}"]
    lines += [
        "storage:",
        f"  endpoint: {state['s3']['endpoint']}",
        f"  bucket: {labs3.BUCKET}",
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
        proc.chown_to(d / sub, common.PG_USER)
    # The logs folder is written by the servers too (pg_ctl -l runs as postgres).
    os.chmod(d / "logs", 0o777)
    cc = d / "containers.conf"
    if not cc.exists():
        cc.write_text(CONTAINERS_CONF)
    state = common.load_state(d)
    fresh = not state  # a lab from before encryption existed keeps its plain archive
    taken: set[int] = set()
    for s in (state.get("s3", {}), *state.get("nodes", {}).values()):
        if isinstance(s, dict) and s.get("port"):
            taken.add(s["port"])

    labs3.start_s3(d, state, taken)

    if not (d / "pgpass").exists():
        password = pysecrets.token_urlsafe(18)
        user = common.PG_USER
        common.write_private(d / "pgpass", f"127.0.0.1:*:*:{user}:{password}\nlocalhost:*:*:{user}:{password}\n")
    password = (d / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]

    nodes_state = state.setdefault("nodes", {})
    names = [f"pg{i + 1}" for i in range(replicas + 1)]
    nodes: list[Node] = []
    for i, name in enumerate(names):
        ns = nodes_state.setdefault(name, {})
        if not ns.get("port"):
            ns["port"] = common.free_port(labpg.DEFAULT_PG_PORT + i, taken)
            taken.add(ns["port"])
        nodes.append(labpg.node(name, ns["port"], d))
    common.save_state(d, state)

    if encrypt is None:
        encrypt = bool(state.get("encrypt", fresh))
    state["encrypt"] = encrypt
    key_file = d / "encryption.key"
    if encrypt and not key_file.exists():
        from dbops.storage import keys

        common.write_private(key_file, keys.generate() + "\n")
    engine = _engine()
    cfg_path = d / "dbops.yaml"
    cfg_path.write_text(config_yaml(d, state, nodes, engine))
    os.chmod(cfg_path, 0o644)

    archive_cmd = _archive_command(d) if archive else "/bin/true"
    primary = nodes[0]
    pdata = Path(primary.data_dir)
    if not (pdata / "PG_VERSION").exists():
        labpg.init_primary(d, primary.name, primary.port, password, archive_cmd, _restore_command(d))
    labpg.start_pg(pdata, d / "logs" / f"{primary.name}.log")
    for n in nodes[1:]:
        rdata = Path(n.data_dir)
        if not (rdata / "PG_VERSION").exists():
            labpg.init_replica(d, n.name, primary, n.port)
        labpg.start_pg(rdata, d / "logs" / f"{n.name}.log")
    state["archive"] = archive
    common.save_state(d, state)
    for n in nodes[1:]:
        labpg.wait_streaming(n)
    return info(d)


def info(d: Path | str = DEFAULT_DIR) -> LabInfo:
    d = Path(d).resolve()
    state = common.load_state(d)
    if not state or not (d / "dbops.yaml").exists():
        raise DbopsError(f"no lab in {d}", hint="run `dbops lab up` first")
    cfg = cfgmod.load(str(d / "dbops.yaml"))
    creds = common.read_credentials(d) or ("", "")
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
                   bucket=labs3.BUCKET, access_key=creds[0], secret_key=creds[1], primary=nodes[0],
                   replicas=nodes[1:], env=env)


def status(d: Path | str = DEFAULT_DIR) -> dict:
    d = Path(d).resolve()
    state = common.load_state(d)
    if not state:
        raise DbopsError(f"no lab in {d}", hint="run `dbops lab up` first")
    s3 = state.get("s3", {})
    out = {"dir": str(d), "config": str(d / "dbops.yaml"),
           "s3": {"endpoint": s3.get("endpoint"), "pid": s3.get("pid"),
                  "running": labs3.running(s3.get("pid"))},
           "nodes": []}
    for name, ns in sorted(state.get("nodes", {}).items()):
        data = d / "pg" / name
        role = "unknown"
        if (data / "standby.signal").exists():
            role = "standby"
        elif (data / "PG_VERSION").exists():
            role = "primary"
        out["nodes"].append({"name": name, "port": ns.get("port"), "data_dir": str(data),
                             "running": labpg.pg_running(data), "configured_role": role})
    return out


def down(d: Path | str = DEFAULT_DIR, purge: bool = False) -> list[str]:
    """Stop what the lab started (PostgreSQL by data folder, S3 by recorded pid); purge removes the folder."""
    d = Path(d).resolve()
    state = common.load_state(d)
    stopped: list[str] = []
    pg_root = d / "pg"
    if pg_root.is_dir():
        for data in sorted(pg_root.iterdir()):
            if labpg.pg_running(data):
                try:
                    labpg.pg_ctl(data, "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
                except DbopsError:
                    labpg.pg_ctl(data, "-m", "immediate", "-w", "stop", timeout=60)
                stopped.append(f"postgresql {data.name}")
    if labs3.stop_s3(state.get("s3", {}).get("pid")):
        stopped.append("s3 (seaweedfs)")
    if purge and d.exists():
        if not (d / common.STATE_FILE).exists() and not (d / "dbops.yaml").exists():
            raise DbopsError(f"{d} does not look like a dbops lab; not removing it")
        shutil.rmtree(d)
        stopped.append(f"removed {d}")
    return stopped


def shell_exports(lab: LabInfo) -> str:
    return "\n".join(f"export {k}={v}" for k, v in lab.env.items())


__all__ = ["BUCKET", "DEFAULT_DIR", "DEFAULT_PG_PORT", "DEFAULT_S3_PORT", "PG_USER", "STATE_FILE", "LabInfo",
           "config_yaml", "down", "free_port", "info", "shell_exports", "status", "up"]
