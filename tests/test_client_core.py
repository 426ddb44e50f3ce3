"""The proxy core both clients drive, without I/O: its state table and its recovery decisions."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipad.client._core import ProxyInfo
from ipad.client._core_proxy import (
    MOVES,
    PUBLIC_STATE,
    IllegalMove,
    ProxyCore,
    ProxyState,
)
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    Disconnected,
    ModuleUnavailable,
    TimedOut,
    UnknownProxy,
    WorkerCrashed,
)

STATES = list(ProxyState)


def info(proxy_id: int = 1, seq: int = 10, call_timeout: float | None = None) -> ProxyInfo:
    """A grant's details for a module with one setup method, ``init``, undone by ``stop``."""
    return ProxyInfo(
        proxy_id=proxy_id, module="awb", module_version="1", worker_pid=100,
        methods=("init", "stop", "get"), setup_methods=frozenset({"init"}),
        undoes={"stop": "init"}, seq=seq, call_timeout=call_timeout,
    )  # fmt: skip


def granted(proxy_id: int = 1, served_by: str = "") -> p.ProxyGranted:
    """A PROXY_GRANTED for the ``awb`` module."""
    return p.ProxyGranted(
        proxy_id=proxy_id, module="awb", module_version="1", worker_pid=200, methods=(), state="valid",
        seq=20, served_by=served_by,
    )  # fmt: skip


def test_closed_is_final_and_every_other_state_can_close() -> None:
    """No move leaves CLOSED; every state can be closed; valid is reachable from every live state."""
    assert MOVES[ProxyState.CLOSED] == frozenset()
    for state in STATES:
        if state is not ProxyState.CLOSED:
            assert ProxyState.CLOSED in MOVES[state]
            assert state is ProxyState.VALID or ProxyState.VALID in MOVES[state]
    assert set(PUBLIC_STATE) == set(STATES)


@given(st.lists(st.sampled_from(STATES), max_size=30))
def test_moves_follow_the_table_and_an_illegal_one_changes_nothing(path: list[ProxyState]) -> None:
    """Any sequence of moves: allowed ones happen, others raise IllegalMove and leave the state."""
    core = ProxyCore(info())
    for to in path:
        before = core.phase
        if to is before or to in MOVES[before]:
            core.move(to, "why")
            assert core.phase is to
        else:
            with pytest.raises(IllegalMove):
                core.move(to, "why")
            assert core.phase is before
        assert core.state == PUBLIC_STATE[core.phase]


@given(
    st.lists(
        st.sampled_from(
            ["channel", "connection", "event", "adopt", "refused", "reattach", "close"]
        ),
        max_size=30,
    )
)
def test_whatever_happens_the_core_never_makes_an_illegal_move(events: list[str]) -> None:
    """Every event a driver reports, in any order, makes a legal move (or none); closed stays closed."""
    core = ProxyCore(info())
    seq = 10
    for what in events:
        closed = core.closed
        if what == "channel":
            core.channel_lost("worker died")
        elif what == "connection":
            core.connection_lost("daemon gone", final=False)
        elif what == "event":
            seq += 1
            core.on_event(p.Event(seq=seq, kind="proxy", module="awb", proxy_id=1, state="invalid"))
        elif what == "adopt" and not core.closed:
            core.adopted(granted())
        elif what == "refused" and not core.closed:
            core.refused(ModuleUnavailable("not running"), 0.0, None)
        elif what == "reattach":
            core.reattached(2)
        elif what == "close":
            core.closed_by("released")
        assert not closed or core.closed  # closed stays closed
        assert (core.phase is ProxyState.VALID) == (core.state == "valid")


def test_a_crash_then_a_replay_makes_the_proxy_valid_and_counts_it() -> None:
    """Channel lost -> recovering; adopted -> valid, recoveries + 1, PROXY_READY with the count."""
    core = ProxyCore(info())
    core.recorded("init", {"x": 1}, None)
    core.recorded("get", None, None)  # not a setup method: not replayed
    assert core.channel_lost("worker exited with signal SIGKILL")
    assert not core.channel_lost("again")  # already recovering: no move
    assert (core.state, core.reason) == ("invalid", "worker exited with signal SIGKILL")
    assert core.reopen_message(same_connection=True) == p.ReopenProxy(1)
    assert [call.method for call, _ in core.replay_calls()] == ["init"]
    ready = core.adopted(granted(served_by="steady"))
    assert ready == p.ProxyReady(1, 1)
    assert (core.state, core.reason, core.recoveries) == ("valid", "fallback", 1)


def test_replay_is_the_latest_setup_calls_in_order() -> None:
    """The replay sends each setup call's latest version, in order; an undone one not at all."""
    core = ProxyCore(
        ProxyInfo(
            proxy_id=1,
            module="awb",
            module_version="1",
            worker_pid=1,
            methods=(),
            setup_methods=frozenset({"init", "configure", "start"}),
            undoes={"stop": "start"},
            seq=1,
        )
    )
    read, write = os.pipe()
    try:
        core.recorded("init", {"a": 1}, None)
        core.recorded("configure", {"b": 1}, {"table": read})
        core.recorded("start", None, None)
        core.recorded("configure", {"b": 2}, None)  # the latest replaces the earlier
        core.recorded("stop", None, None)  # undoes start
        calls = core.replay_calls()
        assert [(c.method, c.args) for c, _ in calls] == [
            ("init", {"a": 1}),
            ("configure", {"b": 2}),
        ]
        assert all(fds == [] for _, fds in calls)
    finally:
        core.setup_log.close()
        os.close(read)
        os.close(write)


