"""A worker process as the daemon sees it: spawned, talked to, watched through its pidfd."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import structlog
import trio

from . import _protocol as p
from ._heartbeat_board import new_board
from ._spawn import StartedProcess, start_process
from ._transport import PacketSocket, Requests

log = structlog.get_logger("ipad")


@attrs.frozen
class ExitStatus:
    """How a worker ended: an exit code or a signal, as waitid reported it."""

    code: int | None = None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        """Exited with status 0."""
        return self.code == 0

    def describe(self) -> str:
        """``exit status 3`` or ``signal SIGKILL``, for reasons and logs."""
        if self.signal is not None:
            try:
                return f"signal {signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"exit status {self.code}"

    def log_fields(self) -> dict[str, object]:
        """``exit_status`` or ``signal`` for a log record."""
        if self.signal is not None:
            return {"signal": signal.Signals(self.signal).name}
        return {"exit_status": self.code}


#: How long a worker whose control socket ended may live on before it is killed.
CONTROL_GRACE = 2.0


class WorkerCrashed(Exception):
    """The worker died or was stopped while a request to it was in flight."""


class WorkerProcess:
    """One spawned worker: its pid, its pidfd, its control channel."""

    def __init__(
        self,
        module: str,
        pid: int,
        pidfd: int,
        control: socket.socket,
        on_notice: Callable[[p.Message], None] = lambda _: None,
        allowed: frozenset[p.MsgType] = p.FROM_WORKER_CONTROL,
    ) -> None:
        self.module = module
        self.on_notice = on_notice
        self.pid = pid
        self.pidfd = pidfd
        self.control = PacketSocket(control, allowed)
        self.requests = Requests(f"worker:{module}:{pid}")
        self.exit_status: ExitStatus | None = None
        self._exited = trio.Event()
        #: The worker's own cgroup, where ipad can make one (see ipad/_cgroup.py).
        self.cgroup: Path | None = None
        #: Instances opened ahead of time that no proxy holds yet: (instance id, client end).
        self.spares: list[tuple[int, socket.socket]] = []
        #: The sandbox it confined itself in (proxy kind ``sandboxed``), if any.
        self.sandbox: p.SandboxSpec | None = None
        #: The cgroup holding its memory limit, where its OOM kills are counted.
        self.memory_cgroup: Path | None = None
        #: The heartbeat board it beats on (ipad/_heartbeat_board.py); None: it answers PING.
        self.board: int | None = None
        #: Told of a reply that came after its request gave up (the fork server's SPAWNED).
        self.on_unclaimed: Callable[[p.Message], None] = lambda _: None

    async def request(self, message: p.Message, fds: Sequence[int] = ()) -> p.Frame:
        """Send a control request and wait for its reply."""
        return await self.requests.call(self.control, message, fds)

    async def load(self, load: p.Load) -> p.Frame:
        """Send LOAD with a heartbeat board of its own, kept if READY says it beats on it."""
        board = new_board() if load.heartbeat_interval > 0 else None
        try:
            frame = await self.request(load, () if board is None else (board,))
        except BaseException:
            if board is not None:
                os.close(board)
            raise
        if board is not None:
            if isinstance(frame.message, p.Ready) and frame.message.beats:
                self.board = board
            else:
                os.close(board)
        return frame

    async def read_control(self) -> None:
        """Deliver control replies until the worker closes its end; then fail what waits."""
        try:
            while True:
                try:
                    frame = await self.control.receive()
                except p.ProtocolError as exc:
                    log.error("worker.protocol_error", module=self.module, worker_pid=self.pid,
                              reason=exc.reason)  # fmt: skip
                    break
                except (OSError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                if frame.request_id == 0:
                    self.on_notice(frame.message)  # one-way: not a reply to anything
                elif not self.requests.deliver(frame):
                    self.on_unclaimed(frame.message)
        finally:
            self.requests.fail_all(lambda: WorkerCrashed(f"{self.module} worker went away"))
        await self._outlive_control()

    async def _outlive_control(self) -> None:
        """A worker that closed its control socket yet lives on is no worker: grace, then kill."""
        if self.exit_status is not None or self.control.sock.fileno() == -1:
            return  # it ended, or we closed the socket (after reaping it)
        with trio.move_on_after(CONTROL_GRACE):
            await self._exited.wait()
        if self.exit_status is None:
            log.warning("worker.control_closed", module=self.module, worker_pid=self.pid,
                        action="killed", grace=CONTROL_GRACE)  # fmt: skip
            self.signal(signal.SIGKILL)

    async def watch(self) -> None:
        """Wait for the worker to exit (its pidfd becomes readable) and reap it.

        Exactly one task runs this per worker; everyone else awaits ``wait_exit``.
        No timer, no polling: the kernel wakes us the moment the process ends.
        The control socket's end of stream is no substitute: a child the worker
        left behind may hold a copy of it.
        """
        await trio.lowlevel.wait_readable(self.pidfd)
        self.exit_status = self._reap()
        self._exited.set()

    async def wait_exit(self) -> ExitStatus:
        """How the worker ended, once ``watch`` has reaped it."""
        await self._exited.wait()
        assert self.exit_status is not None  # noqa: S101 - set before the event
        return self.exit_status

    def _reap(self) -> ExitStatus:
        info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        assert info is not None  # noqa: S101 - without WNOHANG waitid always reports
        if info.si_code == os.CLD_EXITED:
            return ExitStatus(code=info.si_status)
        return ExitStatus(signal=info.si_status)

    def signal(self, signum: int) -> None:
        """Signal the worker's whole process group (it leads one), ignoring a gone group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def finish(self, grace: float) -> ExitStatus:
        """Let a worker that is on its way out exit by itself, then ``stop`` it if it does not."""
        with trio.move_on_after(grace):
            return await self.wait_exit()
        return await self.stop(grace)

    async def stop(self, grace: float) -> ExitStatus:
        """SIGTERM, wait up to ``grace``, then SIGKILL; always reaped before returning."""
        if self.exit_status is not None:
            return self.exit_status
        with trio.CancelScope(shield=True):
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait_exit()
            if self.exit_status is None:
                self.signal(signal.SIGKILL)
            return await self.wait_exit()
        raise AssertionError("unreachable: a shielded scope is never cancelled")

    async def terminate_and_reap(self, grace: float) -> ExitStatus:
        """Stop and reap without a ``watch`` task: for when that task is no longer running."""
        if self.exit_status is not None:
            return self.exit_status
        with trio.CancelScope(shield=True):
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace) as waited:
                await trio.lowlevel.wait_readable(self.pidfd)
            if waited.cancelled_caught:
                self.signal(signal.SIGKILL)
                await trio.lowlevel.wait_readable(self.pidfd)
            self.exit_status = self._reap()
            self._exited.set()
            return self.exit_status
        raise AssertionError("unreachable: a shielded scope is never cancelled")

    def close(self) -> None:
        """Close the control socket, spare channels and the pidfd (after the worker was reaped)."""
        self.control.close()
        for _, channel in self.spares:
            channel.close()
        self.spares.clear()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.board is not None:
            os.close(self.board)
            self.board = None


def spawn_worker(
    module: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    on_notice: Callable[[p.Message], None] = lambda _: None,
    allowed: frozenset[p.MsgType] = p.FROM_WORKER_CONTROL,
    *,
    output: int | None = None,
) -> WorkerProcess:
    """Start a worker (see ipad/_spawn.py) and watch it as a WorkerProcess."""
    return adopt(module, start_process(argv, env, output=output), on_notice, allowed)


def adopt(
    module: str,
    started: StartedProcess,
    on_notice: Callable[[p.Message], None] = lambda _: None,
    allowed: frozenset[p.MsgType] = p.FROM_WORKER_CONTROL,
) -> WorkerProcess:
    """Take charge of a process started with ``start_process``."""
    started.taken = True
    log.debug("worker.spawned", module=module, worker_pid=started.pid, argv=started.argv)
    return WorkerProcess(module, started.pid, started.pidfd, started.control, on_notice, allowed)
