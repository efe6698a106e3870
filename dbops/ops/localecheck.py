"""`dbops check`: does the throwaway instance have every locale the cluster's databases use?

A database created with ``LC_COLLATE``/``LC_CTYPE`` ``en_US.UTF-8`` only starts where that locale
is installed; a validation (or verify --restore) in an image or pod without it fails at
connection time with "database locale is incompatible with operating system". This compares
``pg_database.datcollate``/``datctype`` on the primary with ``locale -a`` where the throwaway
instance runs (its image or rootfs, or this host for ``runtime.engine: none``), and names what
is missing before a backup finds out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from dbops import proc
from dbops.config import Config, Node
from dbops.errors import DbopsError

ALWAYS = frozenset({"c", "posix"})


def normalize(name: str) -> str:
    """glibc's spelling: ``en_US.UTF-8`` and ``en_US.utf8`` are the same locale."""
    lang, dot, rest = name.strip().partition(".")
    if not dot:
        return lang.lower()
    codeset, at, modifier = rest.partition("@")
    codeset = "".join(ch for ch in codeset.lower() if ch.isalnum())
    return f"{lang.lower()}.{codeset}" + (f"@{modifier.lower()}" if at else "")


def missing(used: Mapping[str, Iterable[str]], available: Iterable[str]) -> dict[str, list[str]]:
    """Locales in use (locale -> databases) that are not available, keyed by the name PostgreSQL gives."""
    have = {normalize(a) for a in available} | ALWAYS
    return {loc: sorted(set(dbs)) for loc, dbs in sorted(used.items()) if normalize(loc) not in have}


def database_locales(node: Node) -> dict[str, list[str]]:
    """locale -> databases using it (as collation or character type), read on node."""
    from dbops.pg import conn

    out: dict[str, list[str]] = {}
    with conn.session(node) as c:
        for datname, collate, ctype in conn.rows(c, "SELECT datname, datcollate, datctype FROM pg_database"):
            for loc in {collate, ctype}:
                if loc:
                    out.setdefault(loc, []).append(datname)
    return out


def runtime_locales(cfg: Config) -> list[str]:
    """``locale -a`` where the throwaway instance runs."""
    if cfg.runtime.engine == "none":
        res = proc.run(["locale", "-a"], timeout=60, what="locale -a")
    else:
        from dbops.runtime import ContainerRuntime, engine_of

        rt = ContainerRuntime(engine_of(cfg.runtime), image=cfg.runtime.image, rootfs=cfg.runtime.rootfs,
                              bin_dir=cfg.runtime.bin_dir, extra_args=cfg.runtime.extra_args,
                              network=cfg.runtime.network, db_user=cfg.runtime.user)
        res = rt.cli.run(rt.oneshot_argv(["/usr/bin/locale", "-a"]), timeout=300)
    return [line.strip() for line in res.stdout.splitlines() if line.strip()]


def check(cfg: Config, report, primary: Node | None) -> None:
    """Add a `locales` finding to a CheckReport (nothing when there is no reachable primary)."""
    from dbops.ops.check import FAIL, OK, WARN

    if primary is None:
        return
    try:
        used = database_locales(primary)
    except DbopsError as e:
        report.add("runtime", "locales", WARN, f"cannot read the databases' locales on {primary.name}: {e.message}")
        return
    where = "this host (runtime.engine none)" if cfg.runtime.engine == "none" else (
        f"the throwaway {cfg.runtime.engine} container ({cfg.runtime.image or 'rootfs ' + str(cfg.runtime.rootfs)})")
    try:
        available = runtime_locales(cfg)
    except DbopsError as e:
        report.add("runtime", "locales", WARN, f"cannot list the locales of {where}: {e.message}")
        return
    lacking = missing(used, available)
    report.runtime["locales"] = {"used": sorted(used), "missing": lacking}
    if lacking:
        names = "; ".join(f"{loc} (database{'s' if len(dbs) > 1 else ''} {', '.join(dbs)})"
                          for loc, dbs in lacking.items())
        report.add("runtime", "locales", FAIL,
                   f"{where} lacks locale(s) the databases use: {names}; the restored copy could not open them",
                   "install them where the throwaway instance runs (Debian: the locales-all package, or add them "
                   "to /etc/locale.gen and run locale-gen; the dbops image carries every locale)")
    else:
        report.add("runtime", "locales", OK, f"{where} has every locale the databases use: {', '.join(sorted(used))}")
