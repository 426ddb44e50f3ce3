"""A client of the hostile_buffers module, run as its own process by tests/test_hostile_buffers.py.

A SIGBUS in the client shows as its exit status; what it saw is one JSON
object on stdout. ``python tests/hostile_buffers_client.py KIND SCENARIO SOCKET``
with KIND ``trio`` or ``blocking``; both clients run the same scenario code
through a small adapter, so each behaviour is proven against both.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ipad.client import BadArguments, BlockingClient, IpadError, _buffers
from ipad.client._buffers import Output, make_buffer

SIZE = 64 * 1024
PATTERN = bytes(range(256)) * (SIZE // 256)

Call = Callable[..., Any]


def rss_kib(field: str = "VmRSS") -> int:
    """The resident set of this process now (or ``VmHWM``: its peak), in KiB."""
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:  # noqa: PTH123
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return 0


def sha(data: bytes | mmap.mmap) -> str:
    """SHA-256 of ``data``, as the module's ``digest`` reports it."""
    return hashlib.sha256(data).hexdigest()


def mapped_buffer() -> tuple[int, mmap.mmap]:
    """A buffer the client fills through its own writable mapping, as a camera client would."""
    fd = make_buffer(SIZE)
    view = mmap.mmap(fd, SIZE)
    view[:] = PATTERN
    return fd, view


def touch(view: mmap.mmap) -> str:
    """Read every byte of the client's own mapping: a shrunk memfd would SIGBUS right here."""
    return sha(view[:])


def scenario_attack(call: Call, other: Call) -> dict[str, Any]:
    """Every attack on an input buffer; the client's mapping and data survive them all."""
    fd, view = mapped_buffer()
    before = touch(view)
    truncate = call("truncate", fds={"data": fd})
    touch(view)
    attacks = call("attack", fds={"data": fd})
    after = touch(view)
    view[0:4] = b"MINE"  # the client still writes through the mapping it made before
    mine = touch(view)
    return {
        "truncate": truncate,
        "attacks": attacks,
        "unchanged": before == after == sha(PATTERN),
        "worker_sees_client_write": call("digest", fds={"data": fd}) == mine,
        "size": os.fstat(fd).st_size,
        "other": other(),
    }


def scenario_replay(call: Call, other: Call, proxy: Any) -> dict[str, Any]:
    """The copies kept for replay survive attacks, and a crash's replay passes them intact."""
    fd, view = mapped_buffer()
    kept = call("keep", fds={"data": fd})
    attacks = call("attack_kept")
    copy_fd = _buffers.fd_of(proxy.setup_log.calls[-1].fds[0][1])
    copy = os.pread(copy_fd, SIZE + 1, 0)
    crash = "survived"
    try:
        call("mremap_touch", fds={"data": fd})
    except IpadError as exc:
        crash = type(exc).__name__
    after_crash = call("attack", fds={"data": fd}, wait=20)  # recovered: the replay ran first
    return {
        "attacks": attacks,
        "after_crash": after_crash,
        "kept": kept == sha(PATTERN),
        "copy_unchanged": copy == PATTERN,
        "mapping_unchanged": touch(view) == sha(PATTERN),
        "crash": crash,
        "recoveries": proxy.recoveries,
        "other": other(),
    }


def scenario_refused(call: Call, other: Call) -> dict[str, Any]:
    """Buffers the library cannot protect are refused before anything is sent, naming the key."""
    out: dict[str, Any] = {}
    unsealable = os.memfd_create("plain", os.MFD_CLOEXEC)
    os.write(unsealable, PATTERN)
    sealable = make_buffer(PATTERN)
    read_only = os.open(f"/proc/self/fd/{sealable}", os.O_RDONLY)
    plain_file = os.open(sys.executable, os.O_RDONLY)
    sealed_input = make_buffer(PATTERN)
    _buffers.protect("x", sealed_input)
    cases = {"no_sealing": unsealable, "read_only": read_only, "plain_file": plain_file,
             "pipe": os.pipe()[0], "output_sealed": Output(sealed_input)}  # fmt: skip
    for name, value in cases.items():
        try:
            call("digest", fds={name: value})
        except BadArguments as exc:
            out[name] = exc.message
        else:
            out[name] = "passed"
    os.ftruncate(unsealable, 0)  # refused, so still the client's own to resize
    out["other"] = other()
    return out


def scenario_output(call: Call, other: Call) -> dict[str, Any]:
    """An Output buffer: the module fills it through a writable mapping, but cannot resize it."""
    fd, view = mapped_buffer()
    resize = call("fill", {"byte": 7}, fds={"out": Output(fd)})
    refused = ""
    try:
        call("map_writable", fds={"data": make_buffer(PATTERN)})
    except BadArguments as exc:
        refused = exc.message
    return {"resize": resize, "filled": touch(view) == sha(bytes([7]) * SIZE),
            "input_writable": refused, "other": other()}  # fmt: skip


