"""Run a dbops command and SIGKILL it right after it logs a given line (the start of a phase's aftermath).

The command runs with ``-vv --log-format json``; each stderr line is a JSON log record whose ``msg``
is matched by prefix. Only the dbops process itself is killed, as ``kill -9 PID`` or the OOM killer
would: what it started (a container, a PostgreSQL, podman) is left to the next run to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass


@dataclass
class Killed:
    pid: int
    returncode: int
    log: list[str]  # every msg logged until the kill
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def run_killed(dbops_bin: str, env: dict[str, str], args: list[str], after: str | None, *, exact: bool = False,
               timeout: float = 300) -> Killed:
    """`dbops -vv --log-format json ARGS`, SIGKILLed as soon as a log line starts with `after` (is `after`,
    with `exact`); with `after` None it runs to its end (the normal run that follows the killed ones)."""
    p = subprocess.Popen([dbops_bin, "-vv", "--log-format", "json", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    msgs: list[str] = []
    raw: list[str] = []
    assert p.stderr is not None
    for line in p.stderr:
        raw.append(line)
        try:
            msg = json.loads(line).get("msg", "")
        except ValueError:
            continue
        msgs.append(msg)
        if after is not None and (msg == after if exact else msg.startswith(after)):
            os.kill(p.pid, signal.SIGKILL)
            break
    out, rest = p.communicate(timeout=timeout)
    return Killed(p.pid, p.returncode, msgs, out, "".join(raw) + rest)
