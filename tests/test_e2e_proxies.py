"""End to end: a real daemon, real worker processes, real sockets, the shipped modules."""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from tests.buffers import MakeFd
from tests.daemon_process import DaemonProcess, alive, wait_until

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., DaemonProcess]


def test_ipadctl_call_echo(start_daemon: Start) -> None:
    """`ipadctl call echo echo '{"text": "hi"}'` prints the echo."""
    daemon = start_daemon()
    result = daemon.ctl("call", "echo", "echo", '{"text": "hi"}')
    assert json.loads(result.stdout) == {"text": "hi"}
    # A file it cannot open for --fd: a usage error naming it, exit 2, no traceback.
    missing = daemon.ctl("call", "echo", "checksum", "--fd", "data=/nonexistent", check=False)
    assert (missing.returncode, missing.stderr) == (
        2, "ipadctl: --fd data: cannot open /nonexistent: No such file or directory\n"
    )  # fmt: skip


def test_ipadctl_status_shows_modules_valid_with_pids(start_daemon: Start) -> None:
    """`ipadctl --json status` shows the three shipped modules valid, each with a live worker."""
    daemon = start_daemon()
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert set(status["modules"]) == {"awb", "agc", "echo"}
    for name, module in status["modules"].items():
        assert module["state"] == "running", name
        assert module["valid"] is True
        pid = module["worker_pid"]
        assert alive(pid)
        assert "ipad" in Path(f"/proc/{pid}/cmdline").read_text()
        assert Path(f"/proc/{pid}/comm").read_text().strip() == f"ipad:{name}"
        assert os.getpgid(pid) == pid  # each worker leads its own process group
    assert status["daemon"]["pid"] == daemon.proc.pid
    human = daemon.ctl("status").stdout
    assert "echo" in human
    assert "running" in human


def test_ipadctl_modules_and_events(start_daemon: Start) -> None:
    """`ipadctl modules` lists manifests; `ipadctl events` replays the module start-ups."""
    daemon = start_daemon()
    modules = json.loads(daemon.ctl("--json", "modules").stdout)
    assert modules["awb"]["entry_point"] == "ipa_modules.awb:GrayWorldAwb"
    assert modules["awb"]["enabled"] is True
    lines = [json.loads(x) for x in daemon.ctl("--json", "events").stdout.splitlines()]
    running = {e["module"] for e in lines if e["state"] == "running"}
    assert running == {"awb", "agc", "echo"}
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)


def _reference_gains(zones: list[tuple[int, int, int, int]]) -> tuple[float, float]:
    """Grey world, computed here independently of the module: G/R and G/B over all zones."""
    r = sum(z[0] for z in zones)
    g = sum(z[1] for z in zones)
    b = sum(z[2] for z in zones)
    return g / r, g / b


async def test_awb_gains_from_memfd_stats(start_daemon: Start, memfd: MakeFd) -> None:
    """A trio client computes AWB gains from a stats buffer it passes as a memfd."""
    daemon = start_daemon()
    # A warm scene: red strong, blue weak; every zone bright enough and unsaturated.
    zones = [(120 * n, 100 * n, 70 * n, n) for n in (100, 200, 300, 400)]
    stats = b"".join(struct.pack("<4I", *z) for z in zones)
    red, blue = _reference_gains(zones)
    async with ipc.open_client(daemon.socket, name="awb-test") as client:
        awb = await client.request_proxy("awb", pipeline="rkisp1", pipeline_version=1)
        await awb.call("init")
        await awb.call("configure")
        # speed 0.5: the gains move halfway from 1.0 towards the target each frame.
        first = await awb.call("process_stats", {"frame": 1}, fds={"stats": memfd(stats)})
        assert first["zones_used"] == 4
        assert first["red_gain"] == pytest.approx(1 + 0.5 * (red - 1))
        assert first["blue_gain"] == pytest.approx(1 + 0.5 * (blue - 1))
        second = await awb.call("process_stats", {"frame": 2}, fds={"stats": memfd(stats)})
        expected_red = first["red_gain"] + 0.5 * (red - first["red_gain"])
        assert second["red_gain"] == pytest.approx(expected_red)


