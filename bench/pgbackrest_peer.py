"""pgBackRest on the same database, for side-by-side figures in `make bench`.

The peer gets its own S3 server: a second SeaweedFS (`weed mini`) with HTTPS on free loopback
ports and a self-signed certificate (pgBackRest talks to S3 over HTTPS only), its own bucket and
keys, everything under LAB/pgbackrest-peer/. The server runs only while a benchmark runs; its
data folder and keys stay, so `bench_restore` finds what `bench_backup` stored.

pgBackRest runs as the `postgres` OS user with zstd level 3, process-max 2 and start-fast. Its
configuration (with the S3 keys: never in argv) is a 0600 file owned by postgres in a private
0700 folder. Two ways to feed it WAL:

- ``own_wal=True`` (as its users run it; the scale sweep): with ``archiving(lab, peer)`` the
  primary's archive_command runs `dbops wal-push %p && pgbackrest archive-push %p`, pgBackRest's
  push asynchronous (archive-async=y, its spool folder), its backups check that their WAL arrived
  (archive-check=y), and its restores fetch WAL with its own asynchronous `archive-get` (the
  restore_command pgBackRest writes itself);
- ``own_wal=False`` (the second line): the lab's `dbops wal-push` archive only; pgBackRest neither
  checks nor copies WAL (archive-check=n, archive-copy=n) and a restore replays the dbops archive
  through `dbops wal-fetch`: both tools replay the same WAL.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets as pysecrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dbops.lab import harness as labmod
from dbops import proc
from dbops.errors import CommandError, DbopsError
from dbops.pg import binaries

PEER_DIR = "pgbackrest-peer"
STANZA = "bench"
BUCKET = "pgbackrest"
REPO_PATH = "/repo"
PG_USER = "postgres"

#: What the peer is configured with; every result carries it.
SETTINGS = {
    "repo": "s3 (SeaweedFS weed mini, https, self-signed, repo1-storage-verify-tls=n)",
    "compress-type": "zst",
    "compress-level": 3,
    "process-max": 2,
    "start-fast": True,
    "archive-copy": False,
}
OWN_WAL = {"archive-async": True, "archive-check": True,
           "wal": "its own async archive-push (after dbops wal-push in archive_command); restores use its own "
                  "async archive-get"}
DBOPS_WAL = {"archive-check": False,
             "wal": "archived by the lab's dbops wal-push; restores replay it through dbops wal-fetch"}

PgbenchFn = Callable[..., str]


def available() -> bool:
    """True when the pgbackrest command is installed."""
    return shutil.which("pgbackrest") is not None


# --------------------------------------------------------------------------- files and folders


def _pg_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(PG_USER)
    return pw.pw_uid, pw.pw_gid


def _mkdir(path: Path, mode: int, postgres: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if postgres and os.geteuid() == 0:
        os.chown(path, *_pg_ids())
    return path


def _write_private(path: Path, text: str, postgres: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    if postgres and os.geteuid() == 0:
        os.chown(path, *_pg_ids())


def _keys(root: Path) -> tuple[str, str]:
    """The peer S3 server's access key and secret (made once, kept in a 0600 file)."""
    path = root / "s3-keys"
    if path.exists():
        ak, sk = path.read_text().split()
        return ak, sk
    ak, sk = "pgbr" + pysecrets.token_hex(6), pysecrets.token_urlsafe(24)
    _write_private(path, f"{ak}\n{sk}\n", postgres=False)
    return ak, sk


def _certificate(root: Path) -> tuple[Path, Path]:
    cert, key = root / "tls-cert.pem", root / "tls-key.pem"
    if not (cert.exists() and key.exists()):
        proc.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                  "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                  "-keyout", str(key), "-out", str(cert)], timeout=60)
        os.chmod(key, 0o600)
    return cert, key


def _lab_password(lab: labmod.LabInfo) -> str:
    return (lab.dir / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]


# --------------------------------------------------------------------------- the peer


