"""The local controller: the node's data folder is on this host; commands run as its owner."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dbops import proc
from dbops.nodes.base import PLAIN_PROGRAMS, ShellController
from dbops.pg import binaries


class LocalController(ShellController):
    """pg_ctl and friends on this host, run as ``Node.os_user`` (runuser when dbops is root)."""

    kind = "local"

    def _bin(self, name: str) -> str:
        if name in PLAIN_PROGRAMS:
            return name
        return binaries.binary(name, self.node.bin_dir)

    def _exec(self, argv: Sequence[str], *, timeout: float | None, input: str | None,
              env: Mapping[str, str] | None, check: bool, what: str | None = None) -> proc.Result:
        return proc.run(argv, timeout=timeout, user=self.node.os_user, env=env, input=input, check=check,
                        what=what)
