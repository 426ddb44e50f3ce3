"""Buffers a client registered with a module instance (MAP_BUFFERS): mapped once, until unmapped.

A camera reuses a small pool of buffers for every frame; libcamera hands the
pool to its IPA once (``mapBuffers``) and names buffers by id afterwards. Here
the worker checks each registered descriptor once, maps it once, and gives the
module the same ``RegisteredBuffer`` at every call that names its id, until
UNMAP_BUFFERS or the instance closes.

What is checked at registration is what keeps the worker alive: a memfd must
be sealed against shrinking (a mapping of a file that shrinks faults with
SIGBUS), and a dma-buf must really be one (its importer cannot resize it).
Inputs are mapped read-only, outputs writable. Everything is bounded: ids per
instance, bytes per instance, descriptors per message (the wire's MAX_FDS).

Imported inside workers: standard library only, no trio.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from typing import NoReturn

from ipad.ipa import Buffer, BufferRefused
from ipad.protocol import wire as p

#: Buffers one instance may have registered at once (libcamera pools are a handful each).
MAX_REGISTERED = p.MAX_REGISTERED_BUFFERS
#: Bytes one instance may have registered at once: a few dozen 4K frames.
MAX_REGISTERED_BYTES = 1 << 30
MAX_BUFFER_ID = p.MAX_BUFFER_ID

#: kind -> (the module may write it, it is a dma-buf).
KINDS = {
    "input": (False, False),
    "output": (True, False),
    "dmabuf": (False, True),
    "dmabuf_output": (True, True),
}

#: linux/dma-buf.h: struct dma_buf_sync { __u64 flags; } and its flags.
DMA_BUF_SYNC_READ = 1
DMA_BUF_SYNC_WRITE = 2
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0
DMA_BUF_SYNC_END = 4
#: _IOW('b', 0, struct dma_buf_sync): direction write (1 << 30), size 8, type 'b', nr 0.
DMA_BUF_IOCTL_SYNC = (1 << 30) | (8 << 16) | (ord("b") << 8) | 0
#: statfs f_type of a dma-buf's file (linux/magic.h DMA_BUF_MAGIC).
DMA_BUF_MAGIC = 0x444D4142
#: Tries of a sync the kernel interrupted (EINTR, EAGAIN), as libcamera does.
SYNC_TRIES = 8

_LIBC = ctypes.CDLL(None, use_errno=True)
_mmap = _LIBC.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]  # fmt: skip
_munmap = _LIBC.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
#: mmap(2): place the mapping exactly at the address given, replacing what was there.
MAP_FIXED = 0x10


def filesystem_magic(fd: int) -> int:
    """fstatfs(2)'s ``f_type`` of a descriptor: which filesystem its file is on."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _LIBC.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(struct.unpack_from("l", buf.raw)[0]) & 0xFFFFFFFF


