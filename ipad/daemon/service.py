"""What the daemon tells systemd, and when: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

READY=1 goes once every enabled module has reached a first state. STATUS= is
kept current from the event bus, where every module and proxy state change is
published, so ``systemctl status ipad`` never shows stale counts. WATCHDOG=1 is
sent by a task in the daemon's own trio loop: if that loop stops running, the
pings stop and systemd restarts the service. Outside systemd all of it is a no-op.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable

import structlog
import trio

from ipad.config.model import RestartMode
from ipad.daemon.events import EventBus
from ipad.daemon.states import WorkerState
from ipad.daemon.systemd import (
    Notifier,
    describe_error,
    monotonic_usec,
    notify_message,
    take_watchdog_usec,
)

log = structlog.get_logger("ipad")

#: Pings per watchdog interval: sd_watchdog_enabled(3) asks for at least two.
WATCHDOG_PINGS_PER_INTERVAL = 2

#: A message the manager's full queue cannot take is tried again this often...
NOTIFY_RETRY = 0.002
#: ...for this long, then dropped (logged): a wedged manager must not wedge the daemon.
NOTIFY_TIMEOUT = 5.0


class ModuleHealth(enum.Enum):
    """A module as one STATUS= count: what an operator needs to know at a glance."""

    VALID = "valid"
    RESTARTING = "restarting"
    COOLDOWN = "in cooldown"
    FAILED = "failed"
    #: Exited cleanly and, by its restart policy, not started again.
    EXITED = "exited"
    STOPPED = "stopped"


#: The counts STATUS= always shows, in order; the others only when not zero.
_ALWAYS_SHOWN = (ModuleHealth.VALID, ModuleHealth.RESTARTING, ModuleHealth.COOLDOWN,
                 ModuleHealth.FAILED)  # fmt: skip


def module_health(
    state: WorkerState, *, exited_cleanly: bool, restart: RestartMode
) -> ModuleHealth:
    """Which count a module in ``state`` belongs to.

    ``exited`` is a worker that ended on its own with status 0: under
    ``restart = "always"`` it is being restarted, otherwise it stays exited.
    """
    if state is WorkerState.RUNNING:
        return ModuleHealth.VALID
    if state is WorkerState.COOLDOWN:
        return ModuleHealth.COOLDOWN
    if state is WorkerState.FAILED:
        return ModuleHealth.FAILED
    if state in (WorkerState.STOPPED, WorkerState.STOPPING):
        return ModuleHealth.STOPPED
    if state is WorkerState.EXITED and exited_cleanly and restart is not RestartMode.ALWAYS:
        return ModuleHealth.EXITED
    return ModuleHealth.RESTARTING  # starting, or exited with a restart due


def status_line(modules: Iterable[ModuleHealth], proxies: int) -> str:
    """``3 modules valid, 0 restarting, 0 in cooldown, 0 failed; 2 proxies``."""
    counts = Counter(modules)
    shown = [h for h in ModuleHealth if h in _ALWAYS_SHOWN or counts[h]]
    parts = [f"{counts[h]} {h.value}" for h in shown]
    noun = "module" if counts[shown[0]] == 1 else "modules"
    parts[0] = f"{counts[shown[0]]} {noun} {shown[0].value}"
    return f"{', '.join(parts)}; {proxies} prox{'y' if proxies == 1 else 'ies'}"


class ServiceNotifier:
    """The daemon's side of the conversation with systemd."""

    def __init__(self, notifier: Notifier, watchdog_usec: int | None = None) -> None:
        self.notifier = notifier
        self.watchdog_usec = watchdog_usec if notifier.enabled else None
        #: What the daemon is doing besides serving: shown before the counts.
        self.phase: str | None = "starting"
        self._sent_status: str | None = None
        self._logged_error: str | None = None

    @classmethod
    def from_environment(cls) -> ServiceNotifier:
        """Read (and unset) $NOTIFY_SOCKET and the watchdog variables."""
        return cls(Notifier.from_environment(), take_watchdog_usec())

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self.notifier.enabled

    async def _send(self, **fields: object) -> None:
        """Send one message, waiting (without blocking the loop) while the manager is busy."""
        message = notify_message(fields)
        error = f"not taken within {NOTIFY_TIMEOUT:g}s"
        with trio.move_on_after(NOTIFY_TIMEOUT):
            while True:
                try:
                    self.notifier.send(message)
                except BlockingIOError:
                    await trio.sleep(NOTIFY_RETRY)
                    continue
                except OSError as exc:
                    error = describe_error(exc)
                    break
                self._logged_error = None
                return
        if error != self._logged_error:  # once per kind of failure, not once per ping
            self._logged_error = error
            log.warning("systemd.notify_failed", error=error, message=sorted(fields))

    def _status_text(self, summary: str) -> str:
        return f"{self.phase}: {summary}" if self.phase else summary

    async def ready(self, summary: str) -> None:
        """Started, or done reloading: READY=1 with the current counts."""
        self.phase = None
        self._sent_status = self._status_text(summary)
        await self._send(READY=1, STATUS=self._sent_status)

    async def reloading(self, summary: str) -> None:
        """A reload begins: RELOADING=1 stamped with the time it began, as systemd asks."""
        self.phase = "reloading"
        self._sent_status = self._status_text(summary)
        stamp = monotonic_usec()
        await self._send(RELOADING=1, MONOTONIC_USEC=stamp, STATUS=self._sent_status)

    async def stopping(self, summary: str) -> None:
        """The daemon is stopping its workers: STOPPING=1."""
        self.phase = "stopping"
        self._sent_status = self._status_text(summary)
        await self._send(STOPPING=1, STATUS=self._sent_status)

    async def starting(self, modules: int) -> None:
        """Before READY: how many modules are being started."""
        self._sent_status = f"starting {modules} module{'' if modules == 1 else 's'}"
        await self._send(STATUS=self._sent_status)

    async def status(self, summary: str) -> None:
        """STATUS= with ``summary``, if it says something new (not before READY)."""
        if self.phase == "starting":
            return  # READY=1 brings the first counts; until then, "starting N modules"
        text = self._status_text(summary)
        if text != self._sent_status:
            self._sent_status = text
            await self._send(STATUS=text)

    async def keep_watchdog(self) -> None:
        """Ping the watchdog from the event loop for as long as the loop runs."""
        if self.watchdog_usec is None:
            return
        interval = self.watchdog_usec / 1e6 / WATCHDOG_PINGS_PER_INTERVAL
        log.info("systemd.watchdog", interval=round(interval, 3),
                 timeout=self.watchdog_usec / 1e6)  # fmt: skip
        while True:
            await self._send(WATCHDOG=1)
            await trio.sleep(interval)

    async def follow(self, events: EventBus, summary: Callable[[], str]) -> None:
        """Keep STATUS= current: recount after every burst of module or proxy events."""
        if not self.enabled:
            return
        subscription = events.subscribe(0)  # unbounded: the notifier must never be cut off
        try:
            while True:
                await subscription.wait()
                if not subscription.queue:
                    return  # closed
                subscription.queue.clear()  # everything queued is one burst: one STATUS=
                await self.status(summary())
        finally:
            events.unsubscribe(subscription)

    def close(self) -> None:
        """Close the notification socket."""
        self.notifier.close()
