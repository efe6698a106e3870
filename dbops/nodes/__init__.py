"""Node controllers: operate a PostgreSQL node's server and data folder, wherever it runs.

``open_controller(node)`` picks the implementation named by ``Node.controller``:
``local`` (pg_ctl on this host), ``ssh`` (the same commands over ssh) or ``container``
(docker / podman lifecycle plus exec). Workflows use only the
:class:`~dbops.nodes.base.NodeController` protocol.
"""

from __future__ import annotations

from dbops.config import Node
from dbops.errors import ConfigError
from dbops.nodes.protocol import STOP_MODES, Fence, NodeController, RunState


def open_controller(node: Node) -> NodeController:
    if node.controller == "local":
        from dbops.nodes.local import LocalController

        return LocalController(node)
    if node.controller == "ssh":
        from dbops.nodes.ssh import SshController

        return SshController(node)
    if node.controller == "container":
        from dbops.nodes.container import ContainerController

        return ContainerController(node)
    raise ConfigError(f"node {node.name}: unknown controller {node.controller!r}",
                      hint="use local, ssh or container")


__all__ = ["STOP_MODES", "Fence", "NodeController", "RunState", "open_controller"]
