"""The ssh controller: the same commands as the local controller, run on the node's host over ssh.

* The remote command line is ``shlex.join`` of an argv, so the far side's POSIX shell
  parses it back into exactly that argv.
* Environment values (PGPASSWORD for pg_rewind, LANG for pg_controldata) travel on
  stdin, never on either command line (see :func:`dbops.nodes.base.remote_command`).
* ssh runs in batch mode (no password prompts) and multiplexes one connection per
  node (ControlMaster), so a switchover's stop and pg_controldata cost one handshake.
* When the ssh login user is not the data folder's owner, commands go through
  ``sudo -n -u OWNER``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

from dbops import proc
from dbops.config import Node
from dbops.errors import CommandError, ConfigError, DbopsError
from dbops.nodes.base import ShellController, quote_argv, remote_command

CONNECT_TIMEOUT = 10
CONTROL_PERSIST = 30

def _control_dir() -> str:
    d = os.path.join(tempfile.gettempdir(), f"dbops-ssh-{os.geteuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise DbopsError(f"ssh control folder {d} is not private to this user",
                         hint="remove it; dbops recreates it with mode 0700")
    return d


class SshController(ShellController):
    kind = "ssh"

    def __init__(self, node: Node, *, multiplex: bool = True):
        if node.ssh is None:
            raise ConfigError(f"node {node.name} uses the ssh controller but has no ssh settings",
                              hint="add nodes[].ssh.host (and user, port, identity_file)")
        super().__init__(node)
        self.ssh = node.ssh
        self.multiplex = multiplex

    def ssh_argv(self, remote: Sequence[str]) -> list[str]:
        """The local ssh argv running `remote` (an argv) on the node."""
        s = self.ssh
        argv = ["ssh", "-p", str(s.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if s.identity_file:
            argv += ["-i", s.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.multiplex:
            argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={_control_dir()}/%C",
                     "-o", f"ControlPersist={CONTROL_PERSIST}"]
        for opt in s.options:
            argv += ["-o", opt]
        argv += ["-l", s.user, "--", s.host, quote_argv(remote)]
        return argv

    def close(self) -> None:
        """Stop this node's shared ssh connection, if one is open (it would linger ControlPersist seconds)."""
        if not self.multiplex:
            return
        argv = self.ssh_argv([])[:-1]
        argv[argv.index("--"):argv.index("--")] = ["-O", "exit"]
        proc.run(argv, timeout=15, check=False, what=f"ssh -O exit {self.node.name}")

    def _exec(self, argv: Sequence[str], *, timeout: float | None, input: str | None,
              env: Mapping[str, str] | None, check: bool, what: str | None = None) -> proc.Result:
        remote, prefix = remote_command(argv, env)
        if self.ssh.user != self.node.os_user:
            remote = ["sudo", "-n", "-u", self.node.os_user, "--", *remote]
        stdin = prefix + (input or "") if (prefix or input is not None) else None
        res = proc.run(self.ssh_argv(remote), timeout=timeout, input=stdin, check=False,
                       what=what or f"ssh {self.node.name}")
        if res.returncode == 255:  # ssh's own failure: never the remote command's status
            raise CommandError(f"ssh to node {self.node.name} ({self.ssh.user}@{self.ssh.host}:{self.ssh.port}) failed",
                               returncode=255, stderr=res.stderr,
                               hint="check host, port, user and identity_file; ssh runs in batch mode "
                                    "(keys only) and must know the host key")
        if check and res.returncode != 0:
            raise CommandError(f"{what or argv[0]} on node {self.node.name} exited with status {res.returncode}",
                               returncode=res.returncode, stderr=res.stderr or res.stdout[-2000:])
        return res