def scenario_events(call: Call, other: Call, next_event: Callable[[], Any]) -> dict[str, Any]:
    """A flood of events that decode to ~13 MB each: the client's memory stays bounded."""
    before = rss_kib()
    call("flood", {"count": 40, "items": 200_000})
    time.sleep(0.5)
    stored = rss_kib()
    received = []
    while (event := next_event()) is not None:
        received.append(event.data["i"])
    # Not getrusage's ru_maxrss: Linux carries it across exec, so a child spawned by a
    # pytest process that once used 240 MB reports 240 MB. VmHWM belongs to this image.
    peak = rss_kib("VmHWM")
    return {"before": before, "stored": stored, "peak": peak, "received": received,
            "other": other()}  # fmt: skip


def vm_kib() -> int:
    """The address space of this process now, in KiB."""
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:  # noqa: PTH123
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    return 0


def scenario_oom(call: Call, other: Call) -> dict[str, Any]:
    """A result too big to decode in the memory left: an error on that proxy, not the client's end."""
    out: dict[str, Any] = {"small": len(call("big", {"items": 10}))}
    limit = (vm_kib() + 4 * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    try:
        out["big"] = len(call("big", {"items": 200_000}))
    except IpadError as exc:
        out["big"] = f"{type(exc).__name__}: {exc.message}"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["again"] = len(call("big", {"items": 10}, wait=20))
    out["other"] = other()
    return out


def scenario_replies(call: Call, other: Call) -> dict[str, Any]:
    """Replies to ids never sent: each dropped, and the warnings about them rate-limited."""
    sent = call("reply_flood", {"count": 20_000})
    time.sleep(1)
    fd, _ = mapped_buffer()
    _buffers.protect("data", fd)  # as the library does; here so the flood alone is what is tried
    return {"sent": sent, "same_proxy": call("digest", fds={"data": fd}) == sha(PATTERN),
            "other": other()}  # fmt: skip


def blocking(scenario: str, path: str) -> dict[str, Any]:
    with BlockingClient(path) as client:
        proxy = client.request_proxy("hostile_buffers")
        echo = client.request_proxy("echo")

        def call(method: str, args: Mapping[str, Any] | None = None, *,
                 fds: Mapping[str, Any] | None = None, wait: float | None = None) -> Any:  # fmt: skip
            return proxy.call(method, args, fds, timeout=30, wait=wait)

        def other() -> Any:
            return echo.call("echo", {"text": "still here"}, timeout=10)["text"]

        def next_event() -> Any:
            return proxy.next_event(timeout=0.5)

        result = run(scenario, call, other, proxy, next_event)
        result["lost"] = proxy.events_lost
        return result


def trio_client(scenario: str, path: str) -> dict[str, Any]:
    import trio  # noqa: PLC0415 - the blocking runs never import it

    from ipad.client import open_client  # noqa: PLC0415

    async def main() -> dict[str, Any]:
        async with open_client(path) as client:
            proxy = await client.request_proxy("hostile_buffers")
            echo = await client.request_proxy("echo")
            token = trio.lowlevel.current_trio_token()

            def call(method: str, args: Mapping[str, Any] | None = None, *,
                     fds: Mapping[str, Any] | None = None, wait: float | None = None) -> Any:  # fmt: skip
                return trio.from_thread.run(
                    lambda: proxy.call(method, args, fds, timeout=30, wait=wait), trio_token=token
                )

            def other() -> Any:
                async def echo_call() -> Any:
                    return (await echo.call("echo", {"text": "still here"}, timeout=10))["text"]

                return trio.from_thread.run(echo_call, trio_token=token)

            def next_event() -> Any:
                async def get() -> Any:
                    with trio.move_on_after(0.5):
                        return await proxy.module_events.get()
                    return None

                return trio.from_thread.run(get, trio_token=token)

            result = await trio.to_thread.run_sync(run, scenario, call, other, proxy, next_event)
            result["lost"] = proxy.module_events.dropped
            return result

    return trio.run(main)


def run(
    scenario: str, call: Call, other: Call, proxy: Any, next_event: Callable[[], Any]
) -> dict[str, Any]:
    """Run ``scenario`` with this client's adapter."""
    if scenario == "replay":
        return scenario_replay(call, other, proxy)
    if scenario == "events":
        return scenario_events(call, other, next_event)
    function: Callable[[Call, Call], dict[str, Any]] = globals()[f"scenario_{scenario}"]
    return function(call, other)


if __name__ == "__main__":
    kind, name, socket_path = sys.argv[1:4]
    outcome = (blocking if kind == "blocking" else trio_client)(name, socket_path)
    print(json.dumps(outcome), flush=True)
