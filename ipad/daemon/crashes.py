"""Crash reports: what a failed worker left on its heartbeat board, kept in a bounded ring.

A worker's heartbeat board outlives it (ipad/worker/heartbeat_board.py): the
claim of the module code it ran and the stacks faulthandler wrote at a fatal
signal, or at SIGUSR1 just before the daemon killed it as hung. The daemon
reads both once the worker is gone, clips them and keeps a record per crash,
newest last, a bounded number per module; ``ipadctl crashes`` shows them
(docs/operations.md, "Crash reports"). Everything read from a board is the
worker's claim, and reads as such: bounded, decoded leniently, never parsed
for anything the daemon acts on.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ipad.daemon.bounds import cap
from ipad.worker.heartbeat_board import Claim, dumps_on_sigusr1, read_claim, read_dump

if TYPE_CHECKING:
    from ipad.daemon.worker_process import WorkerProcess

#: Crash records kept per module: the newest; older ones are dropped.
RING_SIZE = 16
#: Characters of a stack kept in a record (faulthandler writes the innermost frame first).
STACK_LIMIT = 8 * 1024
#: Characters of a reason kept in a record.
REASON_LIMIT = 1024
#: How long PROXY_CAUSE waits for a proxy whose channel ended to be seen invalid (a client
#: asks as its call fails, usually before the daemon has reaped the worker).
CAUSE_WAIT = 0.5
#: How long a worker about to be killed as hung gets to dump its stacks on SIGUSR1.
HUNG_DUMP_WAIT = 0.5
#: How often the board is looked at meanwhile: a dump unchanged for one look is complete.
HUNG_DUMP_POLL = 0.02


@attrs.frozen
class LastWords:
    """What a worker's board held when it was read: its claim of a call, its stacks."""

    claim: Claim | None
    stack: str

    @property
    def in_flight(self) -> str | None:
        """The module code it claims ran, as reasons say it: ``process()``."""
        return f"{self.claim.method}()" if self.claim is not None else None


def read_last_words(worker: WorkerProcess) -> LastWords | None:
    """A worker's claim and stacks, read from its board (None: it has no board)."""
    board = worker.board
    if board is None:
        return None
    # Four bytes a character at most: what is read always fills the stack's room.
    stack = read_dump(board, 4 * STACK_LIMIT)
    return LastWords(read_claim(board), cap(printable(stack), STACK_LIMIT))


def printable(text: str) -> str:
    """``text`` with control characters other than newlines escaped: safe in a terminal."""
    if text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text):
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


async def dump_before_kill(worker: WorkerProcess) -> None:
    """Ask a hung worker for its stacks (SIGUSR1), wait a bounded moment for them.

    Only a worker whose board says SIGUSR1 dumps is asked (a native worker
    could die of it). A worker that blocks or ignores it costs at most
    ``HUNG_DUMP_WAIT``; then it is killed as it would have been.
    """
    board = worker.board
    if board is None or worker.exit_status is not None or worker.pidfd < 0:
        return
    if not dumps_on_sigusr1(board):
        return
    before = read_dump(board)
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(worker.pidfd, signal.SIGUSR1)
    seen = before
    with trio.move_on_after(HUNG_DUMP_WAIT):
        while True:
            await trio.sleep(HUNG_DUMP_POLL)
            now = read_dump(board)
            if now != before and now == seen:
                return  # written, and no longer growing
            seen = now


@attrs.frozen
class CrashRecord:
    """One worker's failure, as ``ipadctl crashes`` shows it."""

    #: Wall-clock seconds since the epoch.
    time: float
    module: str
    worker_pid: int
    #: ``signal SIGSEGV``, ``exit status 1``, ``hung``, ``oom``, ``protocol``, ``seccomp``.
    kind: str
    exit_status: int | None
    signal: str | None
    reason: str
    #: The method the worker's board claims ran (None: no module code ran, or no board).
    method: str | None = None
    instance_id: int | None = None
    proxy_id: int | None = None
    #: Seconds the method had run, as claimed (None: not believable, or unknown).
    running_for: float | None = None
    #: Python stacks faulthandler wrote ('' for a native worker, or none written).
    stack: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The record for ADMIN's reply and ``--json``."""
        return attrs.asdict(self)


class CrashRing:
    """One module's recent crash records, at most ``RING_SIZE``, newest last."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self._records: collections.deque[CrashRecord] = collections.deque(maxlen=size)
        #: Crashes recorded in all, those since dropped included.
        self.total = 0

    def add(self, record: CrashRecord) -> None:
        """Keep ``record``; the oldest goes once the ring is full."""
        self._records.append(record)
        self.total += 1

    def records(self) -> list[CrashRecord]:
        """The records kept, oldest first."""
        return list(self._records)


def crash_record(
    module: str,
    worker: WorkerProcess,
    kind: str,
    reason: str,
    words: LastWords | None,
    proxy_id: int | None,
) -> CrashRecord:
    """A record of ``worker``'s failure from what the daemon saw and what its board held."""
    status = worker.exit_status
    claim = words.claim if words is not None else None
    signame: str | None = None
    if status is not None and status.signal is not None:
        try:
            signame = signal.Signals(status.signal).name
        except ValueError:
            signame = str(status.signal)
    return CrashRecord(
        time=time.time(),
        module=module,
        worker_pid=worker.pid,
        kind=kind,
        exit_status=status.code if status is not None else None,
        signal=signame,
        reason=cap(reason, REASON_LIMIT),
        method=claim.method if claim is not None else None,
        instance_id=claim.instance_id if claim is not None else None,
        proxy_id=proxy_id,
        running_for=round(claim.age, 3) if claim is not None and claim.age is not None else None,
        stack=words.stack if words is not None else "",
    )


#: Bytes of crash records one ADMIN reply carries at most (a packet holds 256 KiB).
REPLY_BUDGET = 160 * 1024


def crashes_reply(rings: dict[str, CrashRing | None]) -> dict[str, Any]:
    """ADMIN ``crashes``' result: the newest records of ``rings``, oldest first, within budget.

    ``left_off`` counts the records kept but not sent (past the budget) and
    ``dropped`` those the rings no longer hold (each holds ``RING_SIZE``).
    """
    records = sorted(
        (record for ring in rings.values() if ring is not None for record in ring.records()),
        key=lambda record: record.time,
    )
    sent: list[dict[str, Any]] = []
    size = 0
    for record in reversed(records):
        entry = record.as_dict()
        size += len(record.stack) * 4 + len(record.reason) * 4 + 512  # UTF-8, at worst
        if size > REPLY_BUDGET:
            break
        sent.append(entry)
    sent.reverse()
    total = sum(ring.total for ring in rings.values() if ring is not None)
    return {"crashes": sent, "left_off": len(records) - len(sent), "dropped": total - len(records)}
