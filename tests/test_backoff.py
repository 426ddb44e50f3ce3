"""Restart decisions: immediate first restart, exponential backoff, stability, cooldown."""

from __future__ import annotations

import attrs
import pytest

from ipad.config.duration import Duration
from ipad.config.model import RestartMode, RestartPolicy
from ipad.daemon.backoff import Action, RestartTracker

POLICY = RestartPolicy(
    initial_delay=Duration(0.01),
    max_delay=Duration(1.0),
    multiplier=2.0,
    jitter=0.0,
    stable_after=Duration(10.0),
    max_failures=5,
    failure_window=Duration(60.0),
    cooldown_interval=Duration(30.0),
)


def fail_at(tracker: RestartTracker, start: float, end: float) -> tuple[Action, float]:
    """Start a worker at ``start`` that fails at ``end``; return the decision."""
    tracker.started(start)
    decision = tracker.ended(end, failed=True)
    return decision.action, decision.delay


def test_first_restart_is_immediate_then_backoff_doubles_to_the_cap() -> None:
    """0, then 10 ms, 20 ms, 40 ms ... capped at max_delay."""
    tracker = RestartTracker(attrs.evolve(POLICY, max_failures=100))
    delays = [fail_at(tracker, t, t + 0.001)[1] for t in range(10)]
    assert delays == pytest.approx([0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0])


def test_jitter_stays_within_its_fraction() -> None:
    """Jitter moves a delay by at most its fraction, both ways."""
    policy = attrs.evolve(POLICY, jitter=0.5, max_failures=100)
    low = RestartTracker(policy, rand=lambda: 0.0)
    high = RestartTracker(policy, rand=lambda: 1.0)
    assert low.delay(3) == pytest.approx(0.02 * 0.5)
    assert high.delay(3) == pytest.approx(0.02 * 1.5)
    assert high.delay(50) == pytest.approx(1.0)  # never above the cap


def test_a_stable_run_resets_the_backoff() -> None:
    """After a run of stable_after or longer, the next failure restarts at once."""
    tracker = RestartTracker(POLICY)
    fail_at(tracker, 0, 0.1)
    assert fail_at(tracker, 1, 1.1)[1] == pytest.approx(0.01)
    assert fail_at(tracker, 2, 20) == (Action.RESTART, 0.0)


def test_too_many_failures_enter_cooldown_and_stay_until_stable() -> None:
    """More than max_failures in the window: cooldown at the fixed interval, not giving up."""
    tracker = RestartTracker(POLICY)
    actions = [fail_at(tracker, t, t + 0.1)[0] for t in range(6)]
    assert actions == [Action.RESTART] * 5 + [Action.COOLDOWN]
    assert fail_at(tracker, 40, 40.1) == (Action.COOLDOWN, 30.0)
    # A run longer than stable_after ends the cooldown.
    assert fail_at(tracker, 100, 120) == (Action.RESTART, 0.0)


def test_failures_outside_the_window_do_not_count() -> None:
    """Failures older than failure_window fall out of the count."""
    tracker = RestartTracker(attrs.evolve(POLICY, failure_window=Duration(5.0)))
    actions = [fail_at(tracker, t * 2, t * 2 + 0.1)[0] for t in range(10)]
    assert Action.COOLDOWN not in actions


def test_reset_ends_a_cooldown() -> None:
    """`ipadctl restart` resets the history: the next failure restarts at once."""
    tracker = RestartTracker(POLICY)
    for t in range(6):
        fail_at(tracker, t, t + 0.1)
    assert tracker.in_cooldown
    tracker.reset()
    assert tracker.consecutive == 0
    assert fail_at(tracker, 10, 10.1) == (Action.RESTART, 0.0)


@pytest.mark.parametrize(
    ("mode", "failed", "action"),
    [
        (RestartMode.ALWAYS, False, Action.RESTART),
        (RestartMode.ON_FAILURE, False, Action.STOP),
        (RestartMode.NEVER, False, Action.STOP),
        (RestartMode.ALWAYS, True, Action.RESTART),
        (RestartMode.ON_FAILURE, True, Action.RESTART),
        (RestartMode.NEVER, True, Action.STOP),
    ],
)
def test_restart_modes(mode: RestartMode, failed: bool, action: Action) -> None:
    """Mode "always" restarts any exit, "on-failure" only failures, "never" nothing."""
    tracker = RestartTracker(attrs.evolve(POLICY, restart=mode))
    tracker.started(0)
    assert tracker.ended(1, failed=failed).action is action


def test_requested_restart_is_not_a_failure() -> None:
    """A restart the operator asked for is immediate and resets the count."""
    tracker = RestartTracker(POLICY)
    fail_at(tracker, 0, 0.1)
    tracker.started(1)
    decision = tracker.ended(1.1, failed=False, requested=True)
    assert (decision.action, decision.delay) == (Action.RESTART, 0.0)
    assert tracker.consecutive == 0
