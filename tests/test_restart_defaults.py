"""The restart rules for cameras, without processes: served crashes, promotion, crash loops.

A module killed every couple of seconds at 30 frames/s must not be out for
seconds while a loaded standby waits, nor put into cooldown; a module that
fails as it starts (or within ms of every start) must still back off and
cool down. Each test drives the pure lifecycle machine (tests/test_lifecycle.py's
World) with the shipped defaults unless it names the keys it changes.
"""

from __future__ import annotations

import pytest

from ipad.config.model import RestartPolicy
from ipad.daemon.backoff import Action, RestartTracker
from ipad.daemon.lifecycle import AllowStandby, ExitStatus, Hung, Start, Timer
from ipad.daemon.states import WorkerState
from tests.test_lifecycle import World, state, world

DEFAULTS = RestartPolicy()
SERVED = DEFAULTS.served_after.seconds


def promote_and_refill(w: World) -> int:
    """The standby launched after a promotion loads; return it."""
    standby = w.launched(standby=True)
    w.ready(standby)
    return standby


def backoff_delay(w: World) -> float:
    """The delay of the last backoff the machine logged."""
    delay = w.logged("module.backoff")[-1].fields["delay"]
    assert isinstance(delay, float)
    return delay


def kill_loop_with_standby(w: World, kills: int, every: float) -> list[WorkerState]:
    """Kill the active worker ``kills`` times, ``every`` seconds apart, a loaded standby each time.

    Returns the state the module is in right after each kill.
    """
    w.running(standby=True)
    after = []
    for _ in range(kills):
        w.now += every
        active = w.m.active
        assert active is not None
        w.exit(active)
        after.append(state(w))
        if state(w) is WorkerState.RUNNING:
            promote_and_refill(w)
    return after


def test_the_camera_kill_loop_never_waits_nor_cools_down() -> None:
    """10 kills in 20 s, each of a worker that served: every one promotes the standby at once."""
    w = world()
    after = kill_loop_with_standby(w, kills=10, every=2.0)
    assert after == [WorkerState.RUNNING] * 10
    assert WorkerState.BACKOFF not in w.states_named()
    assert WorkerState.COOLDOWN not in w.states_named()
    assert not w.logged("module.backoff")
    assert w.m.tracker.consecutive == 1  # each kill reads as the first after a healthy run


def test_the_old_defaults_made_the_same_loop_wait_then_cool_down() -> None:
    """The policy before (nothing served, promotions wait out the backoff) on the same loop."""
    w = world(served_after=3600.0, promote_at_once=False)
    w.running(standby=True)
    delays = []
    for _ in range(10):
        w.now += 2.0
        active = w.m.active
        assert active is not None
        w.exit(active)
        if state(w) is WorkerState.BACKOFF:
            delays.append(w.logged("module.backoff")[-1].fields["delay"])
            w.fire(Timer.RESTART)
        if state(w) is WorkerState.COOLDOWN:
            break
        promote_and_refill(w)
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.08])
    assert state(w) is WorkerState.COOLDOWN


def test_a_ready_standby_is_promoted_without_backoff_even_after_short_runs() -> None:
    """Kills faster than served_after still promote a loaded standby at once; they count."""
    w = world()
    after = kill_loop_with_standby(w, kills=DEFAULTS.max_failures, every=SERVED / 4)
    assert after == [WorkerState.RUNNING] * DEFAULTS.max_failures
    assert WorkerState.BACKOFF not in w.states_named()
    skipped = w.logged("module.backoff_skipped")
    assert [r.fields["delay"] for r in skipped] == pytest.approx([0.01, 0.02, 0.04, 0.08])
    # One more within the window: a loop of short runs is contained all the same.
    w.now += SERVED / 4
    active = w.m.active
    assert active is not None
    w.exit(active)
    assert state(w) is WorkerState.COOLDOWN
    assert Timer.RESTART in w.timers


def test_a_start_crash_loop_backs_off_then_cools_down() -> None:
    """A worker that dies before READY, every time: growing backoff, then cooldown, as before."""
    w = world()
    w.running(standby=True)
    w.now = 100.0
    active = w.m.active
    assert active is not None
    w.exit(active)  # the standby is promoted; from now on every start dies in LOAD
    new_standby = w.launched(standby=True)
    w.exit(new_standby, ExitStatus(code=7))  # dies as it loads: the standby backs off too
    w.exit(w.m.active)  # type: ignore[arg-type]
    delays: list[float] = []
    while state(w) is not WorkerState.COOLDOWN:
        assert state(w) in (WorkerState.BACKOFF, WorkerState.STARTING), state(w)
        if state(w) is WorkerState.BACKOFF:
            delays.append(backoff_delay(w))
            w.now += delays[-1]
            w.fire(Timer.RESTART)
        w.now += 0.05
        w.exit(w.launched(), ExitStatus(code=7))
    # The served crash that began it is not counted: six failed starts are.
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])
    assert not w.logged("module.backoff_skipped")
    assert w.logged("module.cooldown")[0].fields["retry_in"] == DEFAULTS.cooldown_interval.seconds


def test_a_crash_within_ms_of_every_start_backs_off_then_cools_down() -> None:
    """READY, then dead a few ms later, every time and with no standby ready: not served."""
    w = world()
    w.running()
    w.feed(AllowStandby())
    seen = []
    for _ in range(20):
        w.now += 0.005
        active = w.m.active
        assert active is not None
        w.exit(active)
        seen.append(state(w))
        if state(w) is WorkerState.COOLDOWN:
            break
        if state(w) is WorkerState.BACKOFF:
            w.now += backoff_delay(w)
            w.fire(Timer.RESTART)
        w.ready(w.launched())
        if w.launching.get(True):  # the standby after it has not loaded when the next dies
            w.launch_failed(standby=True, reason="cancelled")
    assert WorkerState.BACKOFF in seen
    assert seen[-1] is WorkerState.COOLDOWN
    assert len(seen) == DEFAULTS.max_failures + 1