@dataclass
class Peer:
    root: Path  # LAB/pgbackrest-peer (root-owned, 0755)
    private: Path  # postgres-owned, 0700: pgbackrest.conf, pgpass, logs, locks
    conf: Path
    env: dict[str, str]
    own_wal: bool = False

    def run(self, *args: str, timeout: float = 3600, rss: list[int] | None = None) -> proc.Result:
        """Run `pgbackrest --config=... --stanza=bench ARGS` as postgres. With ``rss``, under GNU time:
        the peak resident set (KiB) of its process tree is appended to that list."""
        argv = ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args]
        if rss is None:
            return proc.run(argv, user=PG_USER, env=self.env, timeout=timeout, what="pgbackrest " + args[0])
        out = self.private / "rss"
        r = proc.run(["/usr/bin/time", "-f", "%M", "-o", str(out), *argv], user=PG_USER, env=self.env,
                     timeout=timeout, what="pgbackrest " + args[0])
        rss.append(int(out.read_text().split()[-1]))
        return r

    def manifest_bytes(self, label: str) -> int | None:
        """Size of a backup's manifest in the repository (None when it cannot be listed)."""
        try:
            out = json.loads(self.run("repo-ls", "--output=json", f"backup/{STANZA}/{label}", timeout=120).stdout)
        except (CommandError, ValueError):
            return None
        sizes = [v.get("size", 0) for k, v in out.items() if k.startswith("backup.manifest") and not k.endswith("copy")]
        return sizes[0] if sizes else None

    def info(self) -> dict:
        out = json.loads(self.run("info", "--output=json", timeout=120).stdout)
        return next((s for s in out if s.get("name") == STANZA), {})


def _conf_text(lab: labmod.LabInfo, private: Path, port: int, keys: tuple[str, str], own_wal: bool = False) -> str:
    p = lab.primary
    wal = "archive-async=y\narchive-check=y\n" if own_wal else "archive-check=n\n"
    return f"""[global]
repo1-type=s3
repo1-path={REPO_PATH}
repo1-s3-endpoint=127.0.0.1
repo1-storage-port={port}
repo1-storage-verify-tls=n
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-bucket={BUCKET}
repo1-s3-key={keys[0]}
repo1-s3-key-secret={keys[1]}
repo1-retention-full=2
compress-type=zst
compress-level=3
process-max=2
start-fast=y
{wal}archive-copy=n
log-path={private / "log"}
lock-path={private / "lock"}
spool-path={private / "spool"}
log-level-console=warn
log-level-file=info

[{STANZA}]
pg1-path={p.data_dir}
pg1-port={p.port}
pg1-socket-path={lab.dir / "run"}
pg1-user={p.user}
"""


