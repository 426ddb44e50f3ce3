"""Request ids and reply matching, as both clients keep them, without I/O."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipad.client._backlog import RawModuleEvent
from ipad.client._core_requests import GIVEN_UP_KEPT, Match, RequestBook
from ipad.protocol import wire as p
from ipad.protocol.errors import Disconnected
from tests.test_fdpass import is_closed


def reply(request_id: int, value: object = None, fds: tuple[int, ...] = ()) -> p.Frame:
    """A RESULT frame answering ``request_id``."""
    return p.Frame(p.Result(value), request_id, fds)


@pytest.fixture
def fd() -> Iterator[int]:
    """A descriptor a reply carries; closed at the end if the book did not close it."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    yield read_end
    if not is_closed(read_end):
        os.close(read_end)


def test_ids_count_up_and_are_never_reused() -> None:
    """Every request gets a new id, whatever became of the ones before."""
    book = RequestBook()
    first = book.open().request_id
    book.unsent(first)
    second = book.open().request_id
    book.give_up(second)
    third = book.open().request_id
    assert (first, second, third) == (1, 2, 3)
    assert book.last_id == book.newest == 3
    assert 3 in book
    assert len(book) == 1


def test_a_reply_is_kept_for_its_request_and_wakes_it() -> None:
    """A reply to a request not awaited now is kept until its caller collects it."""
    book = RequestBook()
    woken: list[int] = []
    one = book.open(wake=lambda: woken.append(1)).request_id
    two = book.open(wake=lambda: woken.append(2)).request_id
    assert book.collect(one) is None  # nothing came yet
    assert book.take(reply(two, "b")) is Match.REPLY
    assert woken == [2]
    assert book.take(reply(one, "a")) is Match.REPLY
    assert woken == [2, 1]
    frame = book.collect(two)
    assert frame is not None
    assert frame.message == p.Result("b")
    assert two not in book  # collected: gone from the book
    assert one in book
    with pytest.raises(KeyError):
        book.collect(two)


def test_events_and_goodbyes_are_told_apart_from_replies_whatever_their_id() -> None:
    """An event or a goodbye is never taken for a reply, even with a pending request's id."""
    book = RequestBook()
    pending = book.open().request_id
    event = p.Event(seq=1, kind="module", module="awb")
    assert book.take(p.Frame(event, pending)) is Match.EVENT
    assert book.take(p.Frame(p.ModuleEvent("tick", None), pending)) is Match.EVENT
    assert book.take(p.Frame(RawModuleEvent("tick"), pending)) is Match.EVENT
    assert book.take(p.Frame(p.Goodbye("bye"), pending)) is Match.GOODBYE
    assert book.collect(pending) is None
    assert book.dropped == 0


def test_a_late_reply_is_dropped_with_its_fds_and_counted_as_late(fd: int) -> None:
    """A reply to a request its caller gave up on is closed and counted, not handed on."""
    book = RequestBook()
    request_id = book.open().request_id
    book.give_up(request_id)
    assert request_id not in book
    assert book.take(reply(request_id, fds=(fd,))) is Match.LATE
    assert is_closed(fd)
    assert (book.late, book.unknown) == (1, 0)
    assert book.given_up == {}
    # A second reply to the same id answers nothing any more.
    assert book.take(reply(request_id)) is Match.UNKNOWN
    assert (book.late, book.unknown, book.dropped) == (1, 1, 2)


def test_a_reply_to_an_id_never_used_or_answered_already_is_unknown(fd: int) -> None:
    """A stray reply is dropped with its fds; a duplicate does not replace the first reply."""
    book = RequestBook()
    assert book.take(reply(99, fds=(fd,))) is Match.UNKNOWN
    assert is_closed(fd)
    request_id = book.open().request_id
    assert book.take(reply(request_id, "first")) is Match.REPLY
    assert book.take(reply(request_id, "second")) is Match.UNKNOWN
    frame = book.collect(request_id)
    assert frame is not None
    assert frame.message == p.Result("first")
    assert book.unknown == 2


def test_giving_up_after_the_reply_came_closes_it(fd: int) -> None:
    """A reply that came in the instant its caller gave up is dropped, fds and all."""
    book = RequestBook()
    request_id = book.open().request_id
    book.take(reply(request_id, fds=(fd,)))
    book.give_up(request_id)
    assert is_closed(fd)
    assert book.late == 1
    assert book.given_up == {}  # nothing more will come for it