def test_a_hung_worker_did_not_serve() -> None:
    """A hang killed by the daemon counts as a failure however long the worker ran."""
    w = world()
    w.running()
    for _ in range(DEFAULTS.max_failures + 1):
        w.now += 2 * SERVED
        active = w.m.active
        if active is None:
            w.fire(Timer.RESTART)
            active = w.launched()
            w.ready(active)
            w.now += 2 * SERVED
        w.feed(Hung(active, "ping"))
        w.exit(active)
    assert state(w) is WorkerState.COOLDOWN


def test_served_crashes_in_cooldown_stay_in_cooldown_until_stable() -> None:
    """Once in cooldown, only a run of stable_after ends it: a served crash does not."""
    tracker = RestartTracker(DEFAULTS, rand=lambda: 0.5)
    for t in range(DEFAULTS.max_failures + 1):
        tracker.started(float(t))
        tracker.ended(t + 0.01, failed=True)
    assert tracker.in_cooldown
    tracker.started(100.0)
    assert tracker.ended(100.0 + 2 * SERVED, failed=True, served=True).action is Action.COOLDOWN
    tracker.started(200.0)
    stable = 200.0 + DEFAULTS.stable_after.seconds
    assert tracker.ended(stable, failed=True, served=True).action is Action.RESTART


def test_served_crashes_do_not_fill_the_failure_window() -> None:
    """Served crashes between failed starts leave those starts' count where it was."""
    tracker = RestartTracker(DEFAULTS, rand=lambda: 0.5)
    decisions = []
    for t in range(3 * DEFAULTS.max_failures):
        tracker.started(float(t))
        decisions.append(tracker.ended(t + 0.5, failed=True, served=True))
    assert {d.action for d in decisions} == {Action.RESTART}
    assert {d.delay for d in decisions} == {0.0}


# --- isolation = "proxy": a per-proxy worker is a cell without a standby -------------------


def cell(**changes: object) -> World:
    """A per-proxy worker's machine: the same lifecycle, never allowed a standby."""
    return world(**changes)


def test_a_proxy_cell_killed_after_serving_restarts_at_once() -> None:
    """No standby: a served kill launches a new worker at once, never backs off or cools down."""
    w = cell()
    w.feed(Start())
    w.ready(w.launched())
    for _ in range(10):
        w.now += 2.0
        w.exit(w.m.active)  # type: ignore[arg-type]
        assert state(w) is WorkerState.STARTING
        assert w.launching[False]
        w.ready(w.launched())
    assert WorkerState.BACKOFF not in w.states_named()
    assert WorkerState.COOLDOWN not in w.states_named()
    assert not w.launching.get(True)


def test_a_proxy_cell_killed_fast_backs_off() -> None:
    """No standby to promote: short runs back off their launch, then cool down."""
    w = cell()
    w.feed(Start())
    w.ready(w.launched())
    for _ in range(DEFAULTS.max_failures + 1):
        w.now += SERVED / 4
        w.exit(w.m.active)  # type: ignore[arg-type]
        if state(w) is WorkerState.BACKOFF:
            w.fire(Timer.RESTART)
        if state(w) is WorkerState.COOLDOWN:
            break
        w.ready(w.launched())
    assert WorkerState.BACKOFF in w.states_named()
    assert state(w) is WorkerState.COOLDOWN


def test_a_stable_run_served_whatever_served_after_says() -> None:
    """With stable_after below served_after, a run of stable_after served: kills never cool down."""
    w = world(stable_after=SERVED / 2, max_failures=1)
    w.running()
    for _ in range(5):
        w.now += SERVED * 0.75  # stable, yet shorter than served_after
        w.exit(w.m.active)  # type: ignore[arg-type]
        assert state(w) is WorkerState.STARTING
        w.ready(w.launched())
    assert WorkerState.COOLDOWN not in w.states_named()


def test_a_standby_that_loads_during_a_backoff_is_promoted_at_once() -> None:
    """Two quick deaths with no standby loaded: the standby that then loads ends the backoff."""
    w = world()
    w.running(standby=True)
    w.exit(w.m.active)  # type: ignore[arg-type]  # the standby is promoted; a new one launches
    w.now += 0.01
    w.exit(w.m.active)  # type: ignore[arg-type]  # dead at once: no standby loaded yet
    assert state(w) is WorkerState.BACKOFF
    standby = w.launched(standby=True)
    w.ready(standby)
    assert state(w) is WorkerState.RUNNING
    assert w.m.active == standby
    assert Timer.RESTART not in w.timers
    assert w.logged("module.backoff_skipped")


def test_without_promote_at_once_a_standby_loaded_in_backoff_waits() -> None:
    """promote_at_once = false: the standby waits for the backoff's end, as a fresh start would."""
    w = world(promote_at_once=False)
    w.running(standby=True)
    w.exit(w.m.active)  # type: ignore[arg-type]
    w.now += 0.01
    w.exit(w.m.active)  # type: ignore[arg-type]
    standby = w.launched(standby=True)
    w.ready(standby)
    assert state(w) is WorkerState.BACKOFF
    w.fire(Timer.RESTART)
    assert state(w) is WorkerState.RUNNING
    assert w.m.active == standby
