"""The decisions both clients share, without I/O: backoff, deadlines, what a caller is told."""

from __future__ import annotations

import math

import pytest

from ipad.client._core import (
    RECONNECT_INITIAL,
    RECONNECT_JITTER,
    RECONNECT_MAX,
    RECONNECT_STABLE,
    Backoff,
    Bounds,
    closed_error,
    not_sent,
    proxy_news,
    unavailable_details,
)
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    Disconnected,
    ModuleUnavailable,
    TimedOut,
    UnknownProxy,
)


def test_backoff_first_attempt_at_once_then_doubling_to_the_cap() -> None:
    """Failures lengthen the delay from RECONNECT_INITIAL, doubling, up to RECONNECT_MAX."""
    backoff = Backoff(rand=lambda: 0.0)
    assert backoff.wait(0.0) == 0.0
    delays = [backoff.failed(0.0) for _ in range(10)]
    assert delays[:3] == [RECONNECT_INITIAL, 2 * RECONNECT_INITIAL, 4 * RECONNECT_INITIAL]
    assert delays[-1] == RECONNECT_MAX
    assert delays == sorted(delays)
    assert backoff.wait(0.5) == pytest.approx(RECONNECT_MAX - 0.5)
    backoff.reset()
    assert (backoff.wait(0.0), backoff.next_at) == (0.0, -math.inf)


def test_backoff_jitter_only_lengthens_by_up_to_its_fraction() -> None:
    """The random part adds at most RECONNECT_JITTER of each delay, never takes any away."""
    longest = Backoff(rand=lambda: 1.0)
    assert longest.failed(0.0) == pytest.approx(RECONNECT_INITIAL * (1 + RECONNECT_JITTER))
    shortest = Backoff(rand=lambda: 0.0)
    assert shortest.failed(0.0) == RECONNECT_INITIAL


def test_a_connection_lost_soon_after_it_was_made_counts_as_a_failure() -> None:
    """A daemon that accepts and at once drops connections still sees the backoff."""
    backoff = Backoff(rand=lambda: 0.0)
    for n in range(5):
        backoff.up(float(n))
        backoff.down(n + 0.001)
    assert backoff.failures == 5
    assert backoff.wait(4.001) == pytest.approx(16 * RECONNECT_INITIAL)
    backoff.up(100.0)
    backoff.down(100.0 + RECONNECT_STABLE)  # lasted: a success, the next attempt is at once
    assert (backoff.failures, backoff.wait(100.0 + RECONNECT_STABLE)) == (0, 0.0)
    backoff.down(200.0)  # no connection was up: nothing to count
    assert backoff.failures == 0


def test_bounds_the_earlier_limit_rules_the_recovery() -> None:
    """``timeout`` holds for the whole call, ``wait`` for the recovery; each says so when hit."""
    both = Bounds.of(10.0, timeout=2.0, wait=5.0)
    assert (both.deadline, both.recovery, both.until) == (12.0, 15.0, 12.0)
    timed_out = both.expired(12.0, "awb", "worker exited with signal SIGKILL")
    assert isinstance(timed_out, TimedOut)
    assert timed_out.details == {"sent": False}
    assert "SIGKILL" in timed_out.message
    waited = Bounds.of(10.0, timeout=None, wait=0.03).expired(10.03, "awb", None)
    assert isinstance(waited, CallNotSent)
    assert waited.message == "awb did not recover within 0.03s"
    assert Bounds.of(0.0, None, None).until is None


def test_proxy_news_ignores_events_older_than_the_grant_and_valid() -> None:
    """Only a later "invalid" or "closed" changes a proxy; "valid" is the client's own call."""
    invalid = p.Event(seq=11, kind="proxy", module="awb", proxy_id=1, state="invalid",
                      reason="worker exited with signal SIGKILL")  # fmt: skip
    assert proxy_news(invalid, seq=10) == ("invalid", "worker exited with signal SIGKILL")
    assert proxy_news(invalid, seq=11) is None
    valid = p.Event(seq=12, kind="proxy", module="awb", proxy_id=1, state="valid")
    assert proxy_news(valid, seq=10) is None


def test_not_sent_carries_the_daemons_reason_and_cooldown() -> None:
    """A failed reopen becomes CallNotSent with the daemon's details, its error as the cause."""
    details = {"state": "cooldown", "reason": "worker exited with signal SIGKILL; 2 failures",
               "cooldown_interval": 30.0}  # fmt: skip
    cause = ModuleUnavailable("awb is unavailable (cooldown): worker exited", details)
    error = not_sent("awb", cause, "worker exited with signal SIGKILL")
    assert error.details["state"] == "cooldown"
    assert error.__cause__ is cause
    assert "the daemon tries it again every 30s" in error.message
    assert "(proxy invalid: worker exited with signal SIGKILL)" in error.message
    closed = not_sent("awb", UnknownProxy("no proxy 3 on this connection"))
    assert closed.details["closed"] is True
    gone = not_sent("awb", Disconnected("cannot reach the daemon"))
    assert "cannot reach the daemon" in gone.message
    assert closed_error("awb", "access revoked").details == {"closed": True}


def test_unavailable_details_from_a_module_event() -> None:
    """A module event's state and reason, for a failure the daemon explained no further."""
    event = p.Event(seq=3, kind="module", module="awb", state="failed", reason="exited 3")
    assert unavailable_details(event) == {"state": "failed", "reason": "exited 3"}
    assert unavailable_details(None) == {}
