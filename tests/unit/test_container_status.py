"""How a throwaway container's server is judged running or ended: the status file KEEPER writes over
in place, then the engine's inspect; an engine that cannot answer is not an ended server."""

from __future__ import annotations

import subprocess
import threading

import pytest

from dbops.errors import EngineError
from dbops.runtime import container
from dbops.runtime.container import SERVER_EXIT, STATUS_BLANK, ContainerInstance


class _Engine:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def run(self, argv, **kw):
        self.calls += 1
        rc, out, err = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return subprocess.CompletedProcess(argv, rc, out, err)


class _Rt:
    engine = "podman"


def _instance(tmp_path, answers) -> ContainerInstance:
    inst = ContainerInstance.__new__(ContainerInstance)
    inst.run_dir, inst.name, inst._rt = tmp_path, "dbops-test-1", _Rt()
    inst._engine, inst._stopping, inst._settling = _Engine(answers), None, threading.Lock()
    (tmp_path / SERVER_EXIT).write_text(STATUS_BLANK)
    return inst


def test_a_blank_status_file_is_a_running_server_and_a_written_one_its_exit(tmp_path):
    inst = _instance(tmp_path, [(0, "true 0\n", "")])
    assert inst.is_running()
    with open(tmp_path / SERVER_EXIT, "r+") as f:  # as KEEPER writes it: in place, not truncated
        f.write("137\n")
    assert not inst.is_running() and inst._status() == "137"


def test_a_container_the_engine_knows_no_more_has_ended(tmp_path):
    inst = _instance(tmp_path, [(125, "", "Error: no such container dbops-test-1\n")])
    assert not inst.is_running() and inst._status() == "?"
    inst = _instance(tmp_path, [(0, "false 137\n", "")])  # the container itself ended (its first process killed)
    assert inst._status() == "137"


def test_an_engine_that_cannot_answer_is_asked_again_then_raised_not_taken_for_an_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(container, "INSPECT_RETRY_DELAY", 0.0)
    locked = (125, "", "Error: database is locked\n")
    inst = _instance(tmp_path, [locked, (0, "true 0\n", "")])  # a passing failure: asked again, still running
    assert inst.is_running() and inst._engine.calls == 2
    inst = _instance(tmp_path, [locked])
    with pytest.raises(EngineError) as ei:
        inst.is_running()
    assert inst._engine.calls == container.INSPECT_TRIES
    assert "could not tell whether the container dbops-test-1 still runs" in ei.value.message
    assert "database is locked" in (ei.value.detail or "")
