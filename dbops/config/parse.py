"""Configuration: one YAML file into the typed, frozen objects of ``model.py``.

* ``${VAR}`` (and ``${VAR:-default}``) anywhere in a string value is replaced
  from the environment, so secrets can live outside the file.
* Every problem in a file is collected and reported at once, each with the
  key's path and what was expected (:class:`dbops.errors.ConfigError`).
* Secret values (fields marked ``secret`` in the model) are registered with
  :mod:`dbops.secrets` so that logging and error output can never print them.

One parser per section; a section's allowed keys and its plain values come from the model's fields.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from dbops import secrets
from dbops.config.model import (ENGINE_OF_A_RUNTIME_SECTION, MAX_PACK_SIZE, SPEC, ArchiveSettings, Assertion,
                                BackupSettings,
                                CompressionSettings, Config, ContainerNodeSettings, EncryptionSettings,
                                FailoverSettings, Node,
                                PgBouncerSettings, RetentionSettings, Rule, RuntimeSettings, SshSettings,
                                StorageSettings, ValidationSettings)
from dbops.config.values import Collector, interpolate, parse_duration
from dbops.errors import ConfigError

DEFAULT_PATHS = ("./dbops.yaml", "/etc/dbops/dbops.yaml")
ENV_CONFIG = "DBOPS_CONFIG"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TOP_LEVEL = {f.name for f in fields(Config)} - {"path"}


# --------------------------------------------------------------------------- generic reading by the model


def _rule(f) -> Rule | None:
    return f.metadata.get(SPEC)


def allowed_keys(cls: type) -> set[str]:
    """The YAML keys of a section: its fields' names (or their declared keys)."""
    return {(r.key if (r := _rule(f)) and r.key else f.name) for f in fields(cls)}