def _start_s3(root: Path, keys: tuple[str, str], taken: set[int]):
    """Start `weed mini` with HTTPS on free ports; returns (process, https port)."""
    cert, key = _certificate(root)
    https = labmod.free_port(None, taken)
    ports = {"s3.port.https": https}
    for k in ("s3.port", "master.port", "volume.port", "filer.port", "admin.port", "s3.port.iceberg",
              "s3.port.lance", "master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc",
              "admin.port.grpc"):
        ports[k] = labmod.free_port(None, taken)
    data = _mkdir(root / "s3", 0o755, postgres=False)
    argv = [str(Path(sys.executable).parent / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-bucket={BUCKET}", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", f"-s3.cert.file={cert}", f"-s3.key.file={key}"]
    argv += [f"-{k}={v}" for k, v in ports.items()]
    with open(root / "s3.log", "ab") as logf:
        p = proc.spawn(argv, env={"AWS_ACCESS_KEY_ID": keys[0], "AWS_SECRET_ACCESS_KEY": keys[1]},
                       cwd=str(root), stdout=logf, stderr=logf)
    return p, https


def _wait_repo(peer: Peer, server, timeout: float = 60.0) -> None:
    """Wait until pgBackRest itself can list the repository (HTTPS up, keys known, bucket made)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DbopsError(f"the peer S3 server exited with status {server.returncode}",
                             hint=f"see {peer.root / 's3.log'}")
        try:
            peer.run("repo-ls", timeout=30)
            return
        except CommandError as e:
            last = e
            time.sleep(0.5)
    raise DbopsError("the peer S3 server did not answer pgBackRest within 60 s",
                     detail=str(last), hint=f"see {peer.root / 's3.log'} and {peer.private / 'log'}")


def session(lab: labmod.LabInfo, own_wal: bool = False):
    """The peer (S3 server running, pgBackRest configured) for a `with` block."""
    return _peer(lab, own_wal)


@contextmanager
def archiving(lab: labmod.LabInfo, peer: Peer) -> Iterator[None]:
    """The primary's archive_command also pushes every segment to pgBackRest (after dbops has it),
    as long as the block runs; the lab's own command is put back afterwards."""
    from dbops.pg import conn as pgconn

    push = f"pgbackrest --config={peer.conf} --stanza={STANZA} archive-push %p"
    with pgconn.session(lab.primary) as c:
        before = pgconn.scalar(c, "SHOW archive_command")
        both = f"{before} && {push}".replace("'", "''")
        c.execute(f"ALTER SYSTEM SET archive_command = '{both}'")
        pgconn.scalar(c, "SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with pgconn.session(lab.primary) as c:
            c.execute("ALTER SYSTEM RESET archive_command")
            pgconn.scalar(c, "SELECT pg_reload_conf()")


def backup(peer: Peer, kind: str, rss: list[int] | None = None) -> tuple[float, dict]:
    """(wall seconds, pgBackRest's info record) of one backup of the given type."""
    return _backup(peer, kind, rss)


@contextmanager
def _peer(lab: labmod.LabInfo, own_wal: bool = False) -> Iterator[Peer]:
    """The peer's S3 server running and pgBackRest configured against it and the lab's primary."""
    root = _mkdir(lab.dir / PEER_DIR, 0o755, postgres=False)
    private = _mkdir(root / "pgbackrest", 0o700, postgres=True)
    for sub in ("log", "lock", "spool"):
        _mkdir(private / sub, 0o700, postgres=True)
    keys = _keys(root)
    taken = {lab.primary.port, *(r.port for r in lab.replicas)}
    server, port = _start_s3(root, keys, taken)
    try:
        conf = private / "pgbackrest.conf"
        _write_private(conf, _conf_text(lab, private, port, keys, own_wal), postgres=True)
        # libpq matches a socket connection in a non-default folder by its path: a wildcard line.
        pgpass = private / "pgpass"
        _write_private(pgpass, f"*:*:*:{lab.primary.user}:{_lab_password(lab)}\n", postgres=True)
        peer = Peer(root=root, private=private, conf=conf, env={"PGPASSFILE": str(pgpass)}, own_wal=own_wal)
        _wait_repo(peer, server)
        peer.run("stanza-create", timeout=300)
        yield peer
    finally:
        proc.stop(server)


def _settings(own_wal: bool = False) -> dict:
    return {"version": proc.run(["pgbackrest", "version"], timeout=30).stdout.strip(), **SETTINGS,
            **(OWN_WAL if own_wal else DBOPS_WAL)}


# --------------------------------------------------------------------------- backup


def _backup(peer: Peer, kind: str, rss: list[int] | None = None) -> tuple[float, dict]:
    t0 = time.monotonic()
    peer.run("backup", f"--type={kind}", rss=rss)
    wall = time.monotonic() - t0
    backups = peer.info().get("backup") or []
    if not backups or backups[-1].get("type") != kind:
        raise DbopsError(f"pgBackRest reported no new {kind} backup", detail=json.dumps(backups[-1:]))
    return wall, backups[-1]


def _record(bench: str, wall: float, b: dict, settings: dict) -> dict:
    return {"bench": bench, "tool": "pgbackrest", "wall_seconds": round(wall, 2),
            "stored_bytes": b["info"]["repository"]["delta"], "logical_bytes": b["info"]["size"],
            "changed_bytes": b["info"]["delta"], "label": b["label"], "type": b["type"], "config": settings}


def bench_backup(lab: labmod.LabInfo, pgbench: PgbenchFn, pgbench_seconds: int) -> list[dict]:
    """A full backup of the lab's primary, pgbench for pgbench_seconds, then an incremental.

    stored_bytes is what pgBackRest added to the repository for that backup
    (`info`: backup.info.repository.delta); logical_bytes the database size it covers.
    """
    settings = _settings()
    with _peer(lab) as peer:
        full_wall, full = _backup(peer, "full")
        pgbench(lab, "-c", "4", "-j", "2", "-T", str(pgbench_seconds), "-n")
        incr_wall, incr = _backup(peer, "incr")
    return [_record("backup_full", full_wall, full, settings),
            _record("backup_incremental", incr_wall, incr, settings)]


# --------------------------------------------------------------------------- restore


def _target(target_time: float) -> str:
    """An epoch time as recovery_target_time accepts it (UTC, milliseconds)."""
    return datetime.fromtimestamp(target_time, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "+00"


def _pg_ctl(data: Path, *args: str, timeout: float = 120, check: bool = True) -> proc.Result:
    return proc.run([binaries.binary("pg_ctl"), "-D", str(data), *args], user=PG_USER, timeout=timeout,
                    check=check)


def _wait_promoted(peer: Peer, data: Path, port: int, log: Path, timeout: float = 3600) -> None:
    """Wait until the restored server accepts connections and is out of recovery."""
    psql = [binaries.binary("psql"), "-h", str(peer.private), "-p", str(port), "-U", PG_USER, "-d", "postgres",
            "-XAtqc", "SELECT pg_is_in_recovery()"]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = proc.run(psql, user=PG_USER, env=peer.env, timeout=30, check=False)
        if r.returncode == 0 and r.stdout.strip() == "f":
            return
        if time.monotonic() - t0 > 5 and _pg_ctl(data, "status", check=False).returncode != 0:
            raise DbopsError("the restored pgBackRest copy stopped before it was promoted", hint=f"see {log}")
        time.sleep(0.1)
    raise DbopsError(f"the restored pgBackRest copy was not promoted within {timeout:.0f} s", hint=f"see {log}")


def bench_restore(lab: labmod.LabInfo, target_time: float | None = None, rss: list[int] | None = None) -> dict:
    """Restore the latest pgBackRest backup (or, with target_time, the one pgBackRest picks for it)
    into a fresh folder, start it on a free port and wait until it is promoted, replaying the dbops
    archive through `dbops wal-fetch` (a peer session of its own; see ``restore``)."""
    with _peer(lab) as peer:
        return restore(peer, lab, target_time, rss)


def restore(peer: Peer, lab: labmod.LabInfo, target_time: float | None = None, rss: list[int] | None = None,
            wal: str | None = None) -> dict:
    """Restore with a running peer; started and promoted, then stopped and removed.

    ``wal``: "pgbackrest" (its own async archive-get, the restore_command it writes itself; the
    default for a peer with its own WAL) or "dbops" (`dbops wal-fetch` from the lab's archive).
    Phases: `download` is `pgbackrest restore`; `start_replay` is start, WAL replay and promotion.
    """
    wal = wal or ("pgbackrest" if peer.own_wal else "dbops")
    settings = _settings(wal == "pgbackrest")
    data = peer.private / "restore"
    shutil.rmtree(data, ignore_errors=True)
    _mkdir(data, 0o700, postgres=True)
    args = ["restore", f"--pg1-path={data}"]
    if wal == "dbops":
        args.append(f"--recovery-option=restore_command={labmod.dbops_executable()} -c {lab.config_path} "
                    "wal-fetch %f %p")
    if target_time is not None:
        args += ["--type=time", f"--target={_target(target_time)}", "--target-action=promote"]
    log = peer.private / "restore.log"
    log.unlink(missing_ok=True)
    started = False
    try:
        t0 = time.monotonic()
        peer.run(*args, rss=rss)
        download = time.monotonic() - t0
        port = labmod.free_port(None, {lab.primary.port, *(r.port for r in lab.replicas)})
        # A private copy: its own port and socket folder, and it must never archive into the lab.
        with open(data / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{peer.private}'\n"
                    "archive_mode = off\nhot_standby = on\n")
        t1 = time.monotonic()
        _pg_ctl(data, "-l", str(log), "-W", "start")
        started = True
        _wait_promoted(peer, data, port, log)
        start_replay = time.monotonic() - t1
    finally:
        if started:
            _pg_ctl(data, "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(data, ignore_errors=True)
    return {"bench": "restore", "tool": "pgbackrest", "wall_seconds": round(download + start_replay, 2),
            "phases": {"download": round(download, 2), "start_replay": round(start_replay, 2)}, "wal": wal,
            "target_time": _target(target_time) if target_time is not None else None, "config": settings}
