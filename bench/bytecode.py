"""Byte-compile the dbops package before a benchmark, as an installed copy is.

``pip install`` compiles every module to bytecode when it installs a package; the editable
install of a development venv does not, and with ``PYTHONDONTWRITEBYTECODE`` set (as in some
shells and CI runners) nothing is ever written, so every dbops command would compile the modules
it imports from source (about half a second for a restore on a busy 2-core machine): a cost a
deployed dbops does not pay. Stale files are rewritten; nothing else is touched.
"""

from __future__ import annotations

import compileall
from pathlib import Path

import dbops


def compile_dbops() -> None:
    compileall.compile_dir(str(Path(dbops.__file__).parent), quiet=1)
