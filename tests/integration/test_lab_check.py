"""`dbops lab` and `dbops check` against a real lab (SeaweedFS + PostgreSQL primary and replica)."""

import json
import subprocess
from pathlib import Path

import pytest

from dbops import proc
from dbops.pg import binaries

pytestmark = pytest.mark.integration


def _ps_args() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_lab_is_green(lab, cli):
    r = cli(["-c", lab.config_path, "check", "--json"])
    report = json.loads(r.stdout)
    assert r.exit_code == 0, r
    assert report["ok"] is True
    roles = {n["name"]: (n["role"], n["upstream"]) for n in report["nodes"]}
    assert roles == {"pg1": ("primary", None), "pg2": ("standby", "pg1")}
    pg1 = next(n for n in report["nodes"] if n["name"] == "pg1")
    assert pg1["archive_uses_dbops"] and pg1["data_checksums"] and pg1["wal_level"] == "replica"
    assert report["storage"]["reachable"] is True
    assert abs(report["storage"]["clock_skew_seconds"]) < 30


def test_lab_env_and_status(lab, cli):
    r = cli(["lab", "env", "--dir", str(lab.dir)])
    assert r.exit_code == 0
    assert f"export DBOPS_CONFIG={lab.config_path}" in r.stdout
    assert f"export PGPORT={lab.primary.port}" in r.stdout
    r = cli(["lab", "status", "--dir", str(lab.dir), "--json"])
    st = json.loads(r.stdout)
    assert st["s3"]["running"] and all(n["running"] for n in st["nodes"])


def test_no_secret_in_process_list_logs_or_config(lab, cli):
    pg_password = (lab.dir / "pgpass").read_text().splitlines()[0].rsplit(":", 1)[1]
    args = _ps_args()
    assert lab.secret_key not in args and pg_password not in args
    r = cli(["-c", lab.config_path, "-vv", "--log-format", "json", "check", "--skip-runtime"])
    assert r.exit_code == 0, r
    r2 = cli(["-c", lab.config_path, "config", "show"])
    for text in (r.output, r2.output, Path(lab.config_path).read_text()):
        assert lab.secret_key not in text and pg_password not in text


def test_check_names_each_problem(make_lab, cli, tmp_path):
    lab = make_lab(replicas=1)
    # 1. a wrong S3 secret
    bad_creds = tmp_path / "bad-credentials"
    bad_creds.write_text(f"[default]\naws_access_key_id = {lab.access_key}\naws_secret_access_key = wrong-secret-abc\n")
    bad_cfg = tmp_path / "dbops.yaml"
    bad_cfg.write_text(Path(lab.config_path).read_text().replace(str(lab.dir / "s3-credentials"), str(bad_creds)))
    r = cli(["-c", str(bad_cfg), "check", "--skip-runtime"])
    assert r.exit_code == 11, r
    assert "[FAIL] storage" in r.stdout and "SignatureDoesNotMatch" in r.stdout  # wrong secret, right key id
    assert "check the access key and secret key" in r.stdout
    assert "wrong-secret-abc" not in r.output

    # 2. the replica stopped
    replica = lab.replicas[0]
    proc.run([binaries.binary("pg_ctl"), "-D", replica.data_dir, "-m", "fast", "-w", "stop"], user="postgres")
    # 3. archive_mode off on the primary
    pdata = lab.primary.data_dir
    with open(Path(pdata) / "postgresql.auto.conf", "a") as f:
        f.write("archive_mode = off\n")
    proc.run([binaries.binary("pg_ctl"), "-D", pdata, "-m", "fast", "-w", "restart", "-l",
              str(lab.dir / "logs" / "pg1.log")], user="postgres")
    r = cli(["-c", lab.config_path, "check", "--skip-runtime", "--json"])
    assert r.exit_code == 11
    report = json.loads(r.stdout)
    fails = {(f["area"], f["check"]): f for f in report["findings"] if f["status"] == "fail"}
    assert ("node:pg2", "reachable") in fails and "start PostgreSQL" in fails[("node:pg2", "reachable")]["fix"]
    assert ("node:pg1", "archive_mode") in fails and "archive_mode = on" in fails[("node:pg1", "archive_mode")]["fix"]
    assert report["ok"] is False


def test_check_names_a_database_locale_the_throwaway_instance_lacks(make_lab, cli, monkeypatch):
    """A database created with en_US.UTF-8 (the primary has it through LOCPATH, as another host
    would have it installed); the throwaway instance (this host's root filesystem in podman, which
    has only C/POSIX) lacks it: `dbops check` fails and names the locale and the database."""
    from dbops.nodes import open_controller
    from dbops.pg import conn as pgconn

    lab = make_lab(replicas=0)
    locdir = lab.dir / "locales"  # the lab's folder: the postgres OS user can reach it
    locdir.mkdir(mode=0o755)
    subprocess.run(["localedef", "-i", "en_US", "-f", "UTF-8", str(locdir / "en_US.UTF-8")], check=True,
                   capture_output=True, timeout=120)
    r = cli(["-c", lab.config_path, "check", "--json"])
    findings = {(f["area"], f["check"]): f for f in json.loads(r.stdout)["findings"]}
    assert findings[("runtime", "locales")]["status"] == "ok", findings[("runtime", "locales")]

    monkeypatch.setenv("LOCPATH", str(locdir))
    ctl = open_controller(lab.primary)
    ctl.restart("fast", timeout=60)  # the server now finds en_US.UTF-8
    monkeypatch.delenv("LOCPATH")
    with pgconn.session(lab.primary) as c:
        c.execute("CREATE DATABASE shop TEMPLATE template0 LC_COLLATE 'en_US.UTF-8' LC_CTYPE 'en_US.UTF-8'")
    r = cli(["-c", lab.config_path, "check", "--json"])
    assert r.exit_code == 11, r
    report = json.loads(r.stdout)
    f = {(x["area"], x["check"]): x for x in report["findings"]}[("runtime", "locales")]
    assert f["status"] == "fail" and "en_US.UTF-8 (database shop)" in f["message"], f
    assert "locales-all" in f["fix"]
    assert report["runtime"]["locales"]["missing"] == {"en_US.UTF-8": ["shop"]}


def test_lab_s3_started_again_on_other_ports_when_its_port_is_taken_meanwhile(base_dir, monkeypatch, caplog):
    """The race behind "the S3 server exited with status 1": a port found free is taken before weed binds
    it (weed checks its ports and exits). The lab starts it again on fresh ports, says so, and stop_s3
    returns only once the server is gone."""
    import socket

    from dbops.lab import s3 as labs3

    d = base_dir / "s3-port-race"
    (d / "logs").mkdir(parents=True)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        real = proc.port_free
        monkeypatch.setattr(proc, "port_free", lambda p: True if p == port else real(p))  # free when checked
        state = {"s3": {"port": port}}
        with caplog.at_level("WARNING", logger="dbops.lab"):
            labs3.start_s3(d, state, set())
    pid = state["s3"]["pid"]
    try:
        assert state["s3"]["port"] != port and labs3.running(pid)
        assert "exited while starting (attempt 1 of 3" in caplog.text and str(port) in caplog.text, caplog.text
    finally:
        assert labs3.stop_s3(pid)
    assert not labs3.running(pid) and real(state["s3"]["port"])
