"""The command line's parameters coerced without pydantic where typer's own coercion would hand the value
back as it is (dbops.cli.params): the same result as typer's, on every parameter of every command, and
a plain run that never imports pydantic. Fails when typer's coercion of these values changes, or when
typer stops asking ``typer.core.build_runtime_param`` for a parameter's coercion."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from enum import Enum

import pytest
import typer.main
from typer import _click

from dbops.cli import params
from dbops.cli.app import app


def _parameters():
    """(command path, parameter) for every typer parameter of every dbops command."""
    out = []

    def walk(cmd, path):
        for p in cmd.params:
            if hasattr(p, "type_descriptor"):
                out.append((path, cmd, p))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "dbops")
    return out


PARAMETERS = _parameters()


def _samples(annotation, default):
    values = [default]
    if annotation is str:
        values += ["x", "", " spaced ", "/a/b.yaml", "2026-11-25T15:46:00+01:00"]
    elif annotation is int:
        values += [0, 7, "5999", "007", "0"]
    elif annotation is bool:
        values += [True, False]
    elif isinstance(annotation, type) and issubclass(annotation, Enum):
        values += list(annotation) + [m.value for m in annotation]
    else:
        values += [["a.b"], ("db.s.t", "u"), []]
    return values


def test_every_parameter_is_covered_by_the_samples():
    kinds = {p.type_descriptor.annotation for _, _, p in PARAMETERS}
    assert str in kinds and int in kinds and bool in kinds and list[str] in kinds
    assert any(isinstance(k, type) and issubclass(k, Enum) for k in kinds)


@pytest.mark.parametrize("path,cmd,param", PARAMETERS, ids=[f"{p} --{x.name}" for p, _, x in PARAMETERS])
def test_the_values_answered_here_are_what_typer_returns(path, cmd, param):
    d = param.type_descriptor
    ctx = _click.Context(cmd)
    own = params._TYPERS_OWN(d)
    answered = 0
    for value in _samples(d.annotation, param.default):
        if value is None:
            continue
        known, result = params.as_given(d.annotation, d.parameter_info, value)
        if not known:
            continue
        answered += 1
        expected = own._coerce_value(value, param=param, ctx=ctx)
        assert result == expected and type(result) is type(expected), (path, param.name, value)
    plain = params._plain(d.parameter_info)
    common = d.annotation in (str, int, bool, list[str]) or (isinstance(d.annotation, type)
                                                              and issubclass(d.annotation, Enum))
    # a float, a Path, a bounded int: always typer's own coercion (a None default never needs one)
    assert bool(answered) == (plain and common), (path, param.name, d.annotation)


def test_a_value_not_answered_here_gets_typers_checks_and_message(cli):
    r = cli(["--log-format", "yaml", "config", "check"])
    assert r.exit_code == 2
    assert "yaml" in r.stderr and "text" in r.stderr and "json" in r.stderr
    r = cli(["restore", "--target-dir", "/nonexistent", "--port", "fifty"])
    assert r.exit_code == 2 and "--port" in r.stderr and "integer" in r.stderr
    r = cli(["restore", "--target-dir", "/nonexistent", "--port", "1" * 5000])  # past int()'s digit limit
    assert r.exit_code == 2 and "--port" in r.stderr, r.stderr


def _config(tmp_path):
    """A valid configuration file (nothing it names is reached by `config check`)."""
    cfg = tmp_path / "dbops.yaml"
    cfg.write_text(textwrap.dedent(f"""
        cluster: main
        nodes:
          - name: pg1
            port: 5432
            data_dir: {tmp_path}/pg
        storage:
          bucket: backups
          endpoint: http://127.0.0.1:9
    """))
    return cfg


def test_a_plain_run_never_imports_pydantic(tmp_path):
    cfg = _config(tmp_path)
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write('pydantic imported: %s\\n' % ('pydantic' in sys.modules)))\n"
            "from dbops.cli.entry import main\n"
            f"main(['-c', {str(cfg)!r}, '-v', '--log-format', 'json', 'config', 'check'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pydantic imported: False" in r.stderr, r.stderr


def test_a_typer_without_the_private_hook_still_runs_every_command(tmp_path):
    """The hook is typer's private API: a typer without it (another release) must cost only speed."""
    cfg = _config(tmp_path)
    hide = ("import typer._coercion as c\n"  # a typer whose private coercion differs: the hook's names gone
            "del c.RuntimeParam, c.build_runtime_param\n")
    code = (hide + "import sys\n"
            "from dbops.cli import app\n"
            "assert 'dbops.cli.params' not in sys.modules\n"
            "from dbops.cli.entry import main\n"
            f"main(['-c', {str(cfg)!r}, 'config', 'check'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    code = (hide + "from dbops.cli.entry import main\n"
            "main(['restore', '--target-dir', '/nonexistent', '--port', 'fifty'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--port" in r.stderr, r.stderr


CHANGED_TYPERS = {  # typer._coercion as a patch release might change it
    "hook gone": "import typer._coercion as c\ndel c.RuntimeParam, c.build_runtime_param\n",
    "RuntimeParam not frozen": ("import dataclasses, typer._coercion as c\n"
                                "@dataclasses.dataclass\nclass RP:\n    parameter_info: object\n    annotation: object\n"
                                "c.RuntimeParam = RP\n"),
    "RuntimeParam with a field more": ("import dataclasses, typer._coercion as c\n"
                                       "@dataclasses.dataclass(frozen=True)\nclass RP(c.RuntimeParam):\n    extra: object\n"
                                       "c.RuntimeParam = RP\n"),
}


@pytest.mark.parametrize("change", sorted(CHANGED_TYPERS))
def test_a_changed_private_coercion_costs_only_speed(tmp_path, change):
    """Whatever typer's private coercion turns into, every command still parses, with typer's own
    coercion: --help, a good run, a bad value (exit 2)."""
    pre = CHANGED_TYPERS[change]
    for argv, rc, text in ((["--help"], 0, "backup"),
                           (["restore", "--target-dir", "/nonexistent", "--port", "fifty"], 2, "--port"),
                           (["--log-format", "json", "-v", "config", "--help"], 0, "check")):
        code = pre + f"from dbops.cli.entry import main\nmain({argv!r})\n"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == rc and text in (r.stdout + r.stderr), (change, argv, r.returncode, r.stderr[-800:])
