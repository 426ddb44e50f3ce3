"""The lifecycle machine promotes a standby only if it loaded the code on disk now (no I/O)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from ipad.daemon.backoff import RestartTracker
from ipad.daemon.lifecycle import (
    AllowStandby,
    Effect,
    Lifecycle,
    Promote,
    Ready,
    Restart,
    Start,
    StopWorker,
    may_promote,
)
from ipad.daemon.states import WorkerState
from tests.test_lifecycle import CLEAN, LifecycleModel, World, policy, state, world


def _with_standby(code: str | None) -> tuple[World, int]:
    """A running machine whose loaded standby said it loaded ``code``."""
    w = world()
    active = w.running()
    w.feed(AllowStandby())
    standby = w.launched(standby=True)
    del w.loading[standby]
    w.feed(Ready(standby, code_id=code))
    assert w.m.standby == standby
    assert w.m.standby_ready
    return w, active


def test_may_promote_only_equal_identities() -> None:
    """Equal identities promote; unknown against known, or different, do not."""
    assert may_promote("sha256:a", "sha256:a")
    assert may_promote(None, None)
    assert not may_promote("sha256:a", "sha256:b")
    assert not may_promote(None, "sha256:b")
    assert not may_promote("sha256:a", None)


def test_a_crash_promotes_a_standby_with_the_code_on_disk() -> None:
    """Unchanged code: a crash promotes the standby at once, as before."""
    w, active = _with_standby("sha256:old")
    standby = w.m.standby
    w.m.code = "sha256:old"
    w.exit(active)
    assert w.m.active == standby
    assert state(w) is WorkerState.RUNNING


def test_a_crash_after_an_edit_discards_the_stale_standby_and_launches_anew() -> None:
    """Edited code: the standby is ended (retired), a fresh worker launched, none promoted."""
    w, active = _with_standby("sha256:old")
    standby = w.m.standby
    w.m.code = "sha256:new"
    w.exit(active)
    assert state(w) is WorkerState.STARTING
    assert w.m.active is None
    assert w.m.standby is None
    assert w.launching[False]
    assert standby in w.ended
    stale = w.logged("worker.standby_stale")
    assert [r.fields["code_id"] for r in stale] == ["sha256:new"]
    fresh = w.launched()
    w.ready(fresh)
    assert state(w) is WorkerState.RUNNING
    w.exit(standby, CLEAN)
    assert w.m.workers() == [fresh]  # the stale standby is gone, the fresh worker serves


def test_a_restart_after_an_edit_discards_the_stale_standby() -> None:
    """``ipadctl restart`` after an edit: the standby goes with the old worker, a new one loads."""
    w, active = _with_standby("sha256:old")
    standby = w.m.standby
    w.m.code = "sha256:new"
    effects = w.feed(Restart())
    assert any(isinstance(e, StopWorker) and e.worker == active for e in effects)
    w.exit(active, CLEAN)
    assert w.m.active is None
    assert standby in w.ended
    assert w.launching[False]


def test_a_standby_whose_code_changed_while_it_loaded_is_never_promoted() -> None:
    """A standby with no identity (its files moved during its LOAD) is not promoted."""
    w, active = _with_standby(None)
    w.m.code = "sha256:same"
    w.exit(active)
    assert w.m.active is None
    assert w.launching[False]


CODES = st.sampled_from(["sha256:a", "sha256:b", None])


class CodeWorld(World):
    """A world that checks each promotion against the code on disk at that moment."""

    def __init__(self, machine: Lifecycle[int]) -> None:
        super().__init__(machine)
        self.promoted: list[int] = []

    def apply(self, effect: Effect) -> None:
        """As World's; a promoted standby must have loaded the code on disk now."""
        if isinstance(effect, Promote):
            assert may_promote(self.m.standby_code, self.m.code), (self.m.standby_code, self.m.code)
            self.promoted.append(effect.worker)
        super().apply(effect)


class CodeLifecycleModel(LifecycleModel):
    """The random model, with code edited at any time and workers loading any code."""

    def __init__(self) -> None:
        super().__init__()
        rules = policy(max_failures=3, initial_delay=0.01, cooldown_interval=1.0, stable_after=2.0)
        self.w = CodeWorld(Lifecycle("awb", rules, RestartTracker(rules, rand=lambda: 0.5)))
        self.w.feed(Start())

    @rule(code=CODES)
    def code_edited(self, code: str | None) -> None:
        """The module's files change (the supervisor tells the machine before a start)."""
        self.w.m.code = code

    @rule(data=st.data(), code=CODES)
    def load_answers_with_code(self, data: st.DataObject, code: str | None) -> None:
        """A loading worker says READY, having loaded ``code``."""
        if self.w.loading:
            worker = data.draw(st.sampled_from(sorted(self.w.loading)))
            del self.w.loading[worker]
            self.w.feed(Ready(worker, code_id=code))


TestCodeLifecycleModel = CodeLifecycleModel.TestCase
TestCodeLifecycleModel.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