async def test_two_proxies_keep_separate_state(start_daemon: Start) -> None:
    """Two proxies to one module are two instances: their counters do not mix."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        a = await client.request_proxy("echo")
        b = await client.request_proxy("echo")
        assert a.info.worker_pid == b.info.worker_pid  # one worker hosts both instances
        assert [await a.call("count") for _ in range(3)] == [1, 2, 3]
        assert await b.call("count") == 1
        assert await a.call("count") == 4


def test_separate_clients_separate_state(start_daemon: Start) -> None:
    """Proxies of two different clients never see each other's state."""
    daemon = start_daemon()
    with BlockingClient(daemon.socket) as one, BlockingClient(daemon.socket) as two:
        p1, p2 = one.request_proxy("echo"), two.request_proxy("echo")
        p1.call("count")
        p1.call("count")
        assert p2.call("count") == 1


async def test_module_method_that_raises(start_daemon: Start) -> None:
    """A raising method is a ModuleError with a short traceback; the instance keeps serving."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        with pytest.raises(ipc.ModuleError, match="on purpose") as info:
            await echo.call("fail", {"message": "on purpose"})
        assert info.value.details["exception"] == "RuntimeError"
        assert "echo.py" in info.value.details["traceback"]
        assert await echo.call("echo", {"text": "still here"}) == {"text": "still here"}
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["modules"]["echo"]["restarts"] == 0


async def test_unknown_method_and_bad_arguments(start_daemon: Start) -> None:
    """Calls to unknown methods or with wrong arguments get typed errors naming the problem."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        with pytest.raises(ipc.UnknownMethod, match="no method 'shout'; methods: checksum"):
            await echo.call("shout")
        with pytest.raises(ipc.BadArguments, match="has no argument 'txt'"):
            await echo.call("echo", {"txt": "x"})
        with pytest.raises(ipc.BadArguments, match="missing 'text'"):
            await echo.call("echo")
        with pytest.raises(ipc.BadArguments) as wrong_type:
            await echo.call("echo", {"text": 5})
        # Checked by the client against echo's description, before sending (tests/test_describe.py).
        assert wrong_type.value.message == "echo() argument 'text': expected a string, got int"
        assert await echo.call("echo", {"text": "ok"}) == {"text": "ok"}


async def test_an_error_in_the_clients_block_comes_out_as_itself(start_daemon: Start) -> None:
    """open_client's own nursery does not wrap what the caller's block raises in a group."""
    daemon = start_daemon()

    async def fail_in_block() -> None:
        async with ipc.open_client(daemon.socket) as client:
            echo = await client.request_proxy("echo")
            try:
                await echo.call("fail", {"message": "boom"})
            except ipc.ModuleError as exc:
                raise ValueError("the caller's") from exc

    async def ask_for_nothing() -> None:
        async with ipc.open_client(daemon.socket) as client:
            await client.request_proxy("nosuch")

    with pytest.raises(ValueError, match="the caller's") as raised:
        await fail_in_block()
    assert isinstance(raised.value.__cause__, ipc.ModuleError)
    with pytest.raises(ipc.UnknownModule):  # an ipad error raised in the block, likewise
        await ask_for_nothing()


