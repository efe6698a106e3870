"""The CLI boundary: exit codes for usage and configuration errors, secrets kept out of output."""

import textwrap

from dbops.errors import EXIT_CODE_DOC, ExitCode


def test_exit_codes_are_documented_and_below_126():
    assert set(EXIT_CODE_DOC) == set(ExitCode)
    assert all(0 <= int(c) < 126 for c in ExitCode)
    assert len({int(c) for c in ExitCode}) == len(ExitCode)


def test_usage_error_exit_2(cli):
    r = cli(["--no-such-option"])
    assert r.exit_code == 2
    r = cli(["config", "frobnicate"])
    assert r.exit_code == 2


def test_missing_config_exit_3(cli, tmp_path):
    r = cli(["-c", str(tmp_path / "none.yaml"), "config", "check"])
    assert r.exit_code == 3
    assert "does not exist" in r.stderr


def test_invalid_config_lists_all_problems(cli, tmp_path):
    p = tmp_path / "dbops.yaml"
    p.write_text(textwrap.dedent("""
        cluster: main
        nodes:
          - name: pg1
            port: seventy
            data_dir: /d
        storage:
          bucket: backups
          endpoint: ftp://nowhere
        compression: {level: 99}
    """))
    r = cli(["-c", str(p), "config", "check"])
    assert r.exit_code == 3
    assert "3 problems" in r.stderr
    for key in ("nodes[0].port", "storage.endpoint", "compression.level"):
        assert key in r.stderr


def test_config_show_redacts(cli, tmp_path):
    p = tmp_path / "dbops.yaml"
    p.write_text(textwrap.dedent("""
        cluster: main
        nodes:
          - {name: pg1, data_dir: /d, password: "${PGPW}"}
        storage: {bucket: bkt, access_key: "${AK}", secret_key: "${SK}"}
        runtime: {engine: none}
    """))
    env = {"PGPW": "pg-password-1234", "AK": "access-1234", "SK": "secret-key-98765"}
    r = cli(["-c", str(p), "-vv", "config", "show"], env=env)
    assert r.exit_code == 0, r
    for v in env.values():
        assert v not in r.output
    assert "***" in r.stdout
    r = cli(["-c", str(p), "config", "show", "--json"], env=env)
    assert r.exit_code == 0 and "secret-key-98765" not in r.output and '"cluster": "main"' in r.stdout


def test_version(cli):
    r = cli(["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("dbops ")


def test_shell_completion_completes_commands_and_options(dbops_bin, tmp_path):
    """Completion is on: the real console script answers bash's completion protocol and prints
    the script `--install-completion` would install."""
    import os
    import subprocess

    # a clean environment: what earlier tests of the session left in os.environ is not the user's shell
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8", "SHELL": "/bin/bash"}

    def complete(words: str) -> list[str]:
        env = {**base, "_DBOPS_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        r = subprocess.run([dbops_bin], env=env, capture_output=True, text=True, timeout=60, check=True)
        return r.stdout.split()

    assert complete("dbops ba") == ["backup"]
    assert {"list", "show", "prune"} <= set(complete("dbops backup "))
    assert complete("dbops backup --fu") == ["--full"]
    assert {"--progress", "--no-progress"} <= set(complete("dbops restore --"))
    # --show-completion takes no shell name: it detects the shell it runs in from its parent
    # processes (shellingham), so it is run from bash (under make or a detached job there may be none)
    r = subprocess.run(["bash", "-c", '"$0" --show-completion; status=$?; exit $status', dbops_bin],
                       capture_output=True, text=True, timeout=60, env=base, check=False)
    assert r.returncode == 0, r.stderr
    assert "_DBOPS_COMPLETE=complete_bash" in r.stdout and "complete " in r.stdout


def test_the_real_binary_flushes_its_output_and_keeps_exit_codes(dbops_bin, tmp_path):
    """A finished command ends without the interpreter's teardown (dbops.cli.entry.finish): its
    output to a pipe (block-buffered) arrives whole, and the documented exit codes stay."""
    import json
    import subprocess

    p = tmp_path / "dbops.yaml"
    p.write_text("cluster: main\nnodes:\n  - {name: pg1, data_dir: /d}\nstorage: {bucket: bkt}\nruntime: {engine: none}\n")
    r = subprocess.run([dbops_bin, "-c", str(p), "config", "show", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cluster"] == "main"
    r = subprocess.run([dbops_bin, "-c", str(tmp_path / "none.yaml"), "config", "check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3 and "does not exist" in r.stderr
    r = subprocess.run([dbops_bin, "no-such-command"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "No such command" in r.stderr
