"""A module that turns the buffers its clients pass against them, and floods its clients.

Each attack answers with what happened (``"ok"`` or the errno's name) rather
than raising, so a test sees from the outside which ones the kernel refused;
only ``mremap_touch`` is meant to kill its own worker (SIGBUS past the end).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from ipad.ipa import Buffer, IPAModule, setup
from ipad.protocol import wire as p

__version__ = "1.0.0"

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]  # fmt: skip
LIBC.mremap.restype = ctypes.c_void_p
LIBC.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_PRIVATE = 1, 2
MREMAP_MAYMOVE = 1
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MADV_REMOVE = 9
F_SEAL_WRITE = 0x0008


def _errno() -> str:
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def _try(attack: Callable[[], object]) -> str:
    try:
        attack()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _c(result: int | None) -> None:
    if result is None or result in (-1, MAP_FAILED):
        raise OSError(ctypes.get_errno(), _errno())


class HostileBuffers(IPAModule):
    """Attacks on passed buffers, one method each, and floods of what a client must store."""

    kept: list[int] = []  # noqa: RUF012 - descriptors kept across calls, per worker

    def digest(self, data: Buffer) -> str:
        """What the worker reads: the buffer's SHA-256 (mapped as a module maps it)."""
        return hashlib.sha256(data.map()).hexdigest()

    def truncate(self, data: Buffer) -> str:
        """Only truncate the buffer to nothing: unsealed, its client's next touch is a SIGBUS."""
        return _try(lambda: os.ftruncate(data.fd, 0))

    def attack(self, data: Buffer) -> dict[str, str]:
        """Every way to change the buffer's size or bytes from the worker; what each did."""
        fd, size = data.fd, data.size
        out: dict[str, str] = {}
        out["truncate"] = _try(lambda: os.ftruncate(fd, 0))
        out["shrink_by_one"] = _try(lambda: os.ftruncate(fd, max(size - 1, 0)))
        out["grow"] = _try(lambda: os.ftruncate(fd, size + 1 << 20))
        out["write"] = _try(lambda: os.pwrite(fd, b"EVIL", 0))
        out["append"] = _try(lambda: os.pwrite(fd, b"EVIL", size))
        out["punch_hole"] = _try(lambda: _c(LIBC.fallocate(
            fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, max(size, 1))))  # fmt: skip
        out["fallocate_grow"] = _try(lambda: _c(LIBC.fallocate(fd, 0, 0, size + 1 << 20)))
        out["map_shared_writable"] = _try(lambda: mmap.mmap(fd, 0, flags=mmap.MAP_SHARED))

        def reopen(action: Callable[[int], object]) -> Callable[[], object]:
            def run() -> None:
                again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
                try:
                    action(again)
                finally:
                    os.close(again)

            return run

        out["reopen_write"] = _try(reopen(lambda f: os.pwrite(f, b"EVIL", 0)))
        out["reopen_truncate"] = _try(reopen(lambda f: os.ftruncate(f, 0)))
        out["reopen_map_writable"] = _try(reopen(lambda f: mmap.mmap(f, 0, flags=mmap.MAP_SHARED)))

        def splice() -> None:
            r, w = os.pipe()
            try:
                os.write(w, b"EVIL")
                os.splice(r, fd, 4, offset_dst=0)
            finally:
                os.close(r)
                os.close(w)

        out["splice"] = _try(splice)
        if size:
            out.update(self._through_mappings(fd, size))
        out["add_write_seal"] = _try(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_WRITE))
        return out

    def _through_mappings(self, fd: int, size: int) -> dict[str, str]:
        out: dict[str, str] = {}
        shared = LIBC.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        _c(shared)
        out["mprotect_writable"] = _try(
            lambda: _c(LIBC.mprotect(shared, size, PROT_READ | PROT_WRITE))
        )
        out["madvise_remove"] = _try(lambda: _c(LIBC.madvise(shared, size, MADV_REMOVE)))
        try:
            mem = os.open("/proc/self/mem", os.O_RDWR)
        except OSError as exc:  # a sandboxed worker may not open it at all
            refused = errno.errorcode.get(exc.errno or 0, str(exc))
            out["proc_mem_shared"] = out["proc_mem_private"] = refused
            return out
        try:
            out["proc_mem_shared"] = _try(lambda: os.pwrite(mem, b"EVIL", shared))
            private = LIBC.mmap(None, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0)
            _c(private)
            # Copy-on-write: lands in the worker's own copy, never in the client's pages.
            out["proc_mem_private"] = _try(lambda: os.pwrite(mem, b"EVIL", private))
            ctypes.memmove(private, b"EVIL", 4)
        finally:
            os.close(mem)
        return out

    def mremap_touch(self, data: Buffer) -> str:
        """Grow the worker's mapping past the end and read there: SIGBUS, in this worker only."""
        size = data.size
        view = data.map()
        del view
        address = LIBC.mmap(None, size, PROT_READ, MAP_SHARED, data.fd, 0)
        _c(address)
        bigger = LIBC.mremap(address, size, size + (1 << 20), MREMAP_MAYMOVE)
        _c(bigger)
        return ctypes.string_at(bigger + size + 4096, 1).hex()

    @setup
    def keep(self, data: Buffer) -> str:
        """A setup call whose buffer the client keeps for replay; the module keeps a copy too."""
        HostileBuffers.kept.append(os.dup(data.fd))
        return self.digest(data)

    def attack_kept(self) -> dict[str, str]:
        """Attack the descriptors kept from earlier calls (the client's replay copies' memfds)."""
        results = {}
        for i, fd in enumerate(HostileBuffers.kept):
            kept = Buffer(os.dup(fd), f"kept{i}")
            try:
                results.update({f"{i}:{k}": v for k, v in self.attack(kept).items()})
            finally:
                kept.close()
        return results

    def fill(self, out: Buffer, byte: int) -> str:
        """Write ``byte`` over an output buffer, then try to resize it; what resizing did."""
        view = out.map(writable=True)
        view[:] = bytes([byte]) * len(view)
        del view
        return _try(lambda: os.ftruncate(out.fd, 0))

    def map_writable(self, data: Buffer) -> str:
        """Ask the host for a writable mapping of an input buffer (refused as bad_arguments)."""
        view = data.map(writable=True)
        view[0:4] = b"EVIL"
        return "mapped"

    def swallow_refusal(self, data: Buffer) -> str:
        """Map an unsafe buffer and hide the refusal: the call must fail all the same."""
        try:
            data.map()
        except ValueError:
            return "swallowed"
        return "mapped"

    def flood(self, count: int, items: int, pause: float = 0.0) -> int:
        """Emit ``count`` events whose data decodes to ``items`` empty lists (~64 B each).

        ``pause`` between events lets a slow reader keep up, so none is lost to a full socket.
        """
        payload: list[list[int]] = [[]] * items  # one list here; ``items`` lists in the client
        for i in range(count):
            self.context.emit("flood", {"i": i, "junk": payload})
            time.sleep(pause)
        return count

    def big(self, items: int) -> list[list[int]]:
        """A result that decodes to ``items`` empty lists in the client (~64 B each)."""
        return [[]] * items

    def reply_flood(self, count: int) -> int:
        """Send ``count`` replies to request ids the client never used, on this channel."""
        sock = self._channel()
        sent = 0
        for i in range(count):
            packet = p.encode(p.Result(i), request_id=1_000_000 + i)
            try:
                sock.send(packet)
            except BlockingIOError:
                break  # the client is behind: what it reads is enough to prove the point
            sent += 1
        return sent

    def _channel(self) -> socket.socket:
        """The channel socket of this instance, found through the host's emit closure."""
        emit: Any = self.context._emit
        for cell in emit.__closure__:
            sock = getattr(cell.cell_contents, "sock", None)
            if isinstance(sock, socket.socket):
                return sock
        raise LookupError("no channel socket in reach")