async def test_module_events_reach_their_client(start_daemon: Start) -> None:
    """An event a module instance emits arrives on that proxy only."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        a = await client.request_proxy("echo")
        b = await client.request_proxy("echo")
        await a.call("emit", {"name": "hello", "data": {"n": 1}})
        with trio.fail_after(10):
            event = await a.module_events.get()
        assert (event.name, event.data) == ("hello", {"n": 1})
        await b.call("count")
        assert b.module_events.dropped == 0
        assert len(b.module_events._items) == 0  # nothing leaked across


async def test_unknown_module_and_pipeline_mismatch(start_daemon: Start) -> None:
    """Requests for a missing module or an unsupported pipeline get clear, typed errors."""
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        with pytest.raises(ipc.UnknownModule, match="no module 'lsc'; modules: agc, awb, echo"):
            await client.request_proxy("lsc")
        with pytest.raises(ipc.PipelineMismatch, match="does not support pipeline 'vimc'"):
            await client.request_proxy("awb", pipeline="vimc")
        with pytest.raises(ipc.PipelineMismatch, match="version 7"):
            await client.request_proxy("awb", pipeline="rkisp1", pipeline_version=7)


async def test_validity_events_and_worker_crash(start_daemon: Start) -> None:
    """A subscribed client sees its proxy go invalid with the crash reason, then recover.

    The call in flight when the worker is killed fails at once with WorkerCrashed;
    the proxy comes back on a new worker without the client doing anything.
    """
    daemon = start_daemon()
    async with ipc.open_client(daemon.socket) as client:
        echo = await client.request_proxy("echo")
        assert echo.valid
        pid = await echo.call("pid")

        async def kill_soon() -> None:
            await trio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            with trio.fail_after(5), pytest.raises(ipc.WorkerCrashed):
                await echo.call("sleep", {"seconds": 30})
        seen: list[tuple[str | None, str | None]] = []
        with trio.fail_after(10):
            async for event in client.events:
                if event.proxy_id == echo.proxy_id:
                    seen.append((event.state, event.reason))
                    if getattr(event, "kind", None) == "recovered":
                        break
        # The reason names the call the worker ran as it died (its board's claim).
        invalid = ("invalid", "worker exited with signal SIGKILL in sleep()")
        assert invalid in seen, "".join(daemon.raw[-25:])
        assert seen[-1] == ("valid", "recovered")
        assert echo.valid
        assert echo.recoveries == 1
        new_pid = await echo.call("pid")
        assert new_pid != pid
    record = daemon.wait_for("worker.exited", lambda r: r["module"] == "echo")
    assert record["signal"] == "SIGKILL"
    assert record["worker_pid"] == pid


def test_release_frees_the_instance(start_daemon: Start) -> None:
    """Releasing a proxy frees its instance; a new proxy starts from fresh state."""
    daemon = start_daemon()
    with BlockingClient(daemon.socket) as client:
        echo = client.request_proxy("echo")
        echo.call("count")
        echo.release()
        assert client.status().modules["echo"]["proxies"] == 0
        again = client.request_proxy("echo")
        assert again.call("count") == 1
        with pytest.raises(ipc.UnknownProxy):
            client.request(
                __import__("ipad.protocol.wire", fromlist=["ReleaseProxy"]).ReleaseProxy(
                    echo.proxy_id
                ),
                __import__("ipad.protocol.wire", fromlist=["Released"]).Released,
            )


def test_client_disconnect_releases_its_proxies(start_daemon: Start) -> None:
    """A client that goes away has its proxies closed; others keep theirs."""
    daemon = start_daemon()
    with BlockingClient(daemon.socket) as keeper:
        kept = keeper.request_proxy("echo")
        leaver = BlockingClient(daemon.socket)
        leaver.request_proxy("echo")
        leaver.request_proxy("awb")
        assert keeper.status().daemon["proxies"] == 3
        leaver.close()
        daemon.wait_for("client.disconnected", lambda r: r["client_id"] == 2)
        assert keeper.status().daemon["proxies"] == 1
        assert kept.call("echo", {"text": "still"}) == {"text": "still"}


def test_graceful_stop_stops_every_worker(start_daemon: Start) -> None:
    """SIGTERM: clients are told, every worker exits cleanly, the daemon exits 0."""
    daemon = start_daemon()
    pids = daemon.worker_pids()
    with BlockingClient(daemon.socket, subscribe=True) as client:
        assert daemon.stop() == 0
        with pytest.raises(ipc.Disconnected, match="daemon stopping"):
            client.status()
    exits = {r["module"]: r for r in daemon.events("worker.exited")}
    assert {m: r["exit_status"] for m, r in exits.items()} == {"awb": 0, "agc": 0, "echo": 0}
    assert not any(alive(pid) for pid in pids.values())
    assert not daemon.socket.exists()


def test_daemon_killed_leaves_no_worker(start_daemon: Start) -> None:
    """SIGKILL of the daemon takes its workers with it (PR_SET_PDEATHSIG)."""
    daemon = start_daemon()
    pids = list(daemon.worker_pids().values())
    assert len(pids) == 3
    assert all(alive(pid) for pid in pids)
    daemon.expect_unclean_exit("SIGKILLed on purpose: what it leaves is tested")
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)