def read_values(c: Collector, cls: type, raw: dict, path: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every plain setting of a section, read by its field's rule, with the field's default."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        r = _rule(f)
        if r is None or f.name in skip:
            continue
        key = r.key or f.name
        default = None if f.default is MISSING else f.default
        if r.kind == "str":
            out[f.name] = c.str_(raw, key, path, default, required=r.required, choices=r.choices)
        elif r.kind == "int":
            out[f.name] = c.int_(raw, key, path, default, r.minimum, r.maximum, required=r.required)
        elif r.kind == "float":
            out[f.name] = c.float_(raw, key, path, default, r.minimum or 0.0)
        elif r.kind == "bool":
            out[f.name] = c.bool_(raw, key, path, default)
        elif r.kind == "size":
            out[f.name] = c.size(raw, key, path, default, 1 if r.minimum is None else int(r.minimum))
        elif r.kind == "list":
            out[f.name] = c.str_list(raw, key, path)
        else:  # pragma: no cover - a model mistake
            raise TypeError(f"unknown setting kind {r.kind!r} on {cls.__name__}.{f.name}")
    return out


def _section(c: Collector, raw: dict, key: str, path: str, cls: type) -> dict:
    """A sub-mapping, checked for unknown keys against the section's model."""
    sub = c.mapping(raw.get(key), path)
    c.unknown(sub, path, allowed_keys(cls))
    return sub


# --------------------------------------------------------------------------- one parser per section


def _parse_node(c: Collector, raw: Any, path: str) -> Node | None:
    raw = c.mapping(raw, path)
    if not raw:
        return None
    c.unknown(raw, path, allowed_keys(Node))
    v = read_values(c, Node, raw, path)
    name = v["name"]
    if name is not None and not _NAME_RE.match(name):
        c.bad(f"{path}.name", f"invalid node name {name!r} (letters, digits, _ . -)")
    ssh = cont = None
    if "ssh" in raw:
        sraw = _section(c, raw, "ssh", f"{path}.ssh", SshSettings)
        sv = read_values(c, SshSettings, sraw, f"{path}.ssh")
        ssh = SshSettings(**{**sv, "host": sv["host"] or ""})
    if "container" in raw:
        craw = _section(c, raw, "container", f"{path}.container", ContainerNodeSettings)
        cv = read_values(c, ContainerNodeSettings, craw, f"{path}.container")
        cont = ContainerNodeSettings(**{**cv, "name": cv["name"] or ""})
    controller = v["controller"]
    if controller == "ssh" and ssh is None:
        c.bad(f"{path}.ssh", "required when controller is ssh")
    if controller == "container" and cont is None:
        c.bad(f"{path}.container", "required when controller is container")
    node = Node(**{**v, "name": name or "?"}, ssh=ssh, container=cont)
    if controller == "local" and not node.data_dir:
        c.bad(f"{path}.data_dir", "required for the local controller (the node's PGDATA)")
    return node


def _parse_nodes(c: Collector, raw: dict) -> list[Node]:
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
    return nodes


def _parse_storage(c: Collector, raw: dict) -> StorageSettings:
    sraw = _section(c, raw, "storage", "storage", StorageSettings)
    if "storage" not in raw:
        c.bad("storage", "required, missing (bucket, endpoint, ...)")
    v = read_values(c, StorageSettings, sraw, "storage", skip=("bucket",))
    if v["endpoint"] and not re.match(r"^https?://[^/\s]+", v["endpoint"]):
        c.bad("storage.endpoint", f"expected an http:// or https:// URL, got {v['endpoint']!r}")
    v["prefix"] = (v["prefix"] or "").strip("/")
    bucket = c.str_(sraw, "bucket", "storage", required="storage" in raw)
    if bucket and not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", bucket):
        c.bad("storage.bucket", f"invalid bucket name {bucket!r}")
    storage = StorageSettings(bucket=bucket or "", **v, encryption=_parse_encryption(c, sraw))
    if bool(storage.access_key) != bool(storage.secret_key):
        c.bad("storage", "access_key and secret_key go together (or leave both out to use boto3's credential chain)")
    return storage


def _parse_encryption(c: Collector, sraw: dict) -> EncryptionSettings:
    path = "storage.encryption"
    eraw = _section(c, sraw, "encryption", path, EncryptionSettings)
    enc = EncryptionSettings(**read_values(c, EncryptionSettings, eraw, path))
    for v in (enc.key, *enc.old_keys):
        secrets.register(v)
    if enc.key and enc.key_file:
        c.bad(path, "set either key or key_file, not both")
    for where, v in [("key", enc.key)] + [(f"old_keys[{i}]", k) for i, k in enumerate(enc.old_keys)]:
        if v:
            from dbops.storage import keys  # only when a key is inline: the wal-push fast path parses this too

            problem = keys.key_problem(v)
            if problem:
                c.bad(f"{path}.{where}", problem)
    if (enc.old_keys or enc.old_key_files) and not enc.enabled and not enc.allow_plaintext:
        c.bad(path, "old_keys without a current key would write new objects unencrypted into an encrypted "
                    "archive; set key (or key_file), or allow_plaintext: true to decrypt-migrate on purpose")
    return enc


def _parse_compression(c: Collector, raw: dict) -> CompressionSettings:
    craw = _section(c, raw, "compression", "compression", CompressionSettings)
    return CompressionSettings(**read_values(c, CompressionSettings, craw, "compression"))


def _parse_runtime(c: Collector, raw: dict) -> RuntimeSettings:
    rraw = _section(c, raw, "runtime", "runtime", RuntimeSettings)
    v = read_values(c, RuntimeSettings, rraw, "runtime", skip=("engine",))
    default = ENGINE_OF_A_RUNTIME_SECTION if rraw else RuntimeSettings.engine
    choices = _rule(next(f for f in fields(RuntimeSettings) if f.name == "engine")).choices
    runtime = RuntimeSettings(engine=c.str_(rraw, "engine", "runtime", default, choices=choices), **v)
    if runtime.engine != "none" and not (runtime.image or runtime.rootfs):
        c.bad("runtime", f"engine {runtime.engine} needs an image (e.g. postgres:15) or a rootfs (e.g. /)")
    if runtime.image and runtime.rootfs:
        c.bad("runtime", "set either image or rootfs, not both")
    return runtime


def _parse_archive(c: Collector, raw: dict) -> ArchiveSettings:
    araw = _section(c, raw, "archive", "archive", ArchiveSettings)
    return ArchiveSettings(**read_values(c, ArchiveSettings, araw, "archive"))


def _parse_validation(c: Collector, braw: dict) -> ValidationSettings:
    vraw = _section(c, braw, "validation", "backup.validation", ValidationSettings)
    assertions: list[Assertion] = []
    ras = vraw.get("assertions") or []
    if not isinstance(ras, list):
        c.bad("backup.validation.assertions", "expected a list of {name, sql, database}")
        ras = []
    for i, ra in enumerate(ras):
        p = f"backup.validation.assertions[{i}]"
        ra = c.mapping(ra, p)
        c.unknown(ra, p, allowed_keys(Assertion))
        av = read_values(c, Assertion, ra, p)
        if av["sql"]:
            assertions.append(Assertion(name=c.str_(ra, "name", p, f"assertion {i + 1}"), **av))
    return ValidationSettings(assertions=tuple(assertions), **read_values(c, ValidationSettings, vraw, "backup.validation"))


def _parse_retention(c: Collector, braw: dict) -> RetentionSettings:
    traw = _section(c, braw, "retention", "backup.retention", RetentionSettings)
    keep_within = RetentionSettings.keep_within
    if traw.get("keep_within") is not None:
        keep_within = parse_duration(traw["keep_within"])
        if keep_within is None:
            c.bad("backup.retention.keep_within", f"expected a duration like 14d or 12h, got {traw['keep_within']!r}")
    retention = RetentionSettings(keep_within=keep_within, **read_values(c, RetentionSettings, traw, "backup.retention"))
    if retention.auto and retention.keep_last is None and retention.keep_within is None:
        c.bad("backup.retention.auto", "needs a policy to apply: set keep_last and/or keep_within")
    return retention


def _parse_backup(c: Collector, raw: dict, nodes: list[Node]) -> BackupSettings:
    braw = _section(c, raw, "backup", "backup", BackupSettings)
    validation = _parse_validation(c, braw)
    retention = _parse_retention(c, braw)
    v = read_values(c, BackupSettings, braw, "backup")
    if v["chunk_size"] % 8192:
        c.bad("backup.chunk_size", "must be a multiple of 8192 (PostgreSQL's page size)")
    if v["pack_size"] > MAX_PACK_SIZE:
        c.bad("backup.pack_size", f"must be at most 4GiB ({MAX_PACK_SIZE} bytes): S3 stores a pack with one PUT, "
                                  "which it refuses above 5 GiB")
    backup = BackupSettings(validation=validation, retention=retention, **v)
    if backup.source and nodes and backup.source not in {n.name for n in nodes}:
        c.bad("backup.source", f"no node named {backup.source!r} (known: {', '.join(n.name for n in nodes)})")
    return backup


def _parse_failover(c: Collector, raw: dict) -> FailoverSettings:
    fraw = _section(c, raw, "failover", "failover", FailoverSettings)
    pgb = None
    if fraw.get("pgbouncer") is not None:
        praw = _section(c, fraw, "pgbouncer", "failover.pgbouncer", PgBouncerSettings)
        pgb = PgBouncerSettings(**read_values(c, PgBouncerSettings, praw, "failover.pgbouncer"))
    return FailoverSettings(pgbouncer=pgb, **read_values(c, FailoverSettings, fraw, "failover"))


def parse(raw: Any, env: dict[str, str] | None = None, path: str | None = None) -> Config:
    """Turn a raw YAML document into a Config, or raise ConfigError listing every problem."""
    env = dict(os.environ if env is None else env)
    c = Collector()
    if not isinstance(raw, dict):
        raise ConfigError(
            "the configuration must be a YAML mapping",
            detail=f"got {type(raw).__name__} in {path or '<config>'}",
        )
    raw = interpolate(raw, env, c.problems)
    c.unknown(raw, "", TOP_LEVEL)
    cluster = c.str_(raw, "cluster", "", required=True)
    if cluster is not None and not _NAME_RE.match(cluster):
        c.bad("cluster", f"invalid cluster name {cluster!r} (letters, digits, _ . -)")
    nodes = _parse_nodes(c, raw)
    storage = _parse_storage(c, raw)
    compression = _parse_compression(c, raw)
    runtime = _parse_runtime(c, raw)
    archive = _parse_archive(c, raw)
    backup = _parse_backup(c, raw, nodes)
    failover = _parse_failover(c, raw)
    if c.problems:
        where = path or "<config>"
        n = len(c.problems)
        raise ConfigError(
            f"invalid configuration {where}: {n} problem{'s' if n != 1 else ''}",
            problems=c.problems,
            hint="fix every listed key; `dbops config check` re-validates",
        )
    cfg = Config(cluster=cluster or "", nodes=tuple(nodes), storage=storage, compression=compression,
                 runtime=runtime, archive=archive, backup=backup, failover=failover, path=path)
    register_secrets(cfg)
    return cfg


# --------------------------------------------------------------------------- secrets, files


def _secret_values(obj: Any) -> Iterator[str]:
    """Every non-empty value of a field marked secret, anywhere in the configuration."""
    if is_dataclass(obj):
        for f in fields(obj):
            v = getattr(obj, f.name)
            if (r := _rule(f)) and r.secret:
                if isinstance(v, (list, tuple)):
                    yield from (x for x in v if x)
                elif v:
                    yield v
            else:
                yield from _secret_values(v)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _secret_values(x)


def register_secrets(cfg: Config) -> None:
    for v in _secret_values(cfg):
        secrets.register(v)


def redacted(cfg: Config) -> dict:
    """The effective configuration as plain data, with every secret replaced."""

    def walk(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: ("***" if (r := _rule(f)) and r.secret and getattr(v, f.name)
                             else walk(getattr(v, f.name))) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(cfg)


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
