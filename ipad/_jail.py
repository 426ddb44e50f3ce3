"""``python -m ipad._jail SPEC -- WORKER...``: sandbox this process, then exec the worker.

Workers that are not forked from the fork server (``forkserver = false``, or
a native worker executable) are spawned through this: it applies the same
SandboxSpec a forked worker applies to itself (ipad/_sandbox.py), then
execs the worker in place, so the daemon's pidfd, the process group and the
descriptors 0 to 3 are the worker's. One difference: a PID namespace can only
be entered by a fork, so a spawned worker has none; the seccomp filter then
lets it signal only itself and its process group, and nothing can trace.
"""

from __future__ import annotations

import os
import sys

import msgspec

from ._protocol import SandboxSpec
from ._sandbox import SandboxError, apply, close_other_fds

#: Exit status when the sandbox cannot be built (the reason goes to stderr, relayed).
EXIT_SANDBOX_FAILED = 4


def command(spec: SandboxSpec, argv: list[str]) -> list[str]:
    """The command line that starts ``argv`` confined by ``spec``."""
    encoded = msgspec.json.encode(msgspec.structs.replace(spec, pid_namespace=False)).decode()
    return [sys.executable, "-I", "-m", "ipad._jail", encoded, "--", *argv]


def main(argv: list[str]) -> int:  # noqa: RET503 - execv does not return
    """Apply the spec in argv[0], then exec what follows ``--``."""
    spec = msgspec.json.decode(argv[0].encode(), type=SandboxSpec)
    worker = argv[argv.index("--") + 1 :]
    close_other_fds()
    try:
        apply(spec, (os.getuid(), os.getgid()), in_user_namespace=False)
    except SandboxError as exc:
        print(f"worker.sandbox_failed module={spec.module} step={exc.step} reason={exc.reason}",
              file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_SANDBOX_FAILED
    os.execv(worker[0], worker)  # noqa: S606 - the resolved worker, as the daemon would spawn it


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
