"""Buffers registered by id (MAP_BUFFERS), as libcamera's mapBuffers: both clients, a real daemon.

The ``registered`` test module (tests/modules/ipad_test_modules/registered.py)
reports what its worker mapped; ``hostile_buffers`` attacks what it is given.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ipad import client as ipc
from ipad.client import DmaBuf, Output, Registered, make_buffer
from ipad.protocol import wire as p
from ipad.protocol.fdpass import rights
from ipad.worker import buffers as worker_buffers
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, wait_until, write_config

__all__ = ["connect"]  # the fixture, used by every test here

pytestmark = pytest.mark.timeout(120)

SIZE = 64 * 1024
PATTERN = bytes(range(256)) * (SIZE // 256)
MODULES = (
    "[modules.registered]\n[modules.hostile_buffers]\n"
    '[modules.echo]\n'
)  # fmt: skip
#: What every attack on a registered input must get from the kernel (as for a passed one).
REFUSED = {
    "truncate": "EPERM", "grow": "EPERM", "write": "EPERM", "punch_hole": "EPERM",
    "map_shared_writable": "EPERM", "reopen_write": "EPERM", "reopen_truncate": "EPERM",
    "reopen_map_writable": "EPERM", "mprotect_writable": "EACCES",
}  # fmt: skip


def sha(data: bytes | mmap.mmap) -> str:
    """SHA-256, as the modules report it."""
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test made, closed when it ends."""
    made: list[int] = []
    yield made
    for fd in made:
        os.close(fd)


def serving(start_daemon: Start, tmp_path: Path) -> DaemonProcess:
    """A daemon serving the registered and hostile_buffers test modules, and echo."""
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                          modules=MODULES)  # fmt: skip
    return start_daemon(config)


def filled(fds: list[int], data: bytes = PATTERN) -> tuple[int, mmap.mmap]:
    """An input memfd holding ``data`` and the client's own writable mapping of it."""
    fd = make_buffer(len(data))
    fds.append(fd)
    view = mmap.mmap(fd, len(data))
    view[:] = data
    return fd, view