def test_after_a_reconnection_the_proxy_is_requested_anew_under_a_new_id() -> None:
    """Lost with the daemon connection: REQUEST_PROXY on the new one, then valid under its new id."""
    core = ProxyCore(info(proxy_id=3), pipeline="rkisp1", pipeline_version=1)
    core.connection_lost("daemon closed the connection", final=False)
    assert (core.phase, core.state) == (ProxyState.LOST, "invalid")
    assert core.reopen_message(same_connection=False) == p.RequestProxy("awb", "rkisp1", 1)
    core.reattached(8)
    assert (core.phase, core.state) == (ProxyState.RECOVERING, "invalid")
    core.adopted(granted(proxy_id=8))
    assert (core.proxy_id, core.state) == (8, "valid")


def test_a_final_disconnection_leaves_no_recovery() -> None:
    """Without reconnection the proxy is unusable once its channel goes: calls get Disconnected."""
    core = ProxyCore(info())
    core.connection_lost("daemon closed the connection", final=True)
    core.channel_lost("worker closed the channel")
    error = core.unusable()
    assert isinstance(error, Disconnected)
    assert error.message == "daemon closed the connection"


def test_a_refusal_closes_or_backs_off_and_says_why() -> None:
    """UnknownProxy closes the proxy for good; ModuleUnavailable backs off with the daemon's reason."""
    core = ProxyCore(info())
    core.channel_lost("worker died")
    error = core.refused(ModuleUnavailable("awb is not running", {"state": "backoff"}), 5.0, None)
    assert isinstance(error, CallNotSent)
    assert "awb is not running" in error.message
    assert "(proxy invalid: worker died)" in error.message
    assert core.backoff.failures == 1
    assert core.backoff.next_at > 5.0
    assert core.failure is error
    assert core.state == "invalid"
    closed = core.refused(UnknownProxy("no proxy 1"), 6.0, None)
    assert core.state == "closed"
    assert closed.details["closed"] is True
    assert isinstance(core.unusable(), CallNotSent)


def test_a_replay_that_crashed_again_is_not_backed_off_but_other_failures_are() -> None:
    """A new worker crashing during the replay is the daemon's to pace; a refused call is ours."""
    core = ProxyCore(info())
    core.channel_lost("worker died")
    crashed = core.replay_failed(WorkerCrashed("awb: worker closed the channel"), 1.0)
    assert "replaying its setup failed" in crashed.message
    assert core.backoff.failures == 0
    core.replay_failed(ModuleUnavailable("bad arguments"), 1.0)
    assert core.backoff.failures == 1


def test_not_reopenable_when_the_module_event_says_it_cannot_serve() -> None:
    """A module stopped or failed is not asked; running, starting, backoff, cooldown are."""
    core = ProxyCore(info())
    for state in ("running", "starting", "exited", "backoff", "cooldown"):
        event = p.Event(seq=1, kind="module", module="awb", state=state)
        assert core.not_reopenable(event) is None
    failed = p.Event(seq=2, kind="module", module="awb", state="failed", reason="exit 1")
    error = core.not_reopenable(failed)
    assert error is not None
    assert error.details["state"] == "failed"
    assert "awb is failed: exit 1" in error.message


def test_the_grants_call_timeout_is_the_default_deadline() -> None:
    """A call without ``timeout`` is bounded by the grant's call_timeout; one given overrides it."""
    core = ProxyCore(info(call_timeout=2.0))
    assert core.bounds(10.0, None, None).deadline == 12.0
    assert core.bounds(10.0, 0.5, None).deadline == 10.5
    assert ProxyCore(info()).bounds(10.0, None, None).deadline is None
    error = core.timed_out("get", 2.0, sent=True)
    assert isinstance(error, TimedOut)
    assert error.details == {"sent": True}
    assert core.timed_out("get", 2.0, sent=False).details == {"sent": False}


def test_events_older_than_the_grant_or_after_close_change_nothing() -> None:
    """An event from before the grant is ignored, a later "invalid" is not; nothing reopens a closed one."""
    core = ProxyCore(info(seq=10))
    assert not core.on_event(
        p.Event(seq=9, kind="proxy", module="awb", proxy_id=1, state="invalid")
    )
    assert core.state == "valid"
    fresh = p.Event(seq=11, kind="proxy", module="awb", proxy_id=1, state="invalid",
                    reason="worker exited with signal SIGKILL")  # fmt: skip
    assert not core.on_event(fresh)
    assert (core.state, core.reason) == ("invalid", "worker exited with signal SIGKILL")
    assert core.on_event(
        p.Event(seq=12, kind="proxy", module="awb", proxy_id=1, state="closed", reason="revoked")
    )
    assert (core.state, core.reason) == ("closed", "revoked")
    core.on_event(p.Event(seq=13, kind="proxy", module="awb", proxy_id=1, state="invalid"))
    assert core.state == "closed"
