"""A worker process as the daemon sees it: spawned, talked to, reaped through its pidfd.

The daemon's reaper (ipad/daemon/children.py) watches every pidfd and calls
``reap`` once the process exited; everyone else awaits ``wait_exit``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog
import trio

from ipad.daemon.bounds import MAX_TEXT, bound_worker_message, cap
from ipad.daemon.lifecycle import ExitStatus
from ipad.daemon.modlog import ModuleLogGate
from ipad.daemon.reactor import Flag, Reactor, TimerHandle, Timers
from ipad.daemon.spawn import StartedProcess, start_process
from ipad.protocol import wire as p
from ipad.transport.seqpacket import PacketSocket, Requests
from ipad.worker.heartbeat_board import new_board

log = structlog.get_logger("ipad")


#: How long a worker whose control socket ended may live on before it is killed.
CONTROL_GRACE = 2.0

#: How long to wait for a SIGKILLed worker to be reaped: only one stuck in the kernel waits.
KILL_WAIT = 5.0

#: Control messages read per wake-up before other workers get their turn.
CONTROL_BATCH = 64

#: Unsolicited control messages a worker may send per UNSOLICITED_INTERVAL (a late PONG,
#: the reply to a request whose caller gave up, the close of an instance the daemon closed
#: at the same moment); past that it is killed as a protocol violation. ipad's worker host
#: sends a handful at most: a flood is module code lying on the wire.
UNSOLICITED_BURST = 100
UNSOLICITED_INTERVAL = 10.0

#: How long an instance the daemon closed may still be reported closed by its worker
#: (the worker saw its channel end before it read CLOSE_INSTANCE: the two crossed).
CLOSE_CROSSING = 10.0


class WorkerCrashed(Exception):
    """The worker died or was stopped while a request to it was in flight."""


class WorkerProcess:
    """One spawned worker: its pid, its pidfd, its control channel."""

    # Slots: a daemon holds two per module (worker and standby), each for hours.
    __slots__ = (
        "_cgroup",
        "_closing",
        "_exited",
        "_grace",
        "_memory_cgroup",
        "_reactor",
        "_timers",
        "board",
        "close_drops",
        "code_id",
        "control",
        "control_ended",
        "exit_status",
        "instances",
        "log_gate",
        "module",
        "on_notice",
        "pid",
        "pidfd",
        "proxy_of",
        "ready",
        "requests",
        "sandbox",
        "spares",
        "unsolicited",
        "violation",
    )

    def __init__(
        self,
        module: str,
        pid: int,
        pidfd: int,
        control: socket.socket | None,
        on_notice: Callable[[p.Message], None] = lambda _: None,
        allowed: frozenset[p.MsgType] = p.FROM_WORKER_CONTROL,
    ) -> None:
        self.module = module
        #: Told of each INSTANCE_CLOSED about an instance it held (others count as unsolicited).
        self.on_notice = on_notice
        self.pid = pid
        self.pidfd = pidfd
        self.control = PacketSocket(control if control is not None else _closed_socket(), allowed)
        self.requests = Requests(f"worker:{module}:{pid}")
        self.exit_status: ExitStatus | None = None
        self._exited = Flag()
        #: The worker's own cgroup, where ipad can make one (see ipad/daemon/cgroup.py).
        self._cgroup: str | None = None
        #: Instances opened ahead of time that no proxy holds yet: (instance id, client end).
        self.spares: list[tuple[int, socket.socket]] = []
        #: The sandbox it confined itself in (proxy kind ``sandboxed``), if any.
        self.sandbox: p.SandboxSpec | None = None
        #: The cgroup holding its memory limit, where its OOM kills are counted.
        self._memory_cgroup: str | None = None
        #: The heartbeat board it beats on (ipad/worker/heartbeat_board.py); None: it answers PING.
        self.board: int | None = None
        #: What it said when it became ready (its version, its methods).
        self.ready: p.Ready | None = None
        #: The identity of the module code it loaded (ipad/config/code_identity.py); None: unknown.
        self.code_id: str | None = None
        #: Set once the control socket ended (the worker closed it, broke the protocol, died).
        self.control_ended = Flag()
        self._reactor: Reactor | None = None
        self._timers: Timers | None = None
        self._grace: TimerHandle | None = None
        #: Unsolicited messages in the current interval: (interval start, count).
        self.unsolicited: tuple[float, int] = (-UNSOLICITED_INTERVAL, 0)
        #: How it broke the protocol, if it did (it was killed for it).
        self.violation: str | None = None
        #: Instances opened on it that it has not reported closed, nor the daemon closed.
        self.instances: set[int] = set()
        #: Instances the daemon closed lately, and when: it may report them closed still.
        self._closing: dict[int, float] = {}
        #: CLOSE_INSTANCEs its full control socket did not take (logged at each power of two).
        self.close_drops = 0
        #: Its module's MODULE_LOG records, bounded and limited (made at the first one).
        self.log_gate: ModuleLogGate | None = None
        #: The proxy an instance of it serves, for its log records (set by its supervisor).
        self.proxy_of: Callable[[int], int | None] | None = None

    # A cgroup path is kept as text: a Path object with its parts costs about 0.6 KiB, and
    # a daemon holds two per module for as long as it runs.

    @property
    def cgroup(self) -> Path | None:
        """The worker's own cgroup, where ipad can make one (see ipad/daemon/cgroup.py)."""
        return Path(self._cgroup) if self._cgroup is not None else None

    @cgroup.setter
    def cgroup(self, path: Path | None) -> None:
        self._cgroup = str(path) if path is not None else None

    @property
    def memory_cgroup(self) -> Path | None:
        """The cgroup holding its memory limit, where its OOM kills are counted."""
        return Path(self._memory_cgroup) if self._memory_cgroup is not None else None

    @memory_cgroup.setter
    def memory_cgroup(self, path: Path | None) -> None:
        self._memory_cgroup = str(path) if path is not None else None

    @classmethod
    def stray(cls, module: str, pid: int, pidfd: int) -> WorkerProcess:
        """A child of ours nobody talks to, held only to be killed and reaped."""
        return cls(module, pid, pidfd, None)

    async def request(self, message: p.Message, fds: Sequence[int] = ()) -> p.Frame:
        """Send a control request and wait for its reply."""
        return await self.requests.call(self.control, message, fds)

    async def load(self, load: p.Load) -> p.Frame:
        """Send LOAD with a heartbeat board of its own, kept if READY says it beats on it.

        Held from the start: a worker that dies during LOAD (a module that crashes
        as it is imported) leaves its stacks on it too (ipad/daemon/crashes.py);
        ``close`` closes it with the rest.
        """
        board = new_board() if load.heartbeat_interval > 0 else None
        self.board = board
        frame = await self.request(load, () if board is None else (board,))
        if board is not None and not (isinstance(frame.message, p.Ready) and frame.message.beats):
            self.board = None
            os.close(board)
        return frame

    def watch_control(self, reactor: Reactor, timers: Timers) -> None:
        """Deliver control replies as they come, called back by the daemon's reactor.

        No task of its own: a worker costs the daemon no coroutine while it is quiet.
        """
        self._reactor, self._timers = reactor, timers
        reactor.add(self.control.raw.fileno(), self._control_readable)

    async def read_control(self) -> None:
        """The same delivery as ``watch_control``, by a task of its own (tests, tools)."""
        while not self.control_ended.is_set():
            try:
                await trio.lowlevel.wait_readable(self.control.raw)
            except (OSError, trio.ClosedResourceError):
                self._control_lost()
                break
            self._control_readable()
        if self.exit_status is None and self.control.raw.fileno() != -1:
            with trio.move_on_after(CONTROL_GRACE):
                await self._exited.wait()
            self._outlived()

    def _control_readable(self) -> None:
        """Read what is there: replies to their callers, notices to ``on_notice``.

        Every string in what it sent is capped first (ipad/daemon/bounds.py). A worker
        that breaks the protocol (a malformed packet, a reply to a request never
        sent, a flood of unsolicited messages) is killed at once: the daemon's
        work for it, and the log lines it causes, end there.
        """
        for _ in range(CONTROL_BATCH):  # then others get their turn; the rest comes next pass
            try:
                frame = self.control.receive_nowait()
            except BlockingIOError:
                return
            except p.ProtocolError as exc:
                self.violated(exc.reason)
                return
            except (OSError, trio.ClosedResourceError):
                frame = None
            if frame is None:
                self._control_lost()
                return
            self._dispatch(frame)
            if self.violation is not None:
                return

    def _dispatch(self, frame: p.Frame) -> None:
        """One message, its strings capped: a reply to its caller, a notice to ``on_notice``."""
        message = bound_worker_message(frame.message)
        if message is not frame.message:
            frame = p.Frame(message, frame.request_id, frame.fds)
        if frame.request_id == 0:
            if isinstance(message, p.ModuleLog):
                self._module_log(message)
            elif isinstance(message, p.InstanceClosed) and self._closed(message.instance_id):
                self.on_notice(message)
            else:  # one-way, and about nothing it holds: counted, not looked up
                self._unsolicited(f"a {message.TYPE.name} about nothing it holds")
        elif frame.request_id > self.requests.last_id:
            frame.close_fds()
            self.violated(f"a {message.TYPE.name} answering request {frame.request_id}, "
                          "which was never sent")  # fmt: skip
        elif frame.request_id in self.requests:
            self.requests.deliver(frame)
        elif self._unsolicited(f"a {message.TYPE.name} nobody waits for"):
            self.requests.deliver(frame)  # dropped: logged, told to requests.on_dropped
        else:
            frame.close_fds()

    def _module_log(self, record: p.ModuleLog) -> None:
        """A record of its module's log: logged within the bounds, or the worker killed."""
        gate = self.log_gate
        if gate is None:
            gate = self.log_gate = ModuleLogGate(self.module, self.pid, self.proxy_of,
                                                 self._timers)  # fmt: skip
        violation = gate.receive(record, trio.current_time())
        if violation is not None:
            self.violated(violation)

    def ending(self) -> bool:
        """Whether it has exited or hung up its control socket, by a look that does not wait.

        Its fds close as it exits, before the reaper or the control reader may have
        run: a client can see its channel end and ask the daemon before either did.
        """
        control = self.control.raw.fileno()
        if (
            self.exit_status is not None
            or self.control_ended.is_set()
            or min(self.pidfd, control) < 0
        ):
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        poller.register(control, select.POLLRDHUP)  # POLLHUP and POLLERR come regardless
        return bool(poller.poll(0))

    def opened(self, instance_id: int) -> None:
        """An instance was opened on it (INSTANCE_OPENED came)."""
        self.instances.add(instance_id)

    def closing(self, instance_id: int) -> None:
        """The daemon closes an instance of it: a report of its close may still cross."""
        self.instances.discard(instance_id)
        now = trio.current_time()
        closing = self._closing
        closing[instance_id] = now
        for old, when in list(closing.items()):  # oldest first: forget the crossings long past
            if now - when < CLOSE_CROSSING:
                break
            del closing[old]

    def _closed(self, instance_id: int) -> bool:
        """The worker reports an instance closed: whether it was one it held (once each)."""
        if instance_id in self.instances:
            self.instances.remove(instance_id)
            return True
        return self._closing.pop(instance_id, None) is not None

    def _unsolicited(self, what: str) -> bool:
        """Count an unsolicited message; False (and the worker killed) once past the budget."""
        now = trio.current_time()
        start, count = self.unsolicited
        if now - start >= UNSOLICITED_INTERVAL:
            start, count = now, 0
        self.unsolicited = (start, count + 1)
        if count < UNSOLICITED_BURST:
            return True
        self.violated(f"more than {UNSOLICITED_BURST} unsolicited control messages within "
                      f"{UNSOLICITED_INTERVAL:g}s (the last: {what})")  # fmt: skip
        return False

    def violated(self, reason: str) -> None:
        """The worker broke the protocol: kill it now, stop reading it, say why (once)."""
        if self.violation is None:
            self.violation = cap(reason, MAX_TEXT)
            log.error("worker.protocol_violation", module=self.module, worker_pid=self.pid,
                      reason=self.violation, action="killed")  # fmt: skip
        self.kill()
        self._control_lost()

    def drain_control(self) -> None:
        """The process is gone: read what it sent before it died, then end the channel.

        A LOAD answered with an ERROR just before the worker exited is read
        here, whichever of the two the reactor saw first.
        """
        if not self.control_ended.is_set() and self.control.raw.fileno() != -1:
            self._control_readable()
        self._control_lost()

    def _control_lost(self) -> None:
        """The control socket ended: what waits fails; a worker that lives on gets a grace."""
        if self.control_ended.is_set():
            return
        self.control_ended.set()
        if self.log_gate is not None:
            self.log_gate.flush()
        if self._reactor is not None:
            self._reactor.remove(self.control.raw.fileno())
        self.requests.fail_all(lambda: WorkerCrashed(f"{self.module} worker went away"))
        if self._timers is not None and self.exit_status is None:
            self._grace = self._timers.call_later(CONTROL_GRACE, self._outlived)

    def _outlived(self) -> None:
        """A worker that closed its control socket yet lives on is no worker: kill it."""
        if self.exit_status is None and self.pidfd >= 0:
            log.warning("worker.control_closed", module=self.module, worker_pid=self.pid,
                        action="killed", grace=CONTROL_GRACE)  # fmt: skip
            self.kill()

    def reap(self) -> ExitStatus:
        """Reap the exited process (its pidfd is readable); kill what is left of its group first.

        Until it is reaped the zombie keeps its pid, so the process group it led
        cannot be another's: a child the worker left behind is killed with it.
        """
        self._signal_group(signal.SIGKILL)
        info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        assert info is not None  # noqa: S101 - without WNOHANG waitid always reports
        if info.si_code == os.CLD_EXITED:
            self.exit_status = ExitStatus(code=info.si_status)
        else:
            self.exit_status = ExitStatus(signal=info.si_status)
        self._exited.set()
        return self.exit_status

    async def wait_exit(self) -> ExitStatus:
        """How the worker ended, once the reaper has reaped it."""
        await self._exited.wait()
        assert self.exit_status is not None  # noqa: S101 - set before the event
        return self.exit_status

    def signal(self, signum: int) -> None:
        """Signal the worker and its process group (it leads one), unless it was reaped.

        Through its pidfd for the worker itself; by group id, which only a
        process not yet reaped keeps from being reused, for what it started.
        """
        if self.exit_status is not None or self.pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)
        self._signal_group(signum)

    def _signal_group(self, signum: int) -> None:
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL it and its group now."""
        self.signal(signal.SIGKILL)

    async def stop(self, grace: float, *, polite: bool = False, exiting: bool = False) -> None:
        """End the worker within ``grace`` seconds, then wait for the reaper to see it go.

        ``polite``: SHUTDOWN first and half the time to act on it; ``exiting``:
        it is on its way out, so the same half-time before any signal; then
        SIGTERM, and SIGKILL once ``grace`` is up. The wait after SIGKILL is
        bounded too: only a process stuck in the kernel outlives it.
        """
        if self.exit_status is not None:
            return
        with trio.move_on_after(grace / 2 if polite or exiting else 0):
            if polite:
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    await self.control.send(p.Shutdown())
            await self._exited.wait()
        if self.exit_status is None:
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace / 2 if polite or exiting else grace):
                await self._exited.wait()
        if self.exit_status is None:
            log.warning("worker.killed", module=self.module, worker_pid=self.pid,
                        reason=f"still running {grace:g}s after it was asked to stop")  # fmt: skip
            self.kill()
            with trio.move_on_after(KILL_WAIT):
                await self._exited.wait()

    def close(self) -> None:
        """Close the control socket, spare channels and the pidfd (after the worker was reaped)."""
        self._control_lost()  # what still waits on it fails now
        if self._grace is not None:
            self._grace.cancel()
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
    """Start a worker (see ipad/daemon/spawn.py) as a WorkerProcess, for the reaper to adopt."""
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


def _closed_socket() -> socket.socket:
    """A stand-in control socket for a process nobody talks to: its peer is closed."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    theirs.close()
    return ours
