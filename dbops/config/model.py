"""The configuration model: frozen dataclasses, each setting's default written once, on its field.

A field made with :func:`setting` is read from the YAML by the generic reader in
``dbops.config.parse``: its kind (str, int, float, bool, size, list), bounds, choices, YAML key
(when it differs from the field name) and whether it is secret live here, beside the default.
Sections (nested dataclasses) have a parser each in ``parse.py``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

from dbops.errors import ConfigError

SPEC = "dbops"  # the field-metadata key holding a setting's rules
# S3 refuses a single PUT above 5 GiB; a pack can outgrow pack_size by one compressed frame.
MAX_PACK_SIZE = 4 * 1024**3


@dataclass(frozen=True)
class Rule:
    kind: str = "str"  # str | int | float | bool | size | list
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    key: str | None = None  # the YAML key, when it is not the field name
    secret: bool = False
    required: bool = False


def setting(default: Any = MISSING, kind: str = "str", *, choices: tuple[str, ...] | None = None,
            minimum: float | None = None, maximum: float | None = None, key: str | None = None,
            secret: bool = False, required: bool = False) -> Any:
    """A configuration field: its default and the rules its YAML value is read by."""
    rule = Rule(kind, choices, minimum, maximum, key, secret, required)
    if kind == "list" and default is MISSING:
        default = ()
    return field(default=default, metadata={SPEC: rule})


PORT = {"minimum": 1, "maximum": 65535}
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class SshSettings:
    host: str = setting(required=True)
    user: str = setting("postgres")
    port: int = setting(22, "int", **PORT)
    identity_file: str | None = setting(None)
    options: tuple[str, ...] = setting(kind="list")


@dataclass(frozen=True, kw_only=True)
class ContainerNodeSettings:
    engine: str = setting("podman", choices=("podman", "docker"))
    name: str = setting(required=True)  # container name


@dataclass(frozen=True)
class Node:
    name: str = setting(required=True)
    host: str = setting("127.0.0.1")
    port: int = setting(5432, "int", **PORT)
    user: str = setting("postgres")
    dbname: str = setting("postgres")
    password: str | None = setting(None, secret=True)  # prefer PGPASSWORD / passfile
    passfile: str | None = setting(None)
    sslmode: str | None = setting(None, choices=SSLMODES)
    data_dir: str | None = setting(None)
    bin_dir: str | None = setting(None)
    controller: str = setting("local", choices=("local", "ssh", "container"))
    os_user: str = setting("postgres")  # owner of data_dir for the local controller
    log_file: str | None = setting(None)  # server log when dbops starts the node (default: <data_dir>/log/dbops-server.log)
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
class EncryptionSettings:
    """storage.encryption: client-side AES-256-GCM of every object (docs/encryption.md)."""

    key: str | None = setting(None, secret=True)  # 32 random bytes, base64: the current key (new objects use it)
    key_file: str | None = setting(None)  # a file holding the current key (mode 0600)
    old_keys: tuple[str, ...] = setting(kind="list", secret=True)  # earlier keys, still readable
    old_key_files: tuple[str, ...] = setting(kind="list")
    allow_plaintext: bool = setting(False, "bool")  # migration: read objects stored without encryption

    @property
    def enabled(self) -> bool:
        return bool(self.key or self.key_file)


@dataclass(frozen=True)
class StorageSettings:
    bucket: str = setting(required=True)
    endpoint: str | None = setting(None)
    prefix: str = setting("")
    region: str = setting("us-east-1")
    path_style: bool = setting(True, "bool")
    ca_file: str | None = setting(None)
    verify_tls: bool = setting(True, "bool")
    access_key: str | None = setting(None, secret=True)  # else boto3's standard chain
    secret_key: str | None = setting(None, secret=True)
    credentials_file: str | None = setting(None)  # AWS shared-credentials file (mode 0600)
    profile: str | None = setting(None)
    connect_timeout: float = setting(5.0, "float")
    read_timeout: float = setting(30.0, "float")
    retry_deadline: float = setting(60.0, "float")
    encryption: EncryptionSettings = field(default_factory=EncryptionSettings)
    lock_ttl: float = setting(120.0, "float", minimum=3.0)  # a lock not renewed for this long is taken over


@dataclass(frozen=True)
class CompressionSettings:
    algorithm: str = setting("zstd", choices=("zstd", "none"))
    level: int = setting(3, "int", minimum=1, maximum=22)


# A `runtime` section without `engine` means podman; no section at all means none (the default).
ENGINE_OF_A_RUNTIME_SECTION = "podman"


@dataclass(frozen=True)
class RuntimeSettings:
    # none: validation runs PostgreSQL as a plain local process (`dbops check` warns about it);
    # podman/docker with an image (or a rootfs) isolate it.
    engine: str = setting("none", choices=("podman", "docker", "none"))
    image: str | None = setting(None)  # e.g. postgres:15
    rootfs: str | None = setting(None)  # e.g. "/" where no image can be pulled
    extra_args: tuple[str, ...] = setting(kind="list")
    containers_conf: str | None = setting(None)  # podman: CONTAINERS_CONF
    bin_dir: str | None = setting(None)  # PostgreSQL binaries inside the container / host
    user: str = setting("postgres")  # database role dbops connects to a throwaway instance as
    network: str = setting("host", choices=("host", "publish"))  # host (--network host) | publish (-p 127.0.0.1:PORT:5432)
    # the throwaway server's /dev/shm (a tmpfs: only what is used takes memory). PostgreSQL 15 keeps
    # its statistics there, an entry per table read: the engines' 64 MB ran out at 1,000,000 tables.
    shm_size: str = setting("1g")


@dataclass(frozen=True)
class ArchiveSettings:
    async_push: bool = setting(True, "bool", key="async")
    parallel: int = setting(4, "int", minimum=1, maximum=64)
    spool_dir: str | None = setting(None)  # default: <data_dir>/../dbops-spool or /var/lib/dbops/spool
    prefetch: int = setting(8, "int", minimum=0, maximum=256)
    push_timeout: float = setting(120.0, "float", minimum=1.0)


@dataclass(frozen=True)
class Assertion:
    name: str
    sql: str = setting(required=True)
    database: str = setting("postgres")


@dataclass(frozen=True)
class ValidationSettings:
    checksums: bool = setting(True, "bool")
    amcheck: bool = setting(True, "bool")
    assertions: tuple[Assertion, ...] = ()
    heal: bool = setting(True, "bool")
    start_timeout: float = setting(600.0, "float", minimum=1.0)


@dataclass(frozen=True)
class RetentionSettings:
    keep_last: int | None = setting(None, "int", minimum=1)
    keep_within: int | None = None  # seconds; a duration like 14d in the YAML
    auto: bool = setting(False, "bool")  # prune right after every successful backup, under the same lock


@dataclass(frozen=True)
class BackupSettings:
    source: str | None = setting(None)  # node name; default: the primary
    scratch_dir: str = setting("/var/tmp/dbops")
    # Dedupe granularity: one PostgreSQL page. New chunks are compressed together in frames, so small
    # chunks no longer cost compression ratio (bench/bench_backup_store.py, pgbench scale 100).
    chunk_size: int = setting(8192, "size", minimum=8192)
    pack_size: int = setting(64 * 1024 * 1024, "size", minimum=1024 * 1024)  # at most MAX_PACK_SIZE
    parallel: int = setting(4, "int", minimum=1, maximum=64)
    # How a full backup copies the source: direct (its data folder, read on this host, between
    # pg_backup_start and pg_backup_stop), pg_basebackup (the replication protocol), or auto: direct
    # when the folder proves to be this host's and readable, else pg_basebackup (docs/backups.md).
    copy_method: str = setting("auto", choices=("auto", "direct", "pg_basebackup"))
    # The most scratch_dir may hold when a limit the filesystem does not show applies (an emptyDir's sizeLimit).
    scratch_limit: int | None = setting(None, "size", minimum=1024 * 1024)
    # The validation's copy in the page cache: keep it, drop its pages as they are written back, or auto:
    # drop them when the copy is larger than the memory available (docs/backups.md).
    scratch_cache: str = setting("auto", choices=("auto", "keep", "drop"))
    # The most WAL a restore holds in scratch_dir ahead of the segment replay last asked for (with a
    # tablespace map: all of it, read before the server starts; docs/restore.md).
    restore_wal_ahead: int = setting(1024 * 1024 * 1024, "size", minimum=32 * 1024 * 1024)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)


@dataclass(frozen=True)
class PgBouncerSettings:
    host: str = setting("127.0.0.1")
    port: int = setting(6432, "int", **PORT)
    user: str = setting("pgbouncer")
    password: str | None = setting(None, secret=True)
    database: str = setting("pgbouncer")
    config_file: str | None = setting(None)  # the pgbouncer.ini whose [databases] dbops repoints
    databases: tuple[str, ...] = setting(kind="list")  # names of the [databases] entries to repoint


@dataclass(frozen=True)
class FailoverSettings:
    max_lag: int = setting(16 * 1024 * 1024, "size", minimum=0)
    timeout: float = setting(60.0, "float", minimum=1.0)
    max_xact_age: float = setting(300.0, "float", minimum=0.0)
    pre_hooks: tuple[str, ...] = setting(kind="list")
    post_hooks: tuple[str, ...] = setting(kind="list")
    fence_hooks: tuple[str, ...] = setting(kind="list")  # --primary-lost: commands that make sure the old primary cannot write
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

    @property
    def os_user(self) -> str:
        """The OS user PostgreSQL runs as on this host (it owns scratch copies and restored folders):
        the first local node's ``os_user``, else that field's default."""
        local = [n for n in self.nodes if n.controller == "local"]
        return local[0].os_user if local else Node.__dataclass_fields__["os_user"].default

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ConfigError(
            f"no node named {name!r} in the configuration",
            hint="known nodes: " + ", ".join(n.name for n in self.nodes),
        )
