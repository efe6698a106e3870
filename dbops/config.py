"""Configuration: one YAML file into typed, frozen objects.

* ``${VAR}`` (and ``${VAR:-default}``) anywhere in a string value is replaced
  from the environment, so secrets can live outside the file.
* Every problem in a file is collected and reported at once, each with the
  key's path and what was expected (:class:`dbops.errors.ConfigError`).
* Secret values are registered with :mod:`dbops.secrets` so that logging and
  error output can never print them.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dbops import secrets
from dbops.errors import ConfigError

DEFAULT_PATHS = ("./dbops.yaml", "/etc/dbops/dbops.yaml")
ENV_CONFIG = "DBOPS_CONFIG"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
    "gb": 1000**3, "gib": 1024**3, "tb": 1000**4, "tib": 1024**4,
}


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SshSettings:
    host: str
    user: str = "postgres"
    port: int = 22
    identity_file: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerNodeSettings:
    engine: str  # podman | docker
    name: str  # container name


@dataclass(frozen=True)
class Node:
    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    dbname: str = "postgres"
    password: str | None = None  # secret; prefer PGPASSWORD / passfile
    passfile: str | None = None
    sslmode: str | None = None
    data_dir: str | None = None
    bin_dir: str | None = None
    controller: str = "local"  # local | ssh | container
    os_user: str = "postgres"  # owner of data_dir for the local controller
    log_file: str | None = None  # server log when dbops starts the node (default: <data_dir>/log/dbops-server.log)
    ssh: SshSettings | None = None
    container: ContainerNodeSettings | None = None

    def conninfo(self, dbname: str | None = None, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect (never a DSN string with a password)."""
        kw: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname or self.dbname,
            "application_name": "dbops",
            "connect_timeout": 5,
        }
        if self.password:
            kw["password"] = self.password
        if self.passfile:
            kw["passfile"] = self.passfile
        if self.sslmode:
            kw["sslmode"] = self.sslmode
        kw.update(extra)
        return kw

    def public_conninfo_string(self) -> str:
        """A libpq string safe to write into primary_conninfo: no password in it."""
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}"]
        if self.passfile:
            parts.append(f"passfile={self.passfile}")
        if self.sslmode:
            parts.append(f"sslmode={self.sslmode}")
        return " ".join(parts)


@dataclass(frozen=True)
class StorageSettings:
    bucket: str
    endpoint: str | None = None
    prefix: str = ""
    region: str = "us-east-1"
    path_style: bool = True
    ca_file: str | None = None
    verify_tls: bool = True
    access_key: str | None = None  # secret; else boto3's standard chain
    secret_key: str | None = None  # secret
    credentials_file: str | None = None  # AWS shared-credentials file (mode 0600)
    profile: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retry_deadline: float = 60.0


@dataclass(frozen=True)
class CompressionSettings:
    algorithm: str = "zstd"  # zstd | none
    level: int = 3


@dataclass(frozen=True)
class RuntimeSettings:
    engine: str = "podman"  # podman | docker | none
    image: str | None = None  # e.g. postgres:15
    rootfs: str | None = None  # e.g. "/" where no image can be pulled
    extra_args: tuple[str, ...] = ()
    containers_conf: str | None = None  # podman: CONTAINERS_CONF
    bin_dir: str | None = None  # PostgreSQL binaries inside the container / host
    user: str = "postgres"  # database role dbops connects to a throwaway instance as
    network: str = "host"  # host (--network host) | publish (-p 127.0.0.1:PORT:5432)


@dataclass(frozen=True)
class ArchiveSettings:
    async_push: bool = True
    parallel: int = 4
    spool_dir: str | None = None  # default: <data_dir>/../dbops-spool or /var/lib/dbops/spool
    prefetch: int = 8
    push_timeout: float = 120.0


@dataclass(frozen=True)
class Assertion:
    name: str
    sql: str
    database: str = "postgres"


@dataclass(frozen=True)
class ValidationSettings:
    checksums: bool = True
    amcheck: bool = True
    assertions: tuple[Assertion, ...] = ()
    heal: bool = True
    start_timeout: float = 600.0