class RegisteredBuffer(Buffer):
    """A buffer registered by id: mapped at registration, the same object at every call.

    ``map()`` returns views of the one mapping (no map or unmap per call);
    ``map(writable=True)`` only for an output. ``close()`` does nothing: the
    host releases it at UNMAP_BUFFERS or when the instance closes.
    """

    def __init__(self, fd: int, buffer_id: int, kind: str) -> None:
        super().__init__(fd, f"#{buffer_id}")
        self.id = buffer_id
        self.kind = kind
        self.writable, self.dmabuf = KINDS[kind]
        #: A real dma-buf (its filesystem says so); False for a memfd standing in for one.
        self.real_dmabuf = False
        #: The last DMA_BUF_IOCTL_SYNC calls: (flags, "ok" or the errno's name); for diagnosis.
        self.syncs: collections.deque[tuple[int, str]] = collections.deque(maxlen=8)
        self._length = 0
        #: The mapping, made with mmap(2) itself: Python's mmap would hold a second descriptor
        #: per buffer, and could not take the pages from a view the module kept.
        self._address = 0
        self._pages: ctypes.Array[ctypes.c_char] | None = None

    def open(self) -> None:
        """Check the descriptor and map it; BufferRefused says why it is not safe."""
        if self.dmabuf:
            self.real_dmabuf = _is_dmabuf(self.fd)
        if not self.real_dmabuf:
            # A memfd (a dma-buf stands in as one where no exporter exists): it must not shrink.
            self._check()
        length = os.lseek(self.fd, 0, os.SEEK_END)  # a dma-buf's fstat size is 0
        if length <= 0:
            self._refuse("it is empty")
        if length > MAX_REGISTERED_BYTES:
            self._refuse(f"its {length} bytes exceed {MAX_REGISTERED_BYTES} per instance")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        address = _mmap(None, length, prot, mmap.MAP_SHARED, self.fd, 0)
        if address in (None, MAP_FAILED):
            code = ctypes.get_errno()
            if code in (errno.EPERM, errno.EACCES):
                why = "sealed against writes" if self.writable else "not readable"
                self._refuse(f"it is {why}, so it cannot be a {self.kind} buffer")
            self._refuse(f"it cannot be mapped: {os.strerror(code)}")
        self._address = address
        self._pages = (ctypes.c_char * length).from_address(address)
        self._length = length
        self._writable = self.writable

    @property
    def size(self) -> int:
        """The bytes mapped (fixed at registration: the file cannot shrink)."""
        return self._length

    def map(self, *, writable: bool = False) -> memoryview:
        """A view of the mapping made at registration, writable only for an output."""
        if self._pages is None:
            self._refuse("it was unmapped")
        if writable and not self.writable:
            self._refuse(f"it was registered as {self.kind!r}, not writable")
        view = memoryview(self._pages).cast("B")
        return view if writable else view.toreadonly()

    @contextlib.contextmanager
    def cpu_access(self, *, write: bool = False) -> Iterator[memoryview]:
        """The bytes for the CPU; for a dma-buf, bracketed by DMA_BUF_IOCTL_SYNC start and end."""
        view = self.map(writable=write)
        direction = DMA_BUF_SYNC_RW if write else DMA_BUF_SYNC_READ
        if self.dmabuf:
            self._sync(DMA_BUF_SYNC_START | direction)
        try:
            yield view
        finally:
            view.release()
            if self.dmabuf:
                self._sync(DMA_BUF_SYNC_END | direction)

    def _sync(self, flags: int) -> None:
        """DMA_BUF_IOCTL_SYNC; a memfd standing in for a dma-buf answers ENOTTY, which is fine."""
        arg = struct.pack("=Q", flags)
        for _ in range(SYNC_TRIES):
            try:
                fcntl.ioctl(self.fd, DMA_BUF_IOCTL_SYNC, arg)
            except OSError as exc:
                code = exc.errno or 0
                self.syncs.append((flags, errno.errorcode.get(code, str(code))))
                if code in (errno.EINTR, errno.EAGAIN):
                    continue
                if code == errno.ENOTTY and not self.real_dmabuf:
                    return  # not a dma-buf: there are no device caches to sync with
                raise
            self.syncs.append((flags, "ok"))
            return
        raise OSError(errno.EAGAIN, f"DMA_BUF_IOCTL_SYNC interrupted {SYNC_TRIES} times")

    def _refuse(self, why: str) -> NoReturn:
        self.refused = BufferRefused(f"buffer {self.name!r} (id {self.id}) cannot be used: {why}")
        raise self.refused

    def close(self) -> None:
        """Nothing: a registered buffer outlives the call; UNMAP_BUFFERS releases it."""

    def release(self) -> bool:
        """Unmap and close; False if the module still held a view of it.

        A view the module kept must not fault (that would kill the worker, and
        every instance it serves) nor keep seeing the client's buffer: its
        pages are replaced by private zero pages, which stay reserved for as
        long as the worker lives. Otherwise the range is simply unmapped.
        """
        held = False
        if self._pages is not None:
            # Our attribute and getrefcount's argument; every view adds one, through its buffer.
            held = sys.getrefcount(self._pages) > 2
            if held:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
                prot = mmap.PROT_READ | mmap.PROT_WRITE
                if _mmap(self._address, self._length, prot, flags, -1, 0) != self._address:
                    os.abort()  # the client's pages would stay in reach: never carry on
            elif _munmap(self._address, self._length) != 0:
                os.abort()
            self._pages = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return not held


def _is_dmabuf(fd: int) -> bool:
    try:
        return filesystem_magic(fd) == DMA_BUF_MAGIC
    except OSError:
        return False


