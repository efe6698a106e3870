"""pg_auto_failover's automatic failover, measured the way bench_lost measures `--primary-lost`.

    python bench/pgaf_peer.py [--runs 3] [--dir DIR]

A monitor and two data nodes (Debian's pg-auto-failover-cli + postgresql-15-auto-failover),
each `pg_autoctl run` as the postgres OS user, on loopback. Each run: a writer commits through a
libpq multi-host string (target_session_attrs=read-write); the primary node's keeper and its
PostgreSQL get SIGKILL (every process of that `pg_autoctl run`); measured: seconds from the kill to
the first acknowledged commit on the other node, acknowledged commits missing afterwards, client
errors. Then the killed node's keeper is started again and rejoins as secondary. Prints one JSON
object; {"skipped": ...} when pg_autoctl is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from writer_probe import Writer, prepare  # noqa: E402

PG_BIN = "/usr/lib/postgresql/15/bin"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, d: Path):
        self.d = d
        self.env = {**os.environ, "PATH": f"{PG_BIN}:{os.environ.get('PATH', '')}",
                    "XDG_CONFIG_HOME": str(d / "xdg-config"), "XDG_DATA_HOME": str(d / "xdg-data"),
                    "XDG_RUNTIME_DIR": str(d / "xdg-run"), "PG_REGRESS_SOCK_DIR": str(d)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def _argv(self, *args: str) -> list[str]:
        pre = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return [*pre, "env", *[f"{k}={self.env[k]}" for k in ("PATH", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
                                                                "XDG_RUNTIME_DIR")], "pg_autoctl", *args]

    def ctl(self, *args: str, timeout: float = 300) -> str:
        res = subprocess.run(self._argv(*args), capture_output=True, text=True, timeout=timeout, cwd=self.d)
        if res.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args)}: {res.stderr[-2000:]}")
        return res.stdout

    def run(self, name: str) -> None:
        log = open(self.d / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(self._argv("run", "--pgdata", str(self.d / name)), stdout=log,
                                            stderr=log, cwd=self.d, start_new_session=True)

    def monitor_uri(self) -> str:
        return f"postgres://autoctl_node@127.0.0.1:{self.ports['monitor']}/pg_auto_failover?sslmode=disable"

    def create(self) -> None:
        for sub in ("xdg-config", "xdg-data", "xdg-run"):
            (self.d / sub).mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.d)], check=True)
        self.ports["monitor"] = _port()
        self.ctl("create", "monitor", "--pgdata", str(self.d / "monitor"), "--pgport", str(self.ports["monitor"]),
                 "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--pgctl", f"{PG_BIN}/pg_ctl")
        self.run("monitor")
        time.sleep(2)
        for name in ("node_a", "node_b"):
            self.ports[name] = _port()
            self.ctl("create", "postgres", "--pgdata", str(self.d / name), "--pgport", str(self.ports[name]),
                     "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", "--pgctl", f"{PG_BIN}/pg_ctl",
                     "--monitor", self.monitor_uri(), "--name", name, timeout=600)
            with open(self.d / name / "pg_hba.conf", "a") as f:
                f.write("host all all 127.0.0.1/32 trust\n")
            self.run(name)
            self.wait_states()

    def states(self) -> dict[str, str]:
        out = json.loads(self.ctl("show", "state", "--pgdata", str(self.d / "monitor"), "--json", timeout=30))
        # the JSON keys differ between pg_auto_failover versions
        return {str(n.get("node_name") or n.get("nodename")): str(n.get("reported_state") or
                                                                  n.get("current_group_state")) for n in out}

    def wait_states(self, timeout: float = 300) -> dict[str, str]:
        """Until every node reports primary or secondary, exactly one primary."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.states()
            except (RuntimeError, ValueError):
                st = {}
            vals = list(st.values())
            if vals and all(v in ("primary", "secondary", "single") for v in vals) and \
                    (vals.count("primary") == 1 or vals == ["single"]):
                return st
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_auto_failover did not settle: {st}")
            time.sleep(1)

    def conninfo(self) -> str:
        hosts = ",".join("127.0.0.1" for _ in ("node_a", "node_b"))
        ports = ",".join(str(self.ports[n]) for n in ("node_a", "node_b"))
        return (f"host={hosts} port={ports} user=postgres dbname=postgres target_session_attrs=read-write "
                "connect_timeout=2 application_name=writer_probe")

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        os.killpg(p.pid, signal.SIGKILL)  # the keeper, its services and PostgreSQL (one session)
        p.wait(timeout=30)

    def stop(self) -> None:
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def run(d: Path, runs: int) -> dict:
    if not shutil.which("pg_autoctl"):
        return {"bench": "pg_auto_failover_peer", "skipped": "pg_autoctl not installed (Debian: pg-auto-failover-cli "
                "postgresql-15-auto-failover)"}
    c = Cluster(d)
    try:
        c.create()
        import psycopg

        with psycopg.connect(c.conninfo(), autocommit=True) as conn:
            prepare(conn)
        results, next_id = [], 1
        for _ in range(runs):
            st = c.wait_states()
            primary = next(n for n, s in st.items() if s == "primary")
            w = Writer(c.conninfo(), start_id=next_id)
            w.start()
            try:
                w.wait_for_commits(500)
                c.kill9(primary)
                t_kill = time.monotonic()
                w.wait_for_commits(50, timeout=300)
            finally:
                w.stop()
            t_err = next((t for t, _ in w.errors if t >= t_kill), t_kill)  # an ack in flight at the kill
            first = next(t for _, t in w.acked if t > t_err)
            with psycopg.connect(c.conninfo(), autocommit=True) as conn:
                lost = len(w.lost(conn))
            results.append({"kill_to_first_write_seconds": round(first - t_kill, 3), "lost": lost,
                            "client_errors": len(w.errors_since(t_kill))})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            next_id = w.next_id
            c.run(primary)  # the keeper comes back; the node rejoins as secondary
        firsts = [r["kill_to_first_write_seconds"] for r in results]
        return {"bench": "pg_auto_failover_peer", "version": c.ctl("--version").splitlines()[0], "runs": runs,
                "kill_to_first_write_seconds": {"p50": round(statistics.median(firsts), 3), "max": max(firsts),
                                                "runs": firsts},
                "lost_commits": [r["lost"] for r in results],
                "client_errors": [r["client_errors"] for r in results]}
    finally:
        c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir")
    a = ap.parse_args()
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="dbops-bench-pgaf-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        print(json.dumps(run(d, a.runs)))
    finally:
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