@dataclass(frozen=True)
class RetentionSettings:
    keep_last: int | None = None
    keep_within: int | None = None  # seconds


@dataclass(frozen=True)
class BackupSettings:
    source: str | None = None  # node name; default: the primary
    scratch_dir: str = "/var/tmp/dbops"
    # Dedupe granularity: one PostgreSQL page. New chunks are compressed together in frames, so small
    # chunks no longer cost compression ratio (bench/bench_backup_store.py, pgbench scale 100).
    chunk_size: int = 8192
    pack_size: int = 64 * 1024 * 1024
    parallel: int = 4
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)


@dataclass(frozen=True)
class PgBouncerSettings:
    host: str = "127.0.0.1"
    port: int = 6432
    user: str = "pgbouncer"
    password: str | None = None  # secret
    database: str = "pgbouncer"
    config_file: str | None = None  # the pgbouncer.ini whose [databases] dbops repoints
    databases: tuple[str, ...] = ()  # names of the [databases] entries to repoint


@dataclass(frozen=True)
class FailoverSettings:
    max_lag: int = 16 * 1024 * 1024
    timeout: float = 60.0
    max_xact_age: float = 300.0
    pre_hooks: tuple[str, ...] = ()
    post_hooks: tuple[str, ...] = ()
    fence_hooks: tuple[str, ...] = ()  # --primary-lost: commands that make sure the old primary cannot write
    pgbouncer: PgBouncerSettings | None = None


@dataclass(frozen=True)
class Config:
    cluster: str
    nodes: tuple[Node, ...]
    storage: StorageSettings
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    backup: BackupSettings = field(default_factory=BackupSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    path: str | None = None

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"no node named {name!r} in the configuration",
            hint="known nodes: " + ", ".join(n.name for n in self.nodes),
        )


SECRET_KEYS = {"password", "secret_key", "access_key"}


# --------------------------------------------------------------------------- parsing


class _Collector:
    """Reads a raw mapping, collecting every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def mapping(self, raw: Any, path: str) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.bad(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        return raw

    def unknown(self, raw: dict, path: str, allowed: set[str]) -> None:
        for k in raw:
            if k not in allowed:
                self.bad(f"{path}.{k}" if path else str(k), "unknown key (allowed: " + ", ".join(sorted(allowed)) + ")")

    def str_(self, raw: dict, key: str, path: str, default: Any = None, required: bool = False,
             choices: tuple[str, ...] | None = None) -> Any:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            if required:
                self.bad(p, "required, missing")
            return default
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            self.bad(p, f"expected a string, got {type(v).__name__}")
            return default
        v = str(v)
        if choices and v not in choices:
            self.bad(p, f"expected one of {', '.join(choices)}, got {v!r}")
            return default
        return v

    def int_(self, raw: dict, key: str, path: str, default: Any = None, minimum: int | None = None,
             maximum: int | None = None, required: bool = False) -> Any:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            if required:
                self.bad(p, "required, missing")
            return default
        v = raw[key]
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(p, f"expected an integer, got {v!r}")
            return default
        if minimum is not None and v < minimum:
            self.bad(p, f"must be at least {minimum}, got {v}")
            return default
        if maximum is not None and v > maximum:
            self.bad(p, f"must be at most {maximum}, got {v}")
            return default
        return v

    def float_(self, raw: dict, key: str, path: str, default: float, minimum: float = 0.0) -> float:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = raw[key]
        if isinstance(v, str):
            d = parse_duration(v)
            if d is not None:
                return float(d)
            try:
                v = float(v)
            except ValueError:
                self.bad(p, f"expected a number of seconds or a duration like 30s, 5m, got {raw[key]!r}")
                return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(p, f"expected a number, got {v!r}")
            return default
        if v < minimum:
            self.bad(p, f"must be at least {minimum}, got {v}")
            return default
        return float(v)

    def bool_(self, raw: dict, key: str, path: str, default: bool) -> bool:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = raw[key]
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return v.lower() in ("true", "yes", "on", "1")
        self.bad(p, f"expected true or false, got {v!r}")
        return default

    def size(self, raw: dict, key: str, path: str, default: int, minimum: int = 1) -> int:
        p = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            return default
        v = parse_size(raw[key])
        if v is None:
            self.bad(p, f"expected a size like 16MiB or a number of bytes, got {raw[key]!r}")
            return default
        if v < minimum:
            self.bad(p, f"must be at least {minimum} bytes")
            return default
        return v

    def str_list(self, raw: dict, key: str, path: str) -> tuple[str, ...]:
        p = f"{path}.{key}" if path else key
        v = raw.get(key)
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
            self.bad(p, "expected a list of strings")
            return ()
        return tuple(str(x) for x in v)


def parse_duration(v: Any) -> int | None:
    """'30s', '5m', '12h', '14d', '2w' or a plain integer of seconds."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if not isinstance(v, str):
        return None
    s = v.strip()
    if s.isdigit():
        return int(s)
    m = _DURATION_RE.match(s)
    if not m:
        return None
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    if not isinstance(v, str):
        return None
    m = _SIZE_RE.match(v.strip())
    if not m:
        return None
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


