"""Which fork server the daemon runs, and starting it before the daemon imports trio.

The fork server is a worker host that forks new workers (ipad/_forkserver.py).
Its own start-up (an interpreter, the worker runtime, the preloaded modules)
takes about 100 ms; started as soon as the configuration is checked, it
overlaps the daemon's import of trio instead of following it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ._check import CheckedConfig, ModulePlan
from ._paths import install_dir, install_module_dir
from ._registry import REGISTRY
from ._resolve import WorkerNotFound, resolve_worker
from ._spawn import StartedProcess, start_process

#: The Python worker host shipped with ipad: workers it runs can be forked by the fork server.
WORKER_HOST = "ipad-worker"


def forkable_argv(plans: Iterable[ModulePlan]) -> list[str] | None:
    """The argv of workers the fork server can fork, if any module runs the shipped host."""
    try:
        host = resolve_worker(WORKER_HOST, install=install_dir(), environ={})
    except WorkerNotFound:
        return None
    if not any(plan.worker == host for plan in plans):
        return None
    return REGISTRY.create("isolated").worker_argv(host)


def trusted_preloads(plans: Iterable[ModulePlan], trusted: Iterable[Path] = ()) -> list[str]:
    """``DIR:package.module`` of enabled modules whose code the fork server may import.

    Only modules from ipad's own install directory, or from a directory the
    operator lists in ``trusted_module_dirs``, qualify: other module code is
    never imported into the process all workers fork from.
    """
    dirs = {install_module_dir().resolve(), *(Path(d).resolve() for d in trusted)}
    specs: set[str] = set()
    for plan in plans:
        entry = plan.source.manifest.entry_point
        directory = plan.source.directory.resolve()
        if entry and directory in dirs:
            specs.add(f"{directory}:{entry.partition(':')[0]}")
    return sorted(specs)


def forkserver_argv(forkable: Sequence[str], preloads: Iterable[str]) -> list[str]:
    """The fork server's command line: the worker host in zygote mode, with its preloads."""
    argv = [*forkable, "--zygote"]
    for spec in preloads:
        argv += ["--preload", spec]
    return argv


def start_early(checked: CheckedConfig) -> StartedProcess | None:
    """Start the fork server the configuration calls for, if any.

    With an empty environment: forked workers get theirs from each SPAWN, and
    nothing of the daemon's may linger in the memory they are forked from.
    """
    daemon = checked.config.daemon
    forkable = forkable_argv(checked.plans.values()) if daemon.forkserver else None
    if forkable is None:
        return None
    preloads = trusted_preloads(checked.plans.values(), daemon.trusted_module_dirs)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)  # its output, relayed once the daemon runs
    try:
        started = start_process(forkserver_argv(forkable, preloads), {}, output=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    started.output = read_end
    return started
