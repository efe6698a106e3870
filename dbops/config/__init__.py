"""Configuration: ``model`` (the typed, frozen settings, each default on its field) and ``parse``
(YAML with ${ENV} references into a Config, every problem reported at once).

Everything is importable from here: ``from dbops.config import Config, Node, load``.
"""

from dbops.config.model import (MAX_PACK_SIZE, ArchiveSettings, Assertion, BackupSettings, CompressionSettings, Config,
                                ContainerNodeSettings, EncryptionSettings, FailoverSettings, Node,
                                PgBouncerSettings, RetentionSettings, RuntimeSettings, SshSettings, StorageSettings, ValidationSettings)
from dbops.config.parse import (DEFAULT_PATHS, ENV_CONFIG, load, parse, redacted, register_secrets,
                                resolve_path)
from dbops.config.values import ENV_RE, interpolate, parse_duration, parse_size

__all__ = [
    "ArchiveSettings", "Assertion", "BackupSettings", "CompressionSettings", "Config", "ContainerNodeSettings",
    "EncryptionSettings", "FailoverSettings", "Node", "PgBouncerSettings", "RetentionSettings", "RuntimeSettings", "SshSettings",
    "StorageSettings", "ValidationSettings", "MAX_PACK_SIZE",
    "DEFAULT_PATHS", "ENV_CONFIG", "load", "parse", "redacted", "register_secrets", "resolve_path",
    "ENV_RE", "interpolate", "parse_duration", "parse_size",
]
