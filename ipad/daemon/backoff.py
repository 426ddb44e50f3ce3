"""When to start a module's worker again: restart mode, backoff, stability and cooldown.

Pure logic over timestamps the caller passes in (and a random source for the
jitter), so every rule is tested without processes, clocks or sleeps.

- The first restart after a healthy run is immediate.
- Consecutive failures wait ``initial_delay * multiplier**(n-1)``, capped at
  ``max_delay``, each changed at random by up to ``jitter`` of itself.
- A worker that stayed up for ``stable_after`` resets the count.
- A worker that *served* (said READY, then ran ``served_after``) and died on
  its own restarts at once and is not counted towards cooldown: a camera's
  module killed every few seconds keeps running. Starts that fail, and runs
  shorter than that, are the crash loops that back off and cool down.
- More than ``max_failures`` failures within ``failure_window``: cooldown, a
  fixed ``cooldown_interval`` between attempts instead of giving up for good.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

import attrs

from ipad.config.model import RestartMode, RestartPolicy


class Action(enum.Enum):
    """What the supervisor does after a worker ended."""

    RESTART = "restart"
    COOLDOWN = "cooldown"
    STOP = "stop"


@attrs.frozen
class Decision:
    """The next step and how long to wait before it."""

    action: Action
    delay: float = 0.0
    reason: str = ""


def backoff(policy: RestartPolicy, failures: int) -> float:
    """The wait after ``failures`` failures in a row, without jitter.

    ``initial_delay * multiplier**(failures - 1)``, capped at ``max_delay``:
    restarts add their jitter to it, standbys wait it as it is.
    """
    return min(policy.initial_delay.seconds * policy.multiplier ** (failures - 1),
               policy.max_delay.seconds)  # fmt: skip


class RestartTracker:
    """One module's failure history."""

    __slots__ = ("_failures", "_rand", "consecutive", "in_cooldown", "policy", "started_at")

    def __init__(self, policy: RestartPolicy, rand: Callable[[], float] = random.random) -> None:
        self.policy = policy
        self._rand = rand
        self.consecutive = 0
        #: When each failure within the window happened (a list: it stays short, and an
        #: empty deque costs a module 0.6 KiB).
        self._failures: list[float] = []
        self.started_at: float | None = None
        self.in_cooldown = False

    def started(self, now: float) -> None:
        """A worker was started (or is being started) at ``now``."""
        self.started_at = now

    def ended(
        self, now: float, *, failed: bool, requested: bool = False, served: bool = False
    ) -> Decision:
        """A worker ended at ``now``; ``failed`` unless it exited cleanly when asked or by itself.

        ``requested`` is a stop or restart the operator asked for: never a failure.
        ``served``: it was ready and answering for ``served_after`` before it died;
        its failure restarts at once and stays out of the cooldown count, unless
        the module is in cooldown already (only ``stable_after`` ends that).
        """
        policy = self.policy
        up_for = now - self.started_at if self.started_at is not None else 0.0
        if up_for >= policy.stable_after.seconds:
            self.consecutive = 0
            self.in_cooldown = False
        if requested:
            self.consecutive = 0
            return Decision(Action.RESTART, 0.0, "restart requested")
        if not failed:
            if policy.restart is RestartMode.ALWAYS:
                return Decision(Action.RESTART, 0.0, "exited cleanly; restart = always")
            return Decision(Action.STOP, 0.0, f"exited cleanly; restart = {policy.restart.value}")
        if policy.restart is RestartMode.NEVER:
            return Decision(Action.STOP, 0.0, "failed; restart = never")
        return self._failed(now, served=served)

    def _failed(self, now: float, *, served: bool) -> Decision:
        """A failure to be restarted from: at once, after a backoff, or in cooldown."""
        policy = self.policy
        if served and not self.in_cooldown:
            self.consecutive = 1  # as the first failure after a healthy run
            return Decision(Action.RESTART, 0.0, "failed after serving")
        self._failures.append(now)
        window = policy.failure_window.seconds
        self._failures = [when for when in self._failures if now - when <= window]
        self.consecutive += 1
        if len(self._failures) > policy.max_failures or self.in_cooldown:
            self.in_cooldown = True
            return Decision(
                Action.COOLDOWN,
                policy.cooldown_interval.seconds,
                f"{len(self._failures)} failures within {policy.failure_window}",
            )
        return Decision(Action.RESTART, self.delay(self.consecutive), "failed")

    def delay(self, consecutive: int) -> float:
        """The wait before restart number ``consecutive`` of a failing run."""
        if consecutive <= 1:
            return 0.0  # the first restart after a healthy run is immediate
        policy = self.policy
        base = backoff(policy, consecutive - 1)
        spread = base * policy.jitter
        return max(0.0, min(policy.max_delay.seconds, base + spread * (2 * self._rand() - 1)))

    def reset(self) -> None:
        """The operator ended a cooldown (``ipadctl restart``): start over."""
        self.consecutive = 0
        self._failures.clear()
        self.in_cooldown = False