class InstanceBuffers:
    """The buffers one instance has registered, within MAX_REGISTERED and MAX_REGISTERED_BYTES."""

    def __init__(self) -> None:
        self.buffers: dict[int, RegisteredBuffer] = {}
        self.bytes = 0
        #: Buffers released while the module still held a view of them.
        self.held_past_unmap = 0

    def get(self, buffer_id: int) -> RegisteredBuffer | None:
        """The buffer registered under ``buffer_id``, if any."""
        return self.buffers.get(buffer_id)

    def map(self, message: p.MapBuffers, fds: Sequence[int]) -> p.Message:
        """Register every buffer of MAP_BUFFERS, or none (the ERROR names the one refused).

        The descriptors are ours: kept by the buffers registered, closed otherwise.
        """
        opened: list[RegisteredBuffer] = []
        committed = False
        try:
            error = self._refusal(message, fds)
            if error is not None:
                return error
            added = 0
            for spec, fd in zip(message.buffers, fds, strict=True):
                buffer = RegisteredBuffer(fd, spec.id, spec.kind)
                opened.append(buffer)
                try:
                    buffer.open()
                except BufferRefused as exc:
                    return _bad(str(exc), spec.id)
                added += buffer.size
            if self.bytes + added > MAX_REGISTERED_BYTES:
                return p.Error(
                    p.ErrorCode.LIMIT_EXCEEDED,
                    f"registering {added} bytes would exceed {MAX_REGISTERED_BYTES} "
                    f"per instance ({self.bytes} registered)",
                    {"limit": "registered_bytes", "max": MAX_REGISTERED_BYTES},
                )
            for buffer in opened:
                self.buffers[buffer.id] = buffer
            self.bytes += added
            committed = True
            return p.BuffersMapped(tuple(spec.id for spec in message.buffers))
        finally:
            if not committed:
                for buffer in opened:
                    buffer.release()  # closes its descriptor
                p.close_fds(fds[len(opened) :])

    def _refusal(self, message: p.MapBuffers, fds: Sequence[int]) -> p.Error | None:
        if len(message.buffers) != len(fds):
            return p.Error(
                p.ErrorCode.BAD_ARGUMENTS,
                f"{len(fds)} descriptors for {len(message.buffers)} buffers",
            )
        seen: set[int] = set()
        for spec in message.buffers:
            if not 0 <= spec.id <= MAX_BUFFER_ID:
                return _bad(f"buffer id {spec.id} is outside 0..{MAX_BUFFER_ID}", spec.id)
            if spec.id in seen or spec.id in self.buffers:
                return _bad(f"buffer id {spec.id} is already registered", spec.id)
            if spec.kind not in KINDS:
                kinds = ", ".join(KINDS)
                return _bad(f"buffer id {spec.id}: unknown kind {spec.kind!r} ({kinds})", spec.id)
            seen.add(spec.id)
        if len(self.buffers) + len(seen) > MAX_REGISTERED:
            return p.Error(
                p.ErrorCode.LIMIT_EXCEEDED,
                f"an instance may register {MAX_REGISTERED} buffers at once "
                f"({len(self.buffers)} registered, {len(seen)} more asked)",
                {"limit": "registered_buffers", "max": MAX_REGISTERED},
            )
        return None

    def unmap(self, message: p.UnmapBuffers) -> p.Message:
        """Unregister buffers, all or none: an unknown id is an ERROR naming it."""
        for buffer_id in message.ids:
            if buffer_id not in self.buffers:
                return _bad(f"buffer id {buffer_id} is not registered", buffer_id)
        for buffer_id in message.ids:
            self._release(buffer_id)
        return p.BuffersUnmapped(tuple(message.ids))

    def _release(self, buffer_id: int) -> None:
        buffer = self.buffers.pop(buffer_id, None)
        if buffer is None:
            return
        self.bytes -= buffer.size
        if not buffer.release():
            self.held_past_unmap += 1

    def close(self) -> None:
        """Release every buffer: the instance is closing."""
        for buffer_id in list(self.buffers):
            self._release(buffer_id)


def _bad(message: str, buffer_id: int) -> p.Error:
    return p.Error(p.ErrorCode.BAD_ARGUMENTS, message, {"buffer_id": buffer_id})
