"""A blocking-client session for the chaos test, run as its own process so it can die mid-call.

``python -m tests.chaos_blocking SPEC`` (SPEC a JSON object: socket, module,
seed, calls, strict) connects with ``ipad.client.BlockingClient``, requests a
proxy, makes its setup calls and then random calls, and prints one JSON line
as each operation begins (with the longest it may take) and one as it ends
(its result, or the exception's type, code and message). The chaos test reads
those lines to hold every operation to its deadline, and SIGKILLs the process
at a random moment: the most abrupt way a client can leave, mid-call or
mid-recovery, with the kernel closing every descriptor it had.

It imports no trio, as a program using the blocking client would not. The
calls each module offers are listed here, for the trio actors too.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any

from ipad.client import BlockingClient, BlockingProxy, IpadError

#: Setup calls of each module (replayed after a recovery); "value" is what ``get`` returns.
SETUP: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "echo": [("start", {})],
    "awb": [("init", {}), ("configure", {})],
    "agc": [("start", {})],
    "faulty": [("init", {"settings": {"value": 0}})],
    "steady": [("init", {"settings": {"value": 0}})],
    "sluggish": [("init", {"settings": {"value": 0}})],
}

#: Calls made after the setup: name, arguments, whether it takes the AWB statistics buffer.
CALLS: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "echo": [("echo", {"text": "chaos"}, False), ("count", {}, False),
             ("sleep", {"seconds": 0.02}, False)],
    "awb": [("process_stats", {"frame": 1}, True)],
    "agc": [("stop", {}, False), ("start", {}, False)],
    "faulty": [("get", {}, False), ("pid", {}, False)],
    "steady": [("get", {}, False), ("pid", {}, False)],
    "sluggish": [("get", {}, False), ("pid", {}, False)],
}  # fmt: skip

#: Socket timeout of a patient blocking request, in seconds: longer means the daemon hung.
PATIENT = 5.0
#: Margin over a call's own timeout and wait for the whole operation to end.
MARGIN = 5.0
#: REQUEST_PROXY has no timeout in the blocking API: the longest it may fairly be held.
REQUEST_BOUND = 10.0


def setup_calls(module: str, value: int) -> list[tuple[str, dict[str, Any]]]:
    """``module``'s setup calls, with ``value`` as the one ``get`` must return after them."""
    calls = []
    for method, args in SETUP.get(module, []):
        calls.append((method, {"settings": {"value": value}} if "settings" in args else args))
    return calls


def stats_memfd() -> int:
    """An AWB statistics buffer: two zones of red, green, blue sums and a pixel count."""
    fd = os.memfd_create("chaos-stats", os.MFD_ALLOW_SEALING)
    os.write(fd, struct.pack("<4I", 12000, 10000, 7000, 100) * 2)
    return fd


class Session:
    """One client's life: connect, a proxy, setup, calls; every step reported as a JSON line."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.rng = random.Random(spec["seed"])  # noqa: S311 - a schedule, not a secret
        self.stats = stats_memfd()
        self.known: int | None = None

    def report(self, **fields: Any) -> None:
        """One line for the chaos test, flushed at once: the process may be killed next."""
        print(json.dumps(fields, default=repr), flush=True)

    def step(self, op: str, bound: float, run: Any, **fields: Any) -> tuple[bool, Any]:
        """Run ``run()``, reporting its start and end; (ok, value or exception)."""
        self.report(phase="begin", op=op, bound=bound, **fields)
        start = time.monotonic()
        try:
            value = run()
        except Exception as exc:  # noqa: BLE001 - every kind is reported; the test judges it
            self.report(phase="end", op=op, ok=False, error=type(exc).__name__,
                        code=getattr(exc, "code", None), message=str(exc)[:400],
                        ipad_error=isinstance(exc, IpadError),
                        elapsed=time.monotonic() - start, **fields)  # fmt: skip
            return False, exc
        self.report(phase="end", op=op, ok=True, value=value,
                    elapsed=time.monotonic() - start, **fields)  # fmt: skip
        return True, value

    def run(self) -> None:
        """The whole session; a strict one (the test's health check) stops at the first error."""
        module = self.spec["module"]
        ok, client = self.step("connect", REQUEST_BOUND, lambda: BlockingClient(
            self.spec["socket"], name="chaos-blocking"), module=module)  # fmt: skip
        if not ok:
            return
        assert isinstance(client, BlockingClient)
        ok, proxy = self.step("request_proxy", REQUEST_BOUND,
                              lambda: client.request_proxy(module), module=module)  # fmt: skip
        if not ok:
            client.close()
            return
        assert isinstance(proxy, BlockingProxy)
        value = self.rng.randrange(1, 1_000_000)
        calls = [(method, args, False) for method, args in setup_calls(module, value)]
        calls += [self.rng.choice(CALLS[module]) for _ in range(self.spec["calls"])]
        # What get() must return: known once the setup call that sets it succeeded (one
        # that failed in flight was never recorded, so no recovery replays it).
        self.known = None
        for method, args, with_stats in calls:
            ok, go_on = self.call(proxy, method, args, with_stats)
            if ok and "settings" in args:
                self.known = value
            if not go_on:
                break
        if self.rng.random() < 0.5:  # the other half leave without a word
            self.step("release", REQUEST_BOUND, proxy.release, module=module)
        client.close()

    def call(
        self,
        proxy: BlockingProxy,
        method: str,
        args: dict[str, Any],
        with_stats: bool,
    ) -> tuple[bool, bool]:
        """One call with random patience: whether it succeeded, whether the session goes on."""
        strict = self.spec["strict"]
        impatient = not strict and self.rng.random() < 0.15
        timeout = self.rng.uniform(0.001, 0.03) if impatient else PATIENT
        wait = 5.0 if strict else self.rng.choice([None, 0.05, 0.5, 3.0])
        fds = {"stats": self.stats} if with_stats else None
        ok, _ = self.step(
            "call", timeout + (wait or 0) + MARGIN,
            lambda: proxy.call(method, args, fds, timeout=timeout, wait=wait),
            module=proxy.module, method=method, wait=wait, timeout=timeout,
            impatient=impatient, expect=self.known if method == "get" else None,
        )  # fmt: skip
        if not ok:
            # Without ``wait`` a blocking proxy stays broken (its design): end the session,
            # as an application would start over. A strict session ends at any failure.
            return False, not strict and not impatient and wait is not None
        return True, True


def main() -> None:
    """Run the session SPEC (argv[1]) describes."""
    Session(json.loads(sys.argv[1])).run()


if __name__ == "__main__":
    main()
