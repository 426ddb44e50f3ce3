"""The lifecycle machine promotes a standby only if it loaded the code on disk now (no I/O)."""

from __future__ import annotations

from ipad.daemon.lifecycle import AllowStandby, Ready, Restart, StopWorker, may_promote
from ipad.daemon.states import WorkerState
from tests.test_lifecycle import CLEAN, World, state, world


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
