"""Crash records without a daemon: the board's claim and dump read defensively, the ring bounded."""

from __future__ import annotations

import os
import struct

import msgspec

from ipad.daemon.crashes import (
    RING_SIZE,
    STACK_LIMIT,
    CrashRecord,
    CrashRing,
    crashes_reply,
    printable,
)
from ipad.protocol import wire as p
from ipad.worker.heartbeat_board import (
    BOARD_SIZE,
    CLAIM_END,
    DUMP_OFFSET,
    DUMP_SIZE,
    FILE_SIZE,
    Beater,
    dumps_on_sigusr1,
    new_board,
    read_claim,
    read_dump,
)


def record(n: int, module: str = "awb", stack: str = "") -> CrashRecord:
    """A crash record numbered ``n`` (its time and pid)."""
    return CrashRecord(time=float(n), module=module, worker_pid=n, kind="signal SIGSEGV",
                       exit_status=None, signal="SIGSEGV", reason="x", stack=stack)  # fmt: skip


def test_a_flood_of_crashes_keeps_the_ring_bounded() -> None:
    """However many crashes come, a module keeps the newest RING_SIZE and counts the rest."""
    ring = CrashRing()
    for n in range(10 * RING_SIZE):
        ring.add(record(n))
    kept = ring.records()
    assert [r.worker_pid for r in kept] == list(range(9 * RING_SIZE, 10 * RING_SIZE))
    reply = crashes_reply({"awb": ring, "agc": None})
    assert reply["dropped"] == 9 * RING_SIZE
    assert len(reply["crashes"]) == RING_SIZE


def test_the_reply_fits_a_packet_however_big_the_stacks() -> None:
    """Many modules' rings full of clipped stacks still answer in one packet, newest kept."""
    stack = "\u20ac" * STACK_LIMIT  # three bytes each in UTF-8
    rings = {}
    for m in range(20):
        ring = rings[f"m{m}"] = CrashRing()
        for n in range(RING_SIZE):
            ring.add(record(m * RING_SIZE + n, f"m{m}", stack))
    reply = crashes_reply(dict(rings))
    assert len(p.encode(p.AdminDone(reply), 1)) <= p.MAX_PACKET
    sent = reply["crashes"]
    assert reply["left_off"] == 20 * RING_SIZE - len(sent) > 0
    assert sent[-1]["worker_pid"] == 20 * RING_SIZE - 1  # the newest
    assert [r["time"] for r in sent] == sorted(r["time"] for r in sent)


def test_a_claim_is_read_only_while_module_code_runs() -> None:
    """The board's claim names the method and instance while the call counter is odd."""
    board = new_board()
    try:
        assert os.fstat(board).st_size == FILE_SIZE
        beater = Beater(board, 1.0)
        beater.claim(b"process", 42)
        assert read_claim(board) is None  # claimed, but not entered
        beater.enter()
        claim = read_claim(board)
        assert claim is not None
        assert (claim.method, claim.instance_id) == ("process", 42)
        assert claim.age is not None
        assert 0 <= claim.age < 60
        beater.leave()
        assert read_claim(board) is None
    finally:
        os.close(board)


def test_a_scribbled_claim_is_clipped_and_disbelieved() -> None:
    """A length past the room, control bytes and a future time read as a clipped, inert claim."""
    board = new_board()
    try:
        header = struct.pack("=QQQQIH", 0, 1, 2**63, 7, 0, 65535)
        os.pwrite(board, header + b"\x1b[2J" * 100, 0)
        claim = read_claim(board)
        assert claim is not None
        assert "\x1b" not in claim.method
        assert claim.method.startswith("\\x1b[2J")
        assert len(claim.method) <= 4 * (CLAIM_END - BOARD_SIZE)
        assert claim.age is None
        assert dumps_on_sigusr1(board) is False
    finally:
        os.close(board)


def test_the_board_cannot_grow_and_its_dump_is_read_bounded() -> None:
    """A worker cannot grow its board; the dump is read up to its area's end, as text."""
    board = new_board()
    try:
        written = 0
        os.lseek(board, DUMP_OFFSET, os.SEEK_SET)
        try:
            while True:
                written += os.write(board, b"A" * 4096)
        except PermissionError:
            pass
        assert written == DUMP_SIZE
        assert os.fstat(board).st_size == FILE_SIZE
        assert read_dump(board) == "A" * DUMP_SIZE
        assert read_dump(board, 10) == "A" * 10
    finally:
        os.close(board)


def test_a_repeated_claim_rewrites_only_its_time() -> None:
    """The same method on the same instance again: a new ``since``, the same name; another: both."""
    board = new_board()
    try:
        beater = Beater(board, 1.0)
        beater.enter()
        beater.claim(b"process", 3)
        first = read_claim(board)
        beater.claim(b"process", 3)
        again = read_claim(board)
        beater.claim(b"init", 4)
        other = read_claim(board)
        assert first is not None
        assert again is not None
        assert other is not None
        assert (again.method, again.instance_id) == ("process", 3)
        assert again.age is not None
        assert first.age is not None
        assert (other.method, other.instance_id) == ("init", 4)
    finally:
        os.close(board)


def test_a_short_board_has_no_claim_nor_dump() -> None:
    """A board of just the counters (a native worker's, the conformance kit's) works as before."""
    board = os.memfd_create("short", os.MFD_CLOEXEC)
    try:
        os.ftruncate(board, BOARD_SIZE)
        beater = Beater(board, 1.0)
        assert beater.dump_to(board) is None
        beater.claim(b"process", 1)  # nowhere to write it: ignored
        beater.enter()
        assert read_claim(board) is None
        assert read_dump(board) == ""
        assert not dumps_on_sigusr1(board)
    finally:
        os.close(board)


def test_printable_escapes_what_a_terminal_would_obey() -> None:
    """Escapes and bells are shown escaped; newlines and tabs of a stack stay."""
    assert printable("a\n\tb") == "a\n\tb"
    assert printable("\x1b]0;x\x07") == "\\x1b]0;x\\x07"
    assert msgspec.json.decode(msgspec.json.encode(printable("\x00"))) == "\\x00"