def test_registered_buffers_are_mapped_once_and_named_by_id(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """One mapping serves every call naming the id; an output is filled; unmap forgets the id."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    frame, view = filled(fds)
    params = make_buffer(4096)
    fds.append(params)
    client.map_buffers(proxy, {1: frame, 2: Output(params)})
    first = client.call(proxy, "digest", fds={"frame": Registered(1)})
    assert (first["sha"], first["same_mapping"]) == (sha(PATTERN), False)
    assert (first["id"], first["kind"], first["size"]) == (1, "input", SIZE)
    view[0:4] = b"NEW!"  # the client refills the buffer it registered, as for the next frame
    again = client.call(proxy, "digest", fds={"frame": Registered(1)})
    assert again["same_mapping"]  # no map and unmap per call
    assert again["sha"] == sha(view[:])
    assert client.call(proxy, "fill", {"byte": 7}, fds={"out": Registered(2)}) == []
    with mmap.mmap(params, 4096, prot=mmap.PROT_READ) as out:
        assert out[:] == bytes([7]) * 4096
    passed = make_buffer(PATTERN)  # a buffer passed with the call still works beside them
    fds.append(passed)
    assert client.call(proxy, "digest", fds={"frame": passed})["sha"] == sha(PATTERN)
    client.unmap_buffers(proxy, [1])
    with pytest.raises(ipc.BadArguments, match="buffer id 1 is not registered") as unknown:
        client.call(proxy, "digest", fds={"frame": Registered(1)})
    assert "buffer id" in unknown.value.message
    client.map_buffers(proxy, {1: frame})  # the id is free again
    assert client.call(proxy, "digest", fds={"frame": Registered(1)})["sha"] == sha(view[:])
    view.close()


def test_what_a_registration_may_not_do_is_refused_naming_the_id(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """Duplicates, too many, unknown ids, a DmaBuf per call, a write to an input: BadArguments."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    frame, view = filled(fds)
    view.close()
    client.map_buffers(proxy, {1: frame})
    with pytest.raises(ipc.BadArguments, match="buffer id 1 is already registered"):
        client.map_buffers(proxy, {1: frame})
    with pytest.raises(ipc.BadArguments, match=f"1 to {p.MAX_FDS} buffers"):
        client.map_buffers(proxy, dict.fromkeys(range(10, 10 + p.MAX_FDS + 1), frame))
    for start in range(2, p.MAX_REGISTERED_BUFFERS, p.MAX_FDS):  # fill the instance's 64
        last = min(start + p.MAX_FDS, p.MAX_REGISTERED_BUFFERS + 1)
        client.map_buffers(proxy, dict.fromkeys(range(start, last), frame))
    with pytest.raises(ipc.BadArguments, match="64 buffers registered at once"):
        client.map_buffers(proxy, {999: frame})
    with pytest.raises(ipc.BadArguments, match="buffer id 999 is not registered"):
        client.unmap_buffers(proxy, [3, 999])
    assert client.call(proxy, "digest", fds={"frame": Registered(3)})["id"] == 3  # 3 stayed
    with pytest.raises(ipc.BadArguments, match="register a DmaBuf with map_buffers"):
        client.call(proxy, "digest", fds={"frame": DmaBuf(frame)})
    with pytest.raises(ipc.BadArguments, match="registered as 'input', not writable") as err:
        client.call(proxy, "write_input", fds={"frame": Registered(1)})  # caught by the module
    assert err.value.details["buffer_id"] == 1
    written = client.call(proxy, "write_readonly_view", fds={"frame": Registered(1)})
    assert written.startswith("refused")
    assert client.call(proxy, "digest", fds={"frame": Registered(1)})["sha"] == sha(PATTERN)


def test_attacks_on_a_registered_input_fail(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """A module cannot resize or write a registered input by any path; the client's bytes stay."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("hostile_buffers")
    frame, view = filled(fds)
    client.map_buffers(proxy, {4: frame})
    attacks = client.call(proxy, "attack", fds={"data": Registered(4)})
    assert {k: attacks[k] for k in REFUSED} == REFUSED
    assert view[:] == PATTERN
    assert os.fstat(frame).st_size == SIZE
    with pytest.raises(ipc.BadArguments, match="not writable"):
        client.call(proxy, "map_writable", fds={"data": Registered(4)})
    assert client.call(proxy, "digest", fds={"data": Registered(4)}) == sha(PATTERN)
    view.close()


def test_a_restarted_worker_gets_the_buffers_again_before_the_replay(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """Killed with buffers registered: the new worker has them (same checksum), setup replayed."""
    daemon = serving(start_daemon, tmp_path)
    client = connect(daemon.socket)
    proxy = client.request_proxy("registered")
    frame, view = filled(fds)
    table, table_view = filled(fds, bytes(reversed(PATTERN)))
    params = make_buffer(SIZE)
    fds.append(params)
    client.map_buffers(proxy, {1: frame, 2: Output(params), 3: table})
    configured = client.call(proxy, "set_table", fds={"table": Registered(3)})
    assert configured == sha(table_view[:])
    with pytest.raises(ipc.BadArguments, match="named by a setup call"):
        client.unmap_buffers(proxy, [3])  # the replay would name a buffer the worker lacks
    old = client.call(proxy, "pid")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: _zombie(old), WAIT)
    new = client.call(proxy, "pid", wait=WAIT)
    assert new != old
    assert client.attr(proxy, "recoveries") == 1
    assert client.call(proxy, "configured") == configured  # replayed after re-registration
    after = client.call(proxy, "digest", fds={"frame": Registered(1)})
    assert (after["sha"], after["kind"]) == (sha(PATTERN), "input")
    client.call(proxy, "fill", {"byte": 9}, fds={"out": Registered(2)})
    with mmap.mmap(params, SIZE, prot=mmap.PROT_READ) as out:
        assert out[:] == bytes([9]) * SIZE  # the new worker writes the client's own buffer
    view.close()
    table_view.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:  # noqa: PTH123
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_dmabuf_is_synced_around_cpu_access(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """DMA_BUF_IOCTL_SYNC start and end bracket CPU access (a memfd stands in: ENOTTY, ignored).

    This machine has no dma-buf exporter (no /dev/udmabuf, no /dev/dma_heap,
    no modprobe): what is proven is that the ioctl is issued with the right
    flags around the access and that a memfd's ENOTTY is tolerated, not that
    a device's caches are synced.
    """
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    out = make_buffer(SIZE)
    ro = make_buffer(PATTERN)
    fds.extend([out, ro])
    for fd in (out, ro):  # a memfd stands in for a dma-buf only sealed against shrinking
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    client.map_buffers(proxy, {5: DmaBuf(out, writable=True), 6: DmaBuf(ro)})
    syncs = client.call(proxy, "fill", {"byte": 3}, fds={"out": Registered(5)})
    rw = worker_buffers.DMA_BUF_SYNC_RW
    assert syncs == [[worker_buffers.DMA_BUF_SYNC_START | rw, "ENOTTY"],
                     [worker_buffers.DMA_BUF_SYNC_END | rw, "ENOTTY"]]  # fmt: skip
    with mmap.mmap(out, SIZE, prot=mmap.PROT_READ) as view:
        assert view[:] == bytes([3]) * SIZE
    assert client.call(proxy, "digest", fds={"frame": Registered(6)})["kind"] == "dmabuf"
    with pytest.raises(ipc.BadArguments, match="registered as 'dmabuf', not writable"):
        client.call(proxy, "write_input", fds={"frame": Registered(6)})


def test_a_dmabuf_marker_does_not_get_past_the_workers_checks(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """An unsealed memfd or a pipe registered as a DmaBuf is refused: it could SIGBUS the worker."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, SIZE)
    read_end, write_end = os.pipe()
    fds.extend([unsealed, read_end, write_end])
    with pytest.raises(ipc.BadArguments, match="F_SEAL_SHRINK") as err:
        client.map_buffers(proxy, {7: DmaBuf(unsealed, writable=True)})
    assert err.value.details["buffer_id"] == 7
    with pytest.raises(ipc.BadArguments, match="not a memfd"):
        client.map_buffers(proxy, {8: DmaBuf(read_end)})
    os.ftruncate(unsealed, 0)  # had it been mapped, the worker's next touch would be a SIGBUS
    good = make_buffer(PATTERN)
    fds.append(good)
    client.map_buffers(proxy, {7: good})  # nothing of the refused ones was registered
    assert client.call(proxy, "digest", fds={"frame": Registered(7)})["sha"] == sha(PATTERN)


def test_a_module_holding_a_view_past_unmap_harms_only_itself(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """Unmap takes the client's pages from a view the module kept (zeros now); the worker serves on."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    frame, view = filled(fds)
    before = client.call(proxy, "fds")
    client.map_buffers(proxy, {1: frame})
    assert client.call(proxy, "fds") == before + 1  # one descriptor per registered buffer
    assert client.call(proxy, "hold", fds={"frame": Registered(1)}) == sha(PATTERN)
    client.unmap_buffers(proxy, [1])
    assert client.call(proxy, "fds") == before
    view[0:4] = b"LATE"  # the client's next frame: the kept view must not see it
    assert client.call(proxy, "read_held") == [sha(bytes(SIZE))]  # zero pages, no fault
    client.map_buffers(proxy, {1: frame})
    assert client.call(proxy, "digest", fds={"frame": Registered(1)})["sha"] == sha(view[:])
    client.unmap_buffers(proxy, [1])
    assert client.call(proxy, "drop_held") == 1
    assert client.call(proxy, "fds") == before
    client.release(proxy)
    view.close()


def test_a_writable_view_kept_past_unmap_no_longer_reaches_the_output(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """Writes through an output's view kept past unmap land in the worker's own zero pages."""
    client = connect(serving(start_daemon, tmp_path).socket)
    proxy = client.request_proxy("registered")
    params = make_buffer(SIZE)
    fds.append(params)
    client.map_buffers(proxy, {2: Output(params)})
    assert client.call(proxy, "hold_writable", fds={"out": Registered(2)}) == SIZE
    assert client.call(proxy, "write_held", {"byte": 1}) == 1  # still registered: reaches it
    with mmap.mmap(params, SIZE, prot=mmap.PROT_READ) as out:
        assert out[:] == bytes([1]) * SIZE
        client.unmap_buffers(proxy, [2])
        assert client.call(proxy, "write_held", {"byte": 2}) == 1  # no fault in the worker
        assert out[:] == bytes([1]) * SIZE  # and nothing reached the client
    assert client.call(proxy, "drop_held") == 1


def test_the_worker_bounds_what_a_raw_client_registers(
    start_daemon: Start, tmp_path: Path, fds: list[int]
) -> None:
    """Past the client library: unsealed, huge, empty, too many, unknown kind -> ERROR, all or none."""
    daemon = serving(start_daemon, tmp_path)
    with ipc.BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("registered")
        conn = proxy._conn

        def raw(message: p.Message, passed: list[int]) -> p.Message:
            reply: p.Message = conn.reply(conn.send(message, passed), None).message
            return reply

        def spec(*ids: int, kind: str = "input") -> p.MapBuffers:
            return p.MapBuffers(tuple(p.BufferSpec(i, kind) for i in ids))

        good = make_buffer(PATTERN)
        unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(unsealed, SIZE)
        huge = make_buffer(0)
        os.ftruncate(huge, worker_buffers.MAX_REGISTERED_BYTES + 4096)  # sparse: costs nothing
        half = make_buffer(0)
        os.ftruncate(half, worker_buffers.MAX_REGISTERED_BYTES // 2 + 4096)
        empty = make_buffer(0)
        fds.extend([good, unsealed, huge, half, empty])
        ipc._buffers.protect("huge", huge)
        ipc._buffers.protect("half", half)
        ipc._buffers.protect("empty", empty)
        ipc._buffers.protect("good", good)
        cases = [
            (spec(1, 2), [good, unsealed], "F_SEAL_SHRINK", 2),
            (spec(1, 2), [good, huge], "exceed", 2),
            (spec(1), [empty], "empty", 1),
            (spec(1, 1), [good, good], "already registered", 1),
            (spec(1, kind="gpu"), [good], "unknown kind 'gpu'", 1),
            (spec(2**32), [good], "outside", 2**32),
        ]
        for message, passed, phrase, buffer_id in cases:
            reply = raw(message, passed)
            assert isinstance(reply, p.Error), reply
            assert (reply.code, reply.details.get("buffer_id")) == ("bad_arguments", buffer_id)
            assert phrase in reply.message
        reply = raw(spec(1, 2), [half, half])  # each fits, together they do not
        assert isinstance(reply, p.Error)
        assert (reply.code, reply.details["limit"]) == ("limit_exceeded", "registered_bytes")
        reply = raw(spec(1, 2), [good])
        assert isinstance(reply, p.Error)
        assert "1 descriptors for 2 buffers" in reply.message
        os.ftruncate(unsealed, 0)  # it was never mapped: the worker lives
        assert raw(p.UnmapBuffers((1,)), []) == p.Error("bad_arguments",
            "buffer id 1 is not registered", {"buffer_id": 1})  # fmt: skip  # none registered
        before = raw(p.Call("fds"), [])
        for start in range(0, 64, 16):
            assert isinstance(raw(spec(*range(start, start + 16)), [good] * 16), p.BuffersMapped)
        reply = raw(spec(64), [good])
        assert isinstance(reply, p.Error)
        assert (reply.code, reply.details["limit"]) == ("limit_exceeded", "registered_buffers")
        with_buffers = raw(p.Call("fds"), [])
        assert isinstance(raw(p.UnmapBuffers(tuple(range(64))), []), p.BuffersUnmapped)
        after = raw(p.Call("fds"), [])
        assert isinstance(with_buffers, p.Result)
        assert isinstance(after, p.Result)
        assert after.value == with_buffers.value - 64  # every registered descriptor closed
        assert after == before  # and the refused registrations left none behind
        assert client.request_proxy("echo").call("count", timeout=10) == 1
    daemon.stop_cleanly().check()


def test_more_descriptors_than_a_message_carries_end_only_that_channel(
    start_daemon: Start, tmp_path: Path, fds: list[int]
) -> None:
    """MAP_BUFFERS with MAX_FDS + 1 descriptors is a protocol error: that channel closes, no other."""
    daemon = serving(start_daemon, tmp_path)
    with ipc.BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("registered")
        other = client.request_proxy("registered")
        good = make_buffer(PATTERN)
        fds.append(good)
        message = p.MapBuffers(tuple(p.BufferSpec(i) for i in range(p.MAX_FDS + 1)))
        payload = p.encode(message)[p.HEADER_SIZE :]
        header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.MsgType.MAP_BUFFERS, 0,
                               p.MAX_FDS + 1, 5, len(payload))  # fmt: skip
        proxy._conn.sock.sendmsg([header + payload], rights([good] * (p.MAX_FDS + 1)))
        wait_until(lambda: _closed(proxy), WAIT)
        other.map_buffers({1: good})
        assert other.call("digest", fds={"frame": Registered(1)}, timeout=10)["id"] == 1
    daemon.stop_cleanly().check()


def _closed(proxy: Any) -> bool:
    try:
        proxy._conn.next_event(0.05)
    except ipc.IpadError:
        return True
    return proxy._conn.closed_reason is not None


def test_registered_buffers_in_a_sandboxed_worker(
    start_daemon: Start, tmp_path: Path, fds: list[int]
) -> None:
    """Under seccomp and namespaces: registration, the dma-buf sync, a restart's re-registration."""
    modules = '[modules.registered]\nproxy = "sandboxed"\n'
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                          modules=modules)  # fmt: skip
    daemon = start_daemon(config)
    with ipc.BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("registered")
        frame, view = filled(fds)
        out = make_buffer(SIZE)
        fds.append(out)
        fcntl.fcntl(out, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        proxy.map_buffers({1: frame, 2: DmaBuf(out, writable=True)})
        syncs = proxy.call("fill", {"byte": 5}, fds={"out": Registered(2)}, timeout=10)
        assert [s[1] for s in syncs] == ["ENOTTY", "ENOTTY"]  # the ioctl got past seccomp
        old = proxy.info.worker_pid
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("crash", timeout=10)
        proxy.call("pid", timeout=WAIT, wait=WAIT)  # recovered: registered again, replayed
        assert proxy.info.worker_pid != old
        digest = proxy.call("digest", fds={"frame": Registered(1)}, timeout=10)
        assert digest["sha"] == sha(PATTERN)
        assert proxy.call("fill", {"byte": 6}, fds={"out": Registered(2)}, timeout=10)
        with mmap.mmap(out, SIZE, prot=mmap.PROT_READ) as written:
            assert written[:] == bytes([6]) * SIZE
        view.close()
    daemon.stop_cleanly().check()


def test_a_client_cannot_truncate_what_it_registered(
    start_daemon: Start, tmp_path: Path, fds: list[int]
) -> None:
    """The seals a registration needs stop the client itself from shrinking the buffer later."""
    daemon = serving(start_daemon, tmp_path)
    with ipc.BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("registered")
        frame = make_buffer(PATTERN)
        params = make_buffer(SIZE)
        fds.extend([frame, params])
        proxy.map_buffers({1: frame, 2: Output(params)})
        for fd in (frame, params):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # a hostile client after registering: refused by the seal
            again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    os.ftruncate(again, 4096)
            finally:
                os.close(again)
        assert proxy.call("digest", fds={"frame": Registered(1)}, timeout=10)["size"] == SIZE
        proxy.call("fill", {"byte": 1}, fds={"out": Registered(2)}, timeout=10)
    daemon.stop_cleanly().check()


def test_the_clients_duplicates_are_closed_with_the_proxy(
    start_daemon: Start, tmp_path: Path, connect: Connect, fds: list[int]
) -> None:
    """The descriptors kept to register again are closed by unmap and by release: none leak."""
    client = connect(serving(start_daemon, tmp_path).socket)
    frame, view = filled(fds)
    view.close()
    params = make_buffer(16)
    fds.append(params)
    proxy = client.request_proxy("registered")
    client.call(proxy, "pid")

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))  # noqa: PTH208 - a count

    baseline = open_fds()
    client.map_buffers(proxy, {1: frame, 2: Output(params), 3: frame})
    assert open_fds() == baseline + 3
    client.unmap_buffers(proxy, [1])
    assert open_fds() == baseline + 2
    client.release(proxy)
    assert open_fds() == baseline - 1  # the duplicates, and the proxy's channel


def test_a_call_without_registered_buffers_is_encoded_as_before() -> None:
    """``buffer_args`` goes on the wire only when used, so older workers still decode every call."""
    from ipad.client._core import build_call  # noqa: PLC0415 - the clients' own encoder

    plain, _ = build_call("process", {"frame": 1}, None)
    assert msgspec.msgpack.decode(p.encode(plain)[p.HEADER_SIZE :]) == {
        "method": "process", "args": {"frame": 1}, "fd_args": []}  # fmt: skip
    named, fd_list = build_call("process", None, {"stats": Registered(3)})
    assert fd_list == []
    assert msgspec.msgpack.decode(p.encode(named)[p.HEADER_SIZE :])["buffer_args"] == {"stats": 3}


#: A client that registers 64 buffers, says so, and waits to be killed.
KILLED_CLIENT = """
import sys, time
from ipad.client import BlockingClient, make_buffer
client = BlockingClient(sys.argv[1])
proxy = client.request_proxy("registered")
fd = make_buffer(4096)
for start in range(0, 64, 16):
    proxy.map_buffers(dict.fromkeys(range(start, start + 16), fd))
print(proxy.call("fds"), flush=True)
time.sleep(60)
"""


def test_a_client_killed_with_buffers_registered_leaves_nothing_in_the_worker(
    start_daemon: Start, tmp_path: Path
) -> None:
    """SIGKILL a client holding 64 registered buffers: the shared worker closes every one."""
    daemon = serving(start_daemon, tmp_path)
    with ipc.BlockingClient(daemon.socket) as client:
        neighbour = client.request_proxy("registered")
        before = neighbour.call("fds", timeout=10)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, str(daemon.socket)],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # bounded: the test's timeout, and the client's sleep
            assert int(line) == before + 1 + 64  # its channel and its buffers, in the same worker
        finally:
            proc.kill()
            proc.wait(WAIT)
            if proc.stdout is not None:
                proc.stdout.close()
        wait_until(lambda: neighbour.call("fds", timeout=10) == before, WAIT)
        assert neighbour.call("pid", timeout=10) > 0
    daemon.stop_cleanly().check()
