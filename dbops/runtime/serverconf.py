"""A throwaway instance's server settings and the files generated for it (see :mod:`dbops.runtime.base`):
its run folder, the private folder of its Unix socket, ``pg_hba.conf``, and every ``-c`` setting."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

from dbops.runtime.base import InstanceSpec, Owner, safe_name
from dbops.runtime.walfolder import restore_command

SOCKET_PATH_MAX = 90  # a Unix socket path has room for 107 bytes; ".s.PGSQL.65535" takes 15 of them
HBA_FILE = "pg_hba.conf"
IDENT_FILE = "pg_ident.conf"
CONF_FILE = "postgresql.conf"

SAFE_DEFAULTS: Mapping[str, str] = {"archive_mode": "off", "primary_conninfo": ""}


def prepare_run_dir(spec: InstanceSpec, owner: Owner) -> tuple[Path, bool]:
    """The instance's run folder (created when the spec names none), owned by the server's user.

    Returns (path, created): a folder created here is removed with the instance.
    """
    if spec.run_dir is not None:
        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        created = False
    else:
        parent = Path(spec.data_dir).resolve().parent
        run_dir = Path(tempfile.mkdtemp(prefix=f".dbops-run-{safe_name(spec.name)}-", dir=parent))
        created = True
    os.chmod(run_dir, 0o700)
    owner.chown(run_dir)
    return run_dir, created


def socket_dir(run_dir: Path, owner: Owner) -> tuple[Path, bool]:
    """The private folder for the server's Unix socket: run_dir (mode 0700, the server user's) when its
    path is short enough for a socket, else a new private folder under the temp folder.

    Returns (path, created): a folder created here is removed with the instance.
    """
    run_dir = run_dir.resolve()
    if len(str(run_dir)) <= SOCKET_PATH_MAX:
        return run_dir, False
    d = Path(tempfile.mkdtemp(prefix="dbops-sock-"))
    os.chmod(d, 0o700)
    owner.chown(d)
    return d, True


def server_settings(spec: InstanceSpec, run_dir: Path, *, wal_path: str | None, run_path: str, owner: Owner,
                    socket_path: str, port: int | None = None) -> dict[str, str]:
    """Every ``-c`` setting for the server, writing the generated files into run_dir.

    ``wal_path`` / ``run_path`` / ``socket_path`` are the folders as the server sees them; ``port``
    is the port inside (default: the spec's), which names the socket file.
    """
    settings: dict[str, str] = dict(SAFE_DEFAULTS)
    if wal_path is not None:
        settings["restore_command"] = restore_command(wal_path, spec.wal_linked)
    settings.update(spec.settings)
    settings.update({
        "port": str(port or spec.port),
        "listen_addresses": "",
        "unix_socket_directories": socket_path,
        "unix_socket_permissions": "0700",
        "logging_collector": "off",
        "log_destination": "stderr",
    })
    data_dir = Path(spec.data_dir)
    if not (data_dir / CONF_FILE).exists():
        _write(run_dir / CONF_FILE, "# dbops: the data folder has no postgresql.conf; built-in defaults apply\n", owner)
        settings["config_file"] = f"{run_path}/{CONF_FILE}"
    if spec.trust_local:
        lines = ["# dbops: a throwaway instance, reachable only on its Unix socket in a private folder",
                 "local all all trust"]
        _write(run_dir / HBA_FILE, "\n".join(lines) + "\n", owner)
        settings["hba_file"] = f"{run_path}/{HBA_FILE}"
        if not (data_dir / IDENT_FILE).exists():
            _write(run_dir / IDENT_FILE, "", owner)
            settings["ident_file"] = f"{run_path}/{IDENT_FILE}"
    return settings


def setting_args(settings: Mapping[str, str]) -> list[str]:
    """``-c k=v`` arguments, in a stable order."""
    out: list[str] = []
    for k in sorted(settings):
        out += ["-c", f"{k}={settings[k]}"]
    return out


def remove_run_dir(run_dir: Path, created: bool, sock_dir: Path | None = None, sock_created: bool = False) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
    if sock_dir is not None and sock_created:
        shutil.rmtree(sock_dir, ignore_errors=True)

def _write(path: Path, text: str, owner: Owner) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)
    owner.chown(path)