def test_the_end_fails_what_waits_keeps_what_came_and_refuses_new_requests() -> None:
    """After the connection's end: waiting requests fail, answered ones keep their reply."""
    book = RequestBook()
    woken: list[str] = []
    answered = book.open(wake=lambda: woken.append("answered")).request_id
    waiting = book.open(wake=lambda: woken.append("waiting")).request_id
    book.take(reply(answered, "here"))
    book.fail_all(lambda: Disconnected("gone"))
    assert woken == ["answered", "waiting"]
    assert book.closed
    frame = book.collect(answered)
    assert frame is not None
    assert frame.message == p.Result("here")
    with pytest.raises(Disconnected, match="gone"):
        book.collect(waiting)
    assert waiting not in book
    with pytest.raises(Disconnected):
        book.open()


def test_only_the_newest_request_never_ran_and_only_after_a_reset() -> None:
    """A worker that died with packets unread never read the newest request; older ones, maybe."""
    book = RequestBook()
    older, newest = book.open().request_id, book.open().request_id
    assert not book.never_ran(newest)
    book.reset = True
    assert book.never_ran(newest)
    assert not book.never_ran(older)


def test_a_wait_is_overdue_at_its_deadline_which_a_later_caller_may_move() -> None:
    """A request's deadline is the current caller's: a kept grant's next caller sets its own."""
    book = RequestBook()
    request_id = book.open(deadline=10.0).request_id
    assert not book.overdue(request_id, 9.9)
    assert book.overdue(request_id, 10.0)
    book.wait_until(request_id, 20.0)
    assert not book.overdue(request_id, 15.0)
    book.wait_until(request_id, None)
    assert not book.overdue(request_id, 1e9)


def test_given_up_requests_are_remembered_up_to_a_bound() -> None:
    """A caller giving up again and again cannot grow the book without end; the oldest go first."""
    book = RequestBook()
    ids = [book.open().request_id for _ in range(GIVEN_UP_KEPT + 5)]
    for request_id in ids:
        book.give_up(request_id)
    assert len(book.given_up) == GIVEN_UP_KEPT
    assert book.take(reply(ids[0])) is Match.UNKNOWN  # forgotten: a stray now
    assert book.take(reply(ids[-1])) is Match.LATE


def test_close_closes_the_fds_of_replies_never_collected(fd: int) -> None:
    """Closing the connection closes what a reply kept for a later caller carried."""
    book = RequestBook()
    request_id = book.open().request_id
    book.take(reply(request_id, fds=(fd,)))
    book.close()
    assert is_closed(fd)
    assert len(book) == 0


# Each step: open a request, give one up, or receive a reply for some id (maybe never used).
STEPS = st.lists(
    st.one_of(
        st.just(("open", 0)),
        st.tuples(st.just("give_up"), st.integers(0, 12)),
        st.tuples(st.just("reply"), st.integers(0, 12)),
    ),
    max_size=60,
)


@given(STEPS)
def test_every_reply_reaches_its_own_request_at_most_once(steps: list[tuple[str, int]]) -> None:
    """Whatever order things happen in, a caller gets only its own reply, once; drops are counted."""
    book = RequestBook()
    waiting: set[int] = set()  # opened, neither given up nor collected
    answered: set[int] = set()  # of those, the ones whose reply came
    given_up: set[int] = set()  # given up before their reply came
    late = unknown = 0
    for action, number in steps:
        if action == "open":
            waiting.add(book.open().request_id)
        elif action == "give_up":
            book.give_up(number)
            if number in answered:
                late += 1  # its reply was here: dropped now
            elif number in waiting:
                given_up.add(number)
            waiting.discard(number)
            answered.discard(number)
        else:
            match = book.take(reply(number, number))
            if number in waiting and number not in answered:
                assert match is Match.REPLY
                answered.add(number)
            elif number in given_up:
                assert match is Match.LATE
                given_up.discard(number)
                late += 1
            else:
                assert match is Match.UNKNOWN
                unknown += 1
    for request_id in sorted(waiting):
        frame = book.collect(request_id)
        assert (frame is not None) == (request_id in answered)
        if frame is not None:
            assert frame.message == p.Result(request_id)
    assert (book.late, book.unknown) == (late, unknown)
    assert set(book.given_up) == given_up