def interpolate(value: Any, env: dict[str, str], problems: list[str], path: str = "") -> Any:
    """Replace ${VAR} / ${VAR:-default} in every string, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, problems, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, problems, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _ENV_RE.sub(sub, value)
    return value


def _parse_node(c: _Collector, raw: Any, path: str) -> Node | None:
    raw = c.mapping(raw, path)
    if not raw:
        return None
    c.unknown(raw, path, {f.name for f in fields(Node)})
    name = c.str_(raw, "name", path, required=True)
    if name is not None and not _NAME_RE.match(name):
        c.bad(f"{path}.name", f"invalid node name {name!r} (letters, digits, _ . -)")
    controller = c.str_(raw, "controller", path, "local", choices=("local", "ssh", "container"))
    ssh = None
    cont = None
    if "ssh" in raw:
        sraw = c.mapping(raw["ssh"], f"{path}.ssh")
        c.unknown(sraw, f"{path}.ssh", {f.name for f in fields(SshSettings)})
        ssh = SshSettings(
            host=c.str_(sraw, "host", f"{path}.ssh", required=True) or "",
            user=c.str_(sraw, "user", f"{path}.ssh", "postgres"),
            port=c.int_(sraw, "port", f"{path}.ssh", 22, 1, 65535),
            identity_file=c.str_(sraw, "identity_file", f"{path}.ssh"),
            options=c.str_list(sraw, "options", f"{path}.ssh"),
        )
    if "container" in raw:
        craw = c.mapping(raw["container"], f"{path}.container")
        c.unknown(craw, f"{path}.container", {"engine", "name"})
        cont = ContainerNodeSettings(
            engine=c.str_(craw, "engine", f"{path}.container", "podman", choices=("podman", "docker")),
            name=c.str_(craw, "name", f"{path}.container", required=True) or "",
        )
    if controller == "ssh" and ssh is None:
        c.bad(f"{path}.ssh", "required when controller is ssh")
    if controller == "container" and cont is None:
        c.bad(f"{path}.container", "required when controller is container")
    node = Node(
        name=name or "?",
        host=c.str_(raw, "host", path, "127.0.0.1"),
        port=c.int_(raw, "port", path, 5432, 1, 65535),
        user=c.str_(raw, "user", path, "postgres"),
        dbname=c.str_(raw, "dbname", path, "postgres"),
        password=c.str_(raw, "password", path),
        passfile=c.str_(raw, "passfile", path),
        sslmode=c.str_(raw, "sslmode", path, None,
                       choices=("disable", "allow", "prefer", "require", "verify-ca", "verify-full")),
        data_dir=c.str_(raw, "data_dir", path),
        bin_dir=c.str_(raw, "bin_dir", path),
        controller=controller,
        os_user=c.str_(raw, "os_user", path, "postgres"),
        log_file=c.str_(raw, "log_file", path),
        ssh=ssh,
        container=cont,
    )
    if controller == "local" and not node.data_dir:
        c.bad(f"{path}.data_dir", "required for the local controller (the node's PGDATA)")
    return node


def parse(raw: Any, env: dict[str, str] | None = None, path: str | None = None) -> Config:
    """Turn a raw YAML document into a Config, or raise ConfigError listing every problem."""
    env = dict(os.environ if env is None else env)
    c = _Collector()
    if not isinstance(raw, dict):
        raise ConfigError(
            "the configuration must be a YAML mapping",
            detail=f"got {type(raw).__name__} in {path or '<config>'}",
        )
    raw = interpolate(raw, env, c.problems)
    top = {"cluster", "nodes", "storage", "compression", "runtime", "archive", "backup", "failover"}
    c.unknown(raw, "", top)

    cluster = c.str_(raw, "cluster", "", required=True)
    if cluster is not None and not _NAME_RE.match(cluster):
        c.bad("cluster", f"invalid cluster name {cluster!r} (letters, digits, _ . -)")

    nodes: list[Node] = []
    rnodes = raw.get("nodes")
    if rnodes is None:
        c.bad("nodes", "required, missing (a list of at least one node)")
    elif not isinstance(rnodes, list) or not rnodes:
        c.bad("nodes", "expected a non-empty list of nodes")
    else:
        for i, rn in enumerate(rnodes):
            n = _parse_node(c, rn, f"nodes[{i}]")
            if n:
                nodes.append(n)
        seen: set[str] = set()
        for i, n in enumerate(nodes):
            if n.name in seen:
                c.bad(f"nodes[{i}].name", f"duplicate node name {n.name!r}")
            seen.add(n.name)

    sraw = c.mapping(raw.get("storage"), "storage")
    if "storage" not in raw:
        c.bad("storage", "required, missing (bucket, endpoint, ...)")
    c.unknown(sraw, "storage", {f.name for f in fields(StorageSettings)})
    endpoint = c.str_(sraw, "endpoint", "storage")
    if endpoint and not re.match(r"^https?://[^/\s]+", endpoint):
        c.bad("storage.endpoint", f"expected an http:// or https:// URL, got {endpoint!r}")
    prefix = (c.str_(sraw, "prefix", "storage", "") or "").strip("/")
    bucket = c.str_(sraw, "bucket", "storage", required="storage" in raw)
    if bucket and not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        c.bad("storage.bucket", f"invalid bucket name {bucket!r}")
    storage = StorageSettings(
        bucket=bucket or "",
        endpoint=endpoint,
        prefix=prefix,
        region=c.str_(sraw, "region", "storage", "us-east-1"),
        path_style=c.bool_(sraw, "path_style", "storage", True),
        ca_file=c.str_(sraw, "ca_file", "storage"),
        verify_tls=c.bool_(sraw, "verify_tls", "storage", True),
        access_key=c.str_(sraw, "access_key", "storage"),
        secret_key=c.str_(sraw, "secret_key", "storage"),
        credentials_file=c.str_(sraw, "credentials_file", "storage"),
        profile=c.str_(sraw, "profile", "storage"),
        connect_timeout=c.float_(sraw, "connect_timeout", "storage", 5.0),
        read_timeout=c.float_(sraw, "read_timeout", "storage", 30.0),
        retry_deadline=c.float_(sraw, "retry_deadline", "storage", 60.0),
    )
    if bool(storage.access_key) != bool(storage.secret_key):
        c.bad("storage", "access_key and secret_key go together (or leave both out to use boto3's credential chain)")

    craw = c.mapping(raw.get("compression"), "compression")
    c.unknown(craw, "compression", {"algorithm", "level"})
    compression = CompressionSettings(
        algorithm=c.str_(craw, "algorithm", "compression", "zstd", choices=("zstd", "none")),
        level=c.int_(craw, "level", "compression", 3, 1, 22),
    )

    rraw = c.mapping(raw.get("runtime"), "runtime")
    c.unknown(rraw, "runtime", {f.name for f in fields(RuntimeSettings)})
    runtime = RuntimeSettings(
        # Without a runtime section, validation runs PostgreSQL as a plain local process;
        # `dbops check` warns about it. Set engine podman/docker with an image for isolation.
        engine=c.str_(rraw, "engine", "runtime", "podman" if rraw else "none", choices=("podman", "docker", "none")),
        image=c.str_(rraw, "image", "runtime"),
        rootfs=c.str_(rraw, "rootfs", "runtime"),
        extra_args=c.str_list(rraw, "extra_args", "runtime"),
        containers_conf=c.str_(rraw, "containers_conf", "runtime"),
        bin_dir=c.str_(rraw, "bin_dir", "runtime"),
        user=c.str_(rraw, "user", "runtime", "postgres"),
        network=c.str_(rraw, "network", "runtime", "host", choices=("host", "publish")),
    )
    if runtime.engine != "none" and not (runtime.image or runtime.rootfs):
        c.bad("runtime", f"engine {runtime.engine} needs an image (e.g. postgres:15) or a rootfs (e.g. /)")
    if runtime.image and runtime.rootfs:
        c.bad("runtime", "set either image or rootfs, not both")

    araw = c.mapping(raw.get("archive"), "archive")
    c.unknown(araw, "archive", {"async", "parallel", "spool_dir", "prefetch", "push_timeout"})
    archive = ArchiveSettings(
        async_push=c.bool_(araw, "async", "archive", True),
        parallel=c.int_(araw, "parallel", "archive", 4, 1, 64),
        spool_dir=c.str_(araw, "spool_dir", "archive"),
        prefetch=c.int_(araw, "prefetch", "archive", 8, 0, 256),
        push_timeout=c.float_(araw, "push_timeout", "archive", 120.0, 1.0),
    )

    braw = c.mapping(raw.get("backup"), "backup")
    c.unknown(braw, "backup", {"source", "scratch_dir", "chunk_size", "pack_size", "parallel", "validation", "retention"})
    vraw = c.mapping(braw.get("validation"), "backup.validation")
    c.unknown(vraw, "backup.validation", {"checksums", "amcheck", "assertions", "heal", "start_timeout"})
    assertions: list[Assertion] = []
    ras = vraw.get("assertions") or []
    if not isinstance(ras, list):
        c.bad("backup.validation.assertions", "expected a list of {name, sql, database}")
        ras = []
    for i, ra in enumerate(ras):
        p = f"backup.validation.assertions[{i}]"
        ra = c.mapping(ra, p)
        c.unknown(ra, p, {"name", "sql", "database"})
        sql = c.str_(ra, "sql", p, required=True)
        if sql:
            assertions.append(Assertion(name=c.str_(ra, "name", p, f"assertion {i + 1}"), sql=sql,
                                        database=c.str_(ra, "database", p, "postgres")))
    validation = ValidationSettings(
        checksums=c.bool_(vraw, "checksums", "backup.validation", True),
        amcheck=c.bool_(vraw, "amcheck", "backup.validation", True),
        assertions=tuple(assertions),
        heal=c.bool_(vraw, "heal", "backup.validation", True),
        start_timeout=c.float_(vraw, "start_timeout", "backup.validation", 600.0, 1.0),
    )
    traw = c.mapping(braw.get("retention"), "backup.retention")
    c.unknown(traw, "backup.retention", {"keep_last", "keep_within"})
    keep_within = None
    if traw.get("keep_within") is not None:
        keep_within = parse_duration(traw["keep_within"])
        if keep_within is None:
            c.bad("backup.retention.keep_within", f"expected a duration like 14d or 12h, got {traw['keep_within']!r}")
    retention = RetentionSettings(
        keep_last=c.int_(traw, "keep_last", "backup.retention", None, 1),
        keep_within=keep_within,
    )
    chunk_size = c.size(braw, "chunk_size", "backup", 8192, 8192)
    if chunk_size % 8192:
        c.bad("backup.chunk_size", "must be a multiple of 8192 (PostgreSQL's page size)")
    backup = BackupSettings(
        source=c.str_(braw, "source", "backup"),
        scratch_dir=c.str_(braw, "scratch_dir", "backup", "/var/tmp/dbops"),
        chunk_size=chunk_size,
        pack_size=c.size(braw, "pack_size", "backup", 64 * 1024 * 1024, 1024 * 1024),
        parallel=c.int_(braw, "parallel", "backup", 4, 1, 64),
        validation=validation,
        retention=retention,
    )
    if backup.source and nodes and backup.source not in {n.name for n in nodes}:
        c.bad("backup.source", f"no node named {backup.source!r} (known: {', '.join(n.name for n in nodes)})")

    fraw = c.mapping(raw.get("failover"), "failover")
    c.unknown(fraw, "failover", {"max_lag", "timeout", "max_xact_age", "pre_hooks", "post_hooks", "fence_hooks",
                                      "pgbouncer"})
    pgb = None
    if fraw.get("pgbouncer") is not None:
        praw = c.mapping(fraw["pgbouncer"], "failover.pgbouncer")
        c.unknown(praw, "failover.pgbouncer", {f.name for f in fields(PgBouncerSettings)})
        pgb = PgBouncerSettings(
            host=c.str_(praw, "host", "failover.pgbouncer", "127.0.0.1"),
            port=c.int_(praw, "port", "failover.pgbouncer", 6432, 1, 65535),
            user=c.str_(praw, "user", "failover.pgbouncer", "pgbouncer"),
            password=c.str_(praw, "password", "failover.pgbouncer"),
            database=c.str_(praw, "database", "failover.pgbouncer", "pgbouncer"),
            config_file=c.str_(praw, "config_file", "failover.pgbouncer"),
            databases=c.str_list(praw, "databases", "failover.pgbouncer"),
        )
    failover = FailoverSettings(
        max_lag=c.size(fraw, "max_lag", "failover", 16 * 1024 * 1024, 0),
        timeout=c.float_(fraw, "timeout", "failover", 60.0, 1.0),
        max_xact_age=c.float_(fraw, "max_xact_age", "failover", 300.0, 0.0),
        pre_hooks=c.str_list(fraw, "pre_hooks", "failover"),
        post_hooks=c.str_list(fraw, "post_hooks", "failover"),
        fence_hooks=c.str_list(fraw, "fence_hooks", "failover"),
        pgbouncer=pgb,
    )

    if c.problems:
        where = path or "<config>"
        n = len(c.problems)
        raise ConfigError(
            f"invalid configuration {where}: {n} problem{'s' if n != 1 else ''}",
            problems=c.problems,
            hint="fix every listed key; `dbops config check` re-validates",
        )

    cfg = Config(
        cluster=cluster or "",
        nodes=tuple(nodes),
        storage=storage,
        compression=compression,
        runtime=runtime,
        archive=archive,
        backup=backup,
        failover=failover,
        path=path,
    )
    register_secrets(cfg)
    return cfg


def register_secrets(cfg: Config) -> None:
    for n in cfg.nodes:
        secrets.register(n.password)
    secrets.register(cfg.storage.access_key)
    secrets.register(cfg.storage.secret_key)
    if cfg.failover.pgbouncer:
        secrets.register(cfg.failover.pgbouncer.password)


def resolve_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    for cand in DEFAULT_PATHS:
        if Path(cand).exists():
            return Path(cand)
    raise ConfigError(
        "no configuration file found",
        detail="looked for --config, $DBOPS_CONFIG, " + ", ".join(DEFAULT_PATHS),
        hint="pass --config PATH or set DBOPS_CONFIG (`dbops lab up` writes one for a local lab)",
    )


def load(explicit: str | None = None, env: dict[str, str] | None = None) -> Config:
    import yaml  # imported here: the wal-push fast path may not need it

    p = resolve_path(explicit)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {p} does not exist",
                          hint="pass --config PATH or set DBOPS_CONFIG") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {p}: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C parser: archive_command runs often
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"configuration file {p} is not valid YAML{where}",
                          detail=str(getattr(e, "problem", e))) from None
    return parse(raw, env=env, path=str(p))


def redacted(cfg: Config) -> dict:
    """The effective configuration as plain data, with every secret replaced."""

    def walk(v: Any, key: str | None = None) -> Any:
        if isinstance(v, dict):
            return {k: walk(x, k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if key in SECRET_KEYS and v:
            return "***"
        return v

    d = asdict(cfg)
    return walk(d)
