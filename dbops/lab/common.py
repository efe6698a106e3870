"""What the lab's parts share: the OS user its servers run as, its folder's state file and private
files (S3 keys, the PostgreSQL password), free loopback ports, and a process's command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dbops import proc


PG_USER = "postgres"

STATE_FILE = "lab.json"

PORT_CEILING = 55000  # lab ports stay below it, so the +10000 grpc offsets stay valid


def free_port(preferred: int | None = None, taken: set[int] | None = None, below: int = PORT_CEILING) -> int:
    """The preferred port if free, else any free port below `below` (so +10000 grpc offsets stay valid)."""
    return proc.free_port(preferred, taken, below)


def run_user() -> str | None:
    """The OS user the lab's PostgreSQL commands run as: postgres when we are root, else ourselves."""
    return PG_USER if os.geteuid() == 0 else None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def load_state(d: Path) -> dict:
    try:
        return json.loads((d / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def save_state(d: Path, state: dict) -> None:
    tmp = d / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, d / STATE_FILE)


def read_credentials(d: Path) -> tuple[str, str] | None:
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


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    proc.chown_to(path, PG_USER)
