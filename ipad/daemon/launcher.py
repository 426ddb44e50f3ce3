"""Starting workers: forked from the fork server when possible, spawned otherwise.

Workers run by the Python worker host are forked by the fork server (see
ipad/worker/forkserver.py) in about a millisecond; any other worker executable is
started with posix_spawn, a sandboxed one through the jail (ipad/worker/jail.py),
which clones it into its PID namespace and cgroup as the fork server would.
Either way the worker is a child of the daemon, watched through its pidfd.
If the fork server dies it is started again, and meanwhile workers are
spawned, only slower.

Every process started here is handed to the daemon's reaper (ipad/daemon/children.py)
and to its caller's ``on_started`` the moment it exists, before anything
else is awaited: a launch cancelled half-way leaves no process nobody holds.
A fork answered after its request gave up is killed and reaped; the cgroup
made for a fork that failed is removed.

A fork server that cannot be started (out of descriptors, of processes) is
logged and tried again with backoff; meanwhile workers are spawned. It never
stops the daemon.

Every process started here writes its stdout and stderr into a pipe of its
own, which the launcher's OutputRelay (ipad/daemon/relay.py) reads, through the
daemon's reactor, into the daemon's log with the process's module and pid;
its control socket is read the same way (WorkerProcess.watch_control).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import msgspec
import structlog
import trio

from ipad.config.code_identity import package_identity
from ipad.config.memory_support import MemorySupport
from ipad.daemon import memory_cgroup as _memory_cgroup
from ipad.daemon.cgroup import WorkerCgroups, clear_cgroup
from ipad.daemon.children import Children, child_pidfd, is_child, listed_children, process_group
from ipad.daemon.lifecycle import ExitStatus
from ipad.daemon.reactor import Timers
from ipad.daemon.relay import OutputRelay
from ipad.daemon.spawn import StartedProcess, start_process
from ipad.daemon.start_forkserver import FORKSERVER_ARGV
from ipad.daemon.worker_process import WorkerCrashed, WorkerProcess, adopt, spawn_worker
from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, sized_socketpair
from ipad.worker.jail import command as jail_command

log = structlog.get_logger("ipad")

#: Pause before starting a fork server that died or could not start, doubling up to the
#: maximum while it keeps failing, so a broken one cannot spin.
FORKSERVER_RESTART_DELAY = 1.0
FORKSERVER_RESTART_MAX = 30.0

#: How long the fork server gets to exit after SIGTERM.
FORKSERVER_GRACE = 1.0

#: How long a fork may take before the launcher spawns instead.
FORK_TIMEOUT = 2.0

#: How long ``renew`` waits for the new fork server before workers are spawned meanwhile.
RENEW_TIMEOUT = 5.0

#: How long a jail (ipad/worker/jail.py) may take to say which worker it started, by default.
JAIL_TIMEOUT = 5.0

#: How long a jail that failed gets to die of its SIGKILL before what it said is read.
JAIL_KILL_WAIT = 1.0

#: What a jail may say: the worker's pid.
JAIL_REPLY = frozenset({p.MsgType.SPAWNED})

#: Told of a worker the moment its process exists; then when it has exited and been reaped.
OnStarted = Callable[[WorkerProcess], None]
OnExit = Callable[[WorkerProcess], None]


class Launcher:
    """Starts worker processes for every supervisor."""

    def __init__(
        self,
        forkable: Sequence[str] | None,
        children: Children,
        timers: Timers,
        cgroups: WorkerCgroups | None = None,
        preloads: Sequence[str] = (),
        early: StartedProcess | None = None,
    ) -> None:
        #: The reaper every process started here is handed to.
        self.children = children
        self.timers = timers
        #: Every started process's output, into the daemon's log.
        self.relay = OutputRelay(children.reactor, timers)
        self.cgroups = cgroups
        #: Where sandboxed workers' memory limits go (ipad/daemon/memory_cgroup.py), if anywhere.
        self.memory_version: int | None = None
        self.v1_memory: _memory_cgroup.V1MemoryCgroups | None = None  # (enable_memory)
        #: A fork server started before trio was imported, to take charge of first.
        self.early = early
        #: ``DIR:package.module`` of shipped modules the fork server imports once for all.
        self.preloads = list(preloads)
        #: Each preload's package identity as the running fork server imported it
        #: (ipad/config/code_identity.py): a worker whose code is not that is spawned.
        self.preload_codes: dict[str, str | None] = {}
        #: Set while a renewal for code found stale runs (``renew_stale``): one at a time.
        self._renewing = False
        #: The argv a worker must have to be forked: the Python worker host's.
        self.forkable = list(forkable) if forkable else None
        self.forkserver: WorkerProcess | None = None
        #: Set to have the running fork server replaced (``renew``); one per server.
        self._renew: trio.Event | None = None
        #: Set, and replaced, each time a fork server takes up service.
        self._serving = trio.Event()
        #: Set when workers become forkable after a start without any (``enable_forking``).
        self._wanted = trio.Event()
        #: The fork server ``renew`` retired last; forks it failed are asked of its successor.
        self._retired: WorkerProcess | None = None
        #: From that retirement until the successor serves.
        self._replacing = False
        self.forks = 0
        self.spawns = 0
        #: Where a cgroup nobody will use is cleared, while the launcher runs.
        self._background: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a fork server running; ``started`` once ready to launch."""
        async with trio.open_nursery() as nursery:
            self._background = nursery
            try:
                if self.forkable is None:
                    if self.early is not None:
                        self.early.discard()
                        self.early = None
                    task_status.started()
                    await self._wanted.wait()  # a reload brought the first forkable module
                    task_status = trio.TASK_STATUS_IGNORED
                await self._keep_forkserver(task_status)
            finally:
                self._background = None

    def enable_memory(self, memory: MemorySupport) -> None:
        """Make workers' memory limits possible, once: at start, or at the reload that needs it."""
        if self.memory_version is not None:
            return
        self.memory_version = memory.version
        if memory.version == 1 and memory.v1_parent is not None:
            self.v1_memory = _memory_cgroup.V1MemoryCgroups(memory.v1_parent)
            self.v1_memory.open()
            log.info("memory.ready", cgroup=str(self.v1_memory.base), version=1)
        elif memory.version == 2 and self.cgroups is not None:
            # Workers' own cgroups get memory.max only if their parent hands the controller on.
            (self.cgroups.base / "cgroup.subtree_control").write_text("+memory")

    def _watch(self, process: WorkerProcess, output: int, on_exit: OnExit | None) -> None:
        """From now on the process is the reaper's, its control socket and output are read."""
        self.children.adopt(process, on_exit)
        process.watch_control(self.children.reactor, self.timers)
        self.relay.add(output, module=process.module, worker_pid=process.pid)

    async def _start_forkserver(self) -> WorkerProcess:
        """The fork server started early (start_forkserver.py) the first time, a new one after.

        Either way it is told which trusted modules to preload before any SPAWN.
        """
        started, self.early = self.early, None
        if started is None:
            server = self._spawn("forkserver", FORKSERVER_ARGV, {}, allowed=p.FROM_FORKSERVER)
        else:
            server = adopt("forkserver", started, allowed=p.FROM_FORKSERVER)
            assert started.output is not None  # noqa: S101 - start_forkserver gives it a pipe
            self._watch(server, started.output, None)
            started.output = None
        # A SPAWNED nobody took (late, or its caller cancelled): that worker goes.
        server.requests.on_dropped = lambda frame: self._orphaned(frame.message)
        # Hashed before the server imports them: an edit after that reads as stale at the
        # next launch (the worker is spawned), never the other way round.
        self.preload_codes = {spec: _preload_identity(spec) for spec in self.preloads}
        if self.preloads:
            with contextlib.suppress(OSError, trio.ClosedResourceError):  # it died: seen below
                await server.control.send(p.Preload(tuple(self.preloads)))
        log.info("forkserver.started", pid=server.pid, preloads=self.preloads)
        return server

    async def _keep_forkserver(self, task_status: trio.TaskStatus[None]) -> None:
        """Run a fork server for as long as the launcher runs, replacing each that ends.

        ``started`` once the first serves, or once the first attempt failed:
        workers are spawned until one does.
        """
        assert self.forkable is not None  # noqa: S101 - checked by run()
        delay = FORKSERVER_RESTART_DELAY
        while True:
            try:
                server = await self._start_forkserver()
            except OSError as exc:
                log.error("forkserver.start_failed", error=str(exc), retry_in=delay)
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(delay)
                delay = min(delay * 2, FORKSERVER_RESTART_MAX)
                continue
            renewed, status = await self._serve_with(server, task_status)
            task_status = trio.TASK_STATUS_IGNORED
            if renewed:
                log.info("forkserver.replaced", pid=server.pid, **status.log_fields())
                delay = FORKSERVER_RESTART_DELAY
                continue
            log.error("forkserver.exited", pid=server.pid, **status.log_fields())
            self.children.reap_strays()  # forks whose replies died with it
            await trio.sleep(delay)
            delay = min(delay * 2, FORKSERVER_RESTART_MAX)

    async def _serve_with(
        self, server: WorkerProcess, task_status: trio.TaskStatus[None]
    ) -> tuple[bool, ExitStatus]:
        """Fork from ``server`` until it exits: whether it was renewed, and how it ended."""
        renew = self._renew = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._retire_on, renew, server)
                self.forkserver = server
                self._replacing = False
                serving, self._serving = self._serving, trio.Event()
                serving.set()
                task_status.started()
                await server.wait_exit()
                # SPAWNED replies it sent before exiting (all, when it was retired) still
                # sit in its socket: unread, their workers would be nobody's to reap.
                with trio.move_on_after(FORKSERVER_GRACE):
                    await server.control_ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            self.forkserver = self._renew = None
            with trio.CancelScope(shield=True):  # cancelled: the reaper's close does the rest
                await server.stop(FORKSERVER_GRACE)
            server.close()
        assert server.exit_status is not None  # noqa: S101 - stop() waits for the reaper
        return renew.is_set(), server.exit_status

    def _orphaned(self, message: p.Message) -> None:
        """A fork answered after its request gave up: that worker is nobody's, so it goes."""
        if isinstance(message, p.Spawned):
            log.warning("forkserver.late_fork", worker_pid=message.pid, action="killed")
            self.children.adopt_pid(message.pid, "unknown")

    async def _retire_on(self, renew: trio.Event, server: WorkerProcess) -> None:
        """Once ``renew`` is set, fork nothing more from ``server`` and ask it to exit."""
        await renew.wait()
        self._retired, self._replacing = server, True
        if self.forkserver is server:
            self.forkserver = None
        with contextlib.suppress(OSError, trio.ClosedResourceError):  # gone already: seen
            await server.control.send(p.Shutdown())

    async def enable_forking(self, forkable: Sequence[str]) -> None:
        """Start the fork server a start without forkable workers did not need; wait for it."""
        if self.forkable is not None:
            return
        self.forkable = list(forkable)
        self._wanted.set()
        await self._wait_for_server()

    async def renew(self, preloads: Sequence[str]) -> None:
        """Replace the fork server by one that imports ``preloads`` afresh; wait until it serves.

        A fork server holds the trusted modules' code as it was when it imported
        them, and every worker forked from it runs that code: a reload that
        changes such a module must not start its new workers from the old one.
        Forks already asked of the old server are answered before it exits.
        """
        self.preloads = list(preloads)
        renew, old = self._renew, self.forkserver
        if renew is None or old is None:
            return  # none serves now: the next one imports the new preloads by itself
        renew.set()
        await self._wait_for_server(other_than=old)

    def preload_stale(self, spec: str, package_id: str | None) -> bool:
        """Whether forking a worker of ``spec`` would give it other code than ``package_id``.

        Only a module the fork server preloads can be stale; one whose identity
        is unknown is taken as stale (spawned: it imports what the disk holds).
        """
        if spec not in self.preloads:
            return False
        return package_id is None or self.preload_codes.get(spec) != package_id

    async def renew_stale(self, spec: str) -> None:
        """Replace the fork server because ``spec``'s code changed since it preloaded it."""
        if self._renewing:
            return
        self._renewing = True
        try:
            log.info("forkserver.renewing", reason="preloaded code changed on disk",
                     modules=[spec])  # fmt: skip
            await self.renew(self.preloads)
        finally:
            self._renewing = False

    async def launch(  # noqa: PLR0913 - how to start one worker, all of it
        self,
        module: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_notice: Callable[[p.Message], None],
        sandbox: p.SandboxSpec | None = None,
        *,
        on_started: OnStarted = lambda _: None,
        on_exit: OnExit | None = None,
        timeout: float = JAIL_TIMEOUT,
        fork: bool = True,
    ) -> WorkerProcess:
        """A new worker for ``module``: forked if it runs the Python worker host, else spawned.

        With ``sandbox`` the worker confines itself before it loads its module;
        a spawned one is started by the jail, which has ``timeout`` to say its pid.
        ``on_started`` is told of the worker the moment its process exists (it
        owns it from then on, even if this is cancelled later); the reaper
        calls ``on_exit`` once it has exited. ``fork`` False: spawned even if forkable
        (the fork server holds stale code of this module).
        """
        while (
            fork and list(argv) == self.forkable and (server := await self._fork_from()) is not None
        ):
            try:
                worker = await self._fork(server, module, env, on_notice, sandbox,
                                          on_started, on_exit)  # fmt: skip
            except (WorkerCrashed, OSError, trio.TooSlowError, p.ProtocolError) as exc:
                if server is self._retired:
                    continue  # replaced under this fork: ask its successor
                log.warning("forkserver.fork_failed", module=module, error=str(exc))
                break
            self.forks += 1
            return worker
        self.spawns += 1
        v1_memory = self._v1_memory(module, sandbox)
        prepared, in_cgroup = None, False
        if sandbox is not None:
            sandbox = msgspec.structs.replace(sandbox, memory_cgroup=(
                str(v1_memory) if v1_memory else None))  # fmt: skip
            if sandbox.pid_namespace and self.cgroups is not None:
                prepared = self._prepare_cgroup(module, sandbox, v1_memory)
            argv = jail_command(sandbox, list(argv), cgroup=prepared is not None)
        try:
            if sandbox is not None and sandbox.pid_namespace:
                worker, in_cgroup = await self._spawn_jailed(
                    module, argv, env, on_notice, on_exit, timeout, prepared
                )
            else:
                worker = self._spawn(module, argv, env, on_notice, on_exit=on_exit)
        except BaseException:
            self._drop_v1_memory(v1_memory, None)
            raise
        worker.sandbox, worker.memory_cgroup = sandbox, v1_memory
        if prepared is not None and self._limited_in(prepared[0], sandbox, v1_memory):
            worker.memory_cgroup = prepared[0]
        on_started(worker)
        await self._place(worker, module, in_cgroup=in_cgroup)
        return worker

    async def _place(self, worker: WorkerProcess, module: str, *, in_cgroup: bool) -> None:
        """Move a spawned worker into a cgroup of its own, unless it was cloned into one."""
        # Moving a process between cgroups can wait out an RCU grace period
        # (~10 ms here): do it off the event loop so other workers carry on.
        if worker.cgroup is not None:  # the jail's: cloned into it, or moved there now
            if not in_cgroup:
                await trio.to_thread.run_sync(WorkerCgroups.move, worker.cgroup, worker.pid)
        elif self.cgroups is not None:
            worker.cgroup = await trio.to_thread.run_sync(self.cgroups.add, module, worker.pid)
            limit = worker.sandbox.memory_max if worker.sandbox is not None else None
            if worker.cgroup is not None and limit is not None and self.memory_version == 2:
                _memory_cgroup.set_limit(worker.cgroup, limit, 2)
                worker.memory_cgroup = worker.cgroup

    async def _fork_from(self) -> WorkerProcess | None:
        """The fork server to fork from: while one is being replaced, its successor.

        A successor is worth the wait (it imports for a few tens of milliseconds):
        spawning instead costs each worker an interpreter start of its own.
        """
        if self.forkserver is None and self._replacing:
            await self._wait_for_server()
        return self.forkserver

    async def _wait_for_server(self, other_than: WorkerProcess | None = None) -> None:
        """Until a fork server (not ``other_than``) serves; meanwhile workers are spawned.

        At most RENEW_TIMEOUT: a fork server that cannot start must not hold a reload.
        """
        with trio.move_on_after(RENEW_TIMEOUT):
            while self.forkserver is None or self.forkserver is other_than:
                await self._serving.wait()

    def _v1_memory(self, module: str, sandbox: p.SandboxSpec | None) -> Path | None:
        """A cgroup v1 memory cgroup with the worker's limit, for it to join, if it needs one."""
        if sandbox is None or sandbox.memory_max is None or self.v1_memory is None:
            return None
        return self.v1_memory.prepare(module, sandbox.memory_max)

    @staticmethod
    def _drop_v1_memory(path: Path | None, prepared: tuple[Path, int] | None) -> None:
        """Remove a v1 memory cgroup made for a fork that did not happen."""
        if path is not None and (prepared is None or path != prepared[0]):
            _memory_cgroup.clear(path)

    def close(self) -> None:
        """Relay the last output and remove the memory cgroups (at exit, every worker gone)."""
        self.relay.close()
        if self.v1_memory is not None:
            self.v1_memory.close()

    def _spawn(
        self,
        module: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_notice: Callable[[p.Message], None] = lambda _: None,
        allowed: frozenset[p.MsgType] = p.FROM_WORKER_CONTROL,
        on_exit: OnExit | None = None,
    ) -> WorkerProcess:
        """posix_spawn a process whose output is relayed, adopted by the reaper at once."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            process = spawn_worker(module, argv, env, on_notice, allowed, output=write_end)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._watch(process, read_end, on_exit)
        return process

    async def _fork(
        self,
        server: WorkerProcess,
        module: str,
        env: Mapping[str, str],
        on_notice: Callable[[p.Message], None],
        sandbox: p.SandboxSpec | None,
        on_started: OnStarted,
        on_exit: OnExit | None,
    ) -> WorkerProcess:
        ours, theirs = sized_socketpair()  # a READY may be up to MAX_PACKET
        read_end, write_end = os.pipe2(os.O_CLOEXEC)  # the worker's stdout and stderr
        prepared = self.cgroups.prepare(module) if self.cgroups is not None else None
        memory_cgroup = self._v1_memory(module, sandbox)
        if sandbox is not None and memory_cgroup is not None:
            sandbox = msgspec.structs.replace(sandbox, memory_cgroup=str(memory_cgroup))
        elif sandbox is not None and sandbox.memory_max is not None and prepared is not None:
            _memory_cgroup.set_limit(prepared[0], sandbox.memory_max, 2)  # before it runs
            memory_cgroup = prepared[0]
        fds = [theirs.fileno(), write_end] + ([prepared[1]] if prepared is not None else [])
        try:
            frame = None
            with self.timers.move_on_after(FORK_TIMEOUT):
                try:
                    spawn = p.Spawn(dict(env), cgroup=prepared is not None, sandbox=sandbox)
                    frame = await server.request(spawn, fds)
                finally:
                    theirs.close()
                    os.close(write_end)
                    if prepared is not None:
                        os.close(prepared[1])
            spawned = _spawned(frame)
            # The worker is our child (CLONE_PARENT): only we can reap it, so the pid is safe.
            pidfd = _pidfd_of_child(spawned.pid)
        except BaseException:
            ours.close()
            os.close(read_end)
            self._drop_v1_memory(memory_cgroup, prepared)
            if prepared is not None:  # a fork answered late lands in it: cleared, killed
                self._discard_cgroup(prepared[0])
            raise
        pid = spawned.pid
        worker = WorkerProcess(module, pid, pidfd, ours, on_notice)
        self._watch(worker, read_end, on_exit)
        worker.sandbox, worker.memory_cgroup = sandbox, memory_cgroup
        log.debug("worker.forked", module=module, worker_pid=pid, in_cgroup=spawned.in_cgroup)
        on_started(worker)
        if prepared is not None:
            path = prepared[0]
            worker.cgroup = path  # it is removed with the worker, whether or not it got in
            if not spawned.in_cgroup:
                await trio.to_thread.run_sync(WorkerCgroups.move, path, pid)
        return worker

    def _prepare_cgroup(
        self, module: str, sandbox: p.SandboxSpec, v1_memory: Path | None
    ) -> tuple[Path, int] | None:
        """A cgroup for the jail to clone the worker into, with its memory limit already set."""
        assert self.cgroups is not None  # noqa: S101 - the caller checked
        prepared = self.cgroups.prepare(module)
        if prepared is not None and self._limited_in(prepared[0], sandbox, v1_memory):
            assert sandbox.memory_max is not None  # noqa: S101 - checked just now
            _memory_cgroup.set_limit(prepared[0], sandbox.memory_max, 2)  # before it runs
        return prepared

    def _limited_in(
        self, path: Path, sandbox: p.SandboxSpec | None, v1_memory: Path | None
    ) -> bool:
        """Whether the worker's memory limit goes on its own cgroup ``path`` (cgroup v2)."""
        return (sandbox is not None and sandbox.memory_max is not None and v1_memory is None
                and self.memory_version == 2 and path.exists())  # fmt: skip

    async def _spawn_jailed(
        self,
        module: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        on_notice: Callable[[p.Message], None],
        on_exit: OnExit | None,
        timeout: float,
        prepared: tuple[Path, int] | None = None,
    ) -> tuple[WorkerProcess, bool]:
        """Spawn the jail (ipad/worker/jail.py), adopt the worker it clones, reap the jail.

        The jail is the reaper's from the moment it exists, the worker from the
        moment its SPAWNED is read, and only if it is a child of the daemon
        that nobody holds yet: a jail that dies, lies or takes longer than
        ``timeout`` is a failed start (OSError), and whatever it cloned is
        killed and reaped. With ``prepared`` (a cgroup and its directory fd,
        given to the jail as fd 4) the worker is cloned into that cgroup;
        the second value says whether it got in (else the caller moves it).
        """
        read_end, write_end = os.pipe2(os.O_CLOEXEC)  # the jail's, then the worker's output
        try:
            extra = prepared[1] if prepared is not None else None
            started = start_process(argv, env, output=write_end, extra=extra)
        except BaseException:
            os.close(read_end)
            if prepared is not None:
                self._discard_cgroup(prepared[0])
            raise
        finally:
            os.close(write_end)
            if prepared is not None:
                os.close(prepared[1])
        started.taken = True
        jail = WorkerProcess.stray(module, started.pid, started.pidfd)
        self.children.adopt(jail, lambda process: process.close())
        control = started.control
        worker_pid = jail.pid  # whose output the pipe carries, until the worker is known
        try:
            spawned = await self._jail_answer(control, timeout)
            pidfd = self._unheld_child(spawned.pid)
        except BaseException:
            jail.kill()  # and the clone with it, while it is still in the jail's group
            with trio.CancelScope(shield=True), self.timers.move_on_after(JAIL_KILL_WAIT):
                await jail.wait_exit()  # then whatever it said before it died is there to read
            self._adopt_unread(control, module)
            self._adopt_unnamed(jail.pid, module)
            control.close()
            self.relay.add(read_end, module=module, worker_pid=worker_pid)
            if prepared is not None:  # what got into it is killed, and it is removed
                self._discard_cgroup(prepared[0])
            raise
        worker = WorkerProcess(module, spawned.pid, pidfd, control, on_notice)
        self._watch(worker, read_end, on_exit)
        if prepared is not None:
            worker.cgroup = prepared[0]  # it is removed with the worker, whether or not it got in
        log.debug("worker.spawned", module=module, worker_pid=worker.pid, jail_pid=jail.pid,
                  in_cgroup=spawned.in_cgroup, argv=list(argv))  # fmt: skip
        return worker, spawned.in_cgroup

    def _unheld_child(self, pid: int) -> int:
        """A pidfd for ``pid`` if it is a child of ours nobody holds yet; OSError if not."""
        if self.children.holds(pid):
            raise OSError(f"the jail named process {pid}, a worker already")
        return child_pidfd(pid)

    async def _jail_answer(self, control: socket.socket, timeout: float) -> p.Spawned:
        """The jail's SPAWNED, the first packet on the control socket; OSError otherwise."""
        control.setblocking(False)
        with self.timers.move_on_after(timeout):
            while True:
                await trio.lowlevel.wait_readable(control)
                try:
                    received = recv_packet(control)
                except BlockingIOError:
                    continue
                if received is None:
                    raise OSError("the jail exited before it started the worker")
                try:
                    frame = p.decode(*received, allowed=JAIL_REPLY)
                except p.ProtocolError as exc:
                    raise OSError(f"the jail said something else: {exc.reason}") from None
                frame.close_fds()
                assert isinstance(frame.message, p.Spawned)  # noqa: S101 - decode allowed only it
                return frame.message
        raise OSError(f"the jail did not start the worker within {timeout:g}s")

    def _adopt_unread(self, control: socket.socket, module: str) -> None:
        """A SPAWNED the jail sent that nobody read: kill and reap the worker it names."""
        with contextlib.suppress(OSError, p.ProtocolError):
            received = recv_packet(control)
            if received is not None:
                frame = p.decode(*received, allowed=JAIL_REPLY)
                frame.close_fds()
                if isinstance(frame.message, p.Spawned) and not self.children.holds(
                    frame.message.pid
                ):
                    self.children.adopt_pid(frame.message.pid, module)

    def _adopt_unnamed(self, jail_pid: int, module: str) -> None:
        """Kill and reap a clone the jail died before naming: a child of ours in its group.

        The clone stays in the jail's process group until the jail says go, and
        a killed one stays there as a zombie until reaped: the group id cannot
        be another's meanwhile.
        """
        for pid in listed_children():
            if not self.children.holds(pid) and process_group(pid) == jail_pid:
                self.children.adopt_pid(pid, module)

    def _discard_cgroup(self, path: Path) -> None:
        """Kill whatever is in a cgroup nobody will use and remove it, in the background."""
        if self._background is not None:
            self._background.start_soon(clear_cgroup, path)
        else:
            WorkerCgroups.kill(path)
            with contextlib.suppress(OSError):
                path.rmdir()


def _spawned(frame: p.Frame | None) -> p.Spawned:
    """The fork server's SPAWNED; OSError for a refusal, TooSlowError for no answer in time."""
    if frame is None:
        raise trio.TooSlowError(f"no fork within {FORK_TIMEOUT:g}s")
    message = frame.message
    if not isinstance(message, p.Spawned):
        error = message.message if isinstance(message, p.Error) else message.TYPE.name
        raise OSError(f"fork server refused: {error}")
    return message


def _pidfd_of_child(pid: int) -> int:
    """A pidfd for a just-forked child of ours; without one (EMFILE) the child is killed.

    Unreaped, its pid stays ours, so the kill cannot hit another process; the
    reaper's stray sweep reaps the zombie. A pid that is not our child is
    refused and left alone.
    """
    try:
        return child_pidfd(pid)
    except OSError:
        if is_child(pid):
            os.kill(pid, signal.SIGKILL)
        raise


def _preload_identity(spec: str) -> str | None:
    """The package identity of a ``DIR:package.module`` preload (None: past the bounds)."""
    directory, _, module = spec.partition(":")
    return package_identity(Path(directory), module.split(".")[0])
