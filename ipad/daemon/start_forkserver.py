"""The fork server's command line, and starting it before the daemon has read anything.

The fork server is a worker host that forks new workers (ipad/worker/forkserver.py).
Its own start-up (an interpreter and the worker runtime, about 100 ms) needs
no configuration, so the ``ipad`` command starts it first thing, before it
imports what checking the configuration and running the daemon need; the
launcher then tells it which modules to preload (PRELOAD). Should the
configuration want no fork server, it is stopped again.

This module imports nothing heavy: that is the point of it.
"""

from __future__ import annotations

import os
import sys

from ipad.daemon.spawn import StartedProcess, start_process

#: The fork server runs ipad's own worker host: the daemon's interpreter and code, no
#: executable looked up on disk. An empty environment: forked workers get theirs from
#: each SPAWN, and nothing of the daemon's may linger in the memory they fork from.
FORKSERVER_ARGV = (sys.executable, "-I", "-m", "ipad.worker.forkserver")


def start_forkserver() -> StartedProcess:
    """Start a fork server with its output on a pipe (relayed once the daemon runs)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        started = start_process(FORKSERVER_ARGV, {}, output=write_end)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    started.output = read_end
    return started
