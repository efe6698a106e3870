"""Where a throwaway PostgreSQL runs: a container (podman, docker) or a plain local process.

    rt = open_runtime(cfg.runtime)
    with rt.start(InstanceSpec(data_dir=scratch, port=port, wal_dir=wal, settings={...})) as inst:
        inst.wait_ready(timeout)
        ...                      # query inst.node(), inst.run_tool([...])
        inst.stop("fast")        # in recovery: leaves it "shut down in recovery"
    # removed here, also on exceptions and Ctrl-C
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dbops import proc
from dbops.config import RuntimeSettings
from dbops.errors import CommandError, DbopsError, PreconditionError
from dbops.pg import binaries
from dbops.runtime.base import Instance, InstanceSpec, Runtime
from dbops.runtime.container import ContainerRuntime
from dbops.runtime.engine import Engine, cleanup_stale, ensure_containers_conf
from dbops.runtime.local import LocalRuntime

__all__ = ["Instance", "InstanceSpec", "Runtime", "ContainerRuntime", "LocalRuntime", "Engine", "open_runtime",
           "probe", "cleanup_stale", "ensure_containers_conf", "engine_of"]


def engine_of(settings: RuntimeSettings) -> Engine:
    """The container engine CLI for the settings (writing podman's containers.conf when it is missing)."""
    if shutil.which(settings.engine) is None:
        raise PreconditionError(
            f"container engine {settings.engine} is not installed",
            hint="install it (Debian: apt-get install podman runc), or set runtime.engine: none",
        )
    env: dict[str, str] = {}
    if settings.engine == "podman" and settings.containers_conf:
        env["CONTAINERS_CONF"] = str(ensure_containers_conf(settings.containers_conf))
    return Engine(settings.engine, env)


def open_runtime(settings: RuntimeSettings) -> Runtime:
    """The runtime the configuration asks for."""
    if settings.engine == "none":
        return LocalRuntime(bin_dir=settings.bin_dir, db_user=settings.user)
    return _container_runtime(settings)


def _container_runtime(settings: RuntimeSettings) -> ContainerRuntime:
    return ContainerRuntime(engine_of(settings), image=settings.image, rootfs=settings.rootfs,
                            bin_dir=settings.bin_dir, extra_args=settings.extra_args, network=settings.network,
                            db_user=settings.user, shm_size=settings.shm_size)


def probe(settings: RuntimeSettings, timeout: float = 300) -> str:
    """Check that a throwaway server can start here; a one-line result for `dbops check`.

    Runs ``postgres --version`` the way a throwaway instance would (in a one-shot container,
    or on this host for engine none). Raises PreconditionError with a hint when it cannot.
    """
    t0 = time.monotonic()
    if settings.engine == "none":
        try:
            res = proc.run([binaries.binary("postgres", settings.bin_dir), "--version"], timeout=30)
        except DbopsError as e:
            raise PreconditionError("PostgreSQL cannot run on this host for validation", detail=e.message,
                                    hint=e.hint or "install the PostgreSQL server package or set runtime.bin_dir") from None
        return (f"a local PostgreSQL ({res.stdout.strip()}) ran postgres --version in {time.monotonic() - t0:.2f} s "
                "(engine none: no container isolation)")
    source = f"image {settings.image}" if settings.image else f"rootfs {settings.rootfs}"
    try:
        rt = _container_runtime(settings)
        res = rt.cli.run(rt.probe_argv(), timeout=timeout)
    except CommandError as e:
        raise PreconditionError(f"{settings.engine} could not run a throwaway container ({source})",
                                detail=e.detail, hint=_probe_hint(settings, e.stderr)) from None
    except DbopsError as e:
        raise PreconditionError(f"{settings.engine} could not run a throwaway container ({source})",
                                detail=e.message, hint=e.hint) from None
    version = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "?"
    return (f"a throwaway {settings.engine} container ({source}) started and ran postgres --version "
            f"in {time.monotonic() - t0:.1f} s: {version}")


def _probe_hint(settings: RuntimeSettings, stderr: str) -> str:
    err = stderr.lower()
    if "cannot connect to the docker daemon" in err or "is the docker daemon running" in err:
        return "no Docker engine runs here: start dockerd, or use engine: podman"
    if any(s in err for s in ("manifest unknown", "image not known", "pull access denied", "unable to pull",
                              "not found: manifest", "short-name", "pinging container registry",
                              "initializing source")):
        return f"pull the image first ({settings.engine} pull {settings.image}) or fix runtime.image"
    if "executable file not found" in err or "no such file or directory" in err:
        return "PostgreSQL's binaries are not where the container looks: set runtime.bin_dir"
    if settings.engine == "podman":
        conf = settings.containers_conf
        where = f" ({conf})" if conf and Path(conf).exists() else ""
        return (f"check podman's containers.conf{where}: on VMs without systemd cgroups it needs "
                'cgroup_manager = "cgroupfs" and runtime = "runc"; set runtime.containers_conf to have dbops write one')
    return f"run `{settings.engine} run --rm hello-world` to check the engine"
