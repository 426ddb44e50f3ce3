"""The buffers a proxy registered with its instance (MAP_BUFFERS), kept to register them again.

Sans I/O, shared by both clients. Like the setup calls' buffers, each
registered descriptor is duplicated: the caller may close its own, and after
a worker restart the proxy registers every buffer on the new channel before
it replays its setup calls (which may name them).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping

from ipad.client._buffers import BufferArg, DmaBuf, Output, fd_of, kind_of, protect
from ipad.protocol import wire as p
from ipad.protocol.errors import BadArguments


class BufferRegistry:
    """Registered id -> our duplicate of its buffer, within the wire's bounds."""

    def __init__(self) -> None:
        self.entries: dict[int, BufferArg] = {}

    def map_message(self, buffers: Mapping[int, BufferArg]) -> tuple[p.MapBuffers, list[int]]:
        """MAP_BUFFERS for ``buffers`` and its descriptors, each sealed as a call's would be.

        BadArguments, naming the id, for anything the worker would refuse that
        can be seen here; nothing is sent then.
        """
        if not 0 < len(buffers) <= p.MAX_FDS:
            raise BadArguments(
                f"map_buffers takes 1 to {p.MAX_FDS} buffers at a time, not {len(buffers)}",
                {"sent": False},
            )
        if len(self.entries) + len(buffers) > p.MAX_REGISTERED_BUFFERS:
            raise BadArguments(
                f"a proxy may have {p.MAX_REGISTERED_BUFFERS} buffers registered at once "
                f"({len(self.entries)} registered, {len(buffers)} more asked)",
                {"sent": False, "limit": "registered_buffers"},
            )
        specs, fds = [], []
        for buffer_id, value in buffers.items():
            if isinstance(buffer_id, bool) or not isinstance(buffer_id, int):
                raise BadArguments(f"buffer id {buffer_id!r} is not an integer", {"sent": False})
            if not 0 <= buffer_id <= p.MAX_BUFFER_ID:
                raise _bad(f"buffer id {buffer_id} is outside 0..{p.MAX_BUFFER_ID}", buffer_id)
            if buffer_id in self.entries:
                raise _bad(f"buffer id {buffer_id} is already registered", buffer_id)
            if isinstance(value, DmaBuf):
                if isinstance(value.fd, bool) or not isinstance(value.fd, int) or value.fd < 0:
                    raise _bad(f"buffer id {buffer_id}: {value.fd!r} is not a descriptor",
                               buffer_id)  # fmt: skip
                fd = value.fd
            else:
                fd = protect(f"#{buffer_id}", value)
            specs.append(p.BufferSpec(buffer_id, kind_of(value)))
            fds.append(fd)
        return p.MapBuffers(tuple(specs)), fds

    def mapped(self, buffers: Mapping[int, BufferArg]) -> None:
        """The worker registered ``buffers``: keep a duplicate of each for the next worker."""
        for buffer_id, value in buffers.items():
            self.entries[buffer_id] = _dup(value)

    def unmap_message(self, ids: Iterable[int], in_use: Collection[int]) -> p.UnmapBuffers:
        """UNMAP_BUFFERS for ``ids``; BadArguments for one not registered or still in use.

        ``in_use`` are the ids a recorded setup call names: a replay would name
        a buffer the new worker never had.
        """
        wanted = tuple(ids)
        for buffer_id in wanted:
            if buffer_id not in self.entries:
                raise _bad(f"buffer id {buffer_id!r} is not registered", buffer_id)
            if buffer_id in in_use:
                raise _bad(f"buffer id {buffer_id} is named by a setup call that would be "
                           "replayed; call it again without it first", buffer_id)  # fmt: skip
        return p.UnmapBuffers(wanted)

    def unmapped(self, ids: Iterable[int]) -> None:
        """The worker unregistered ``ids``: close our duplicates."""
        for buffer_id in ids:
            value = self.entries.pop(buffer_id, None)
            if value is not None:
                os.close(fd_of(value))

    def replay(self) -> list[tuple[p.MapBuffers, list[int]]]:
        """MAP_BUFFERS messages registering everything again on a new channel (MAX_FDS each)."""
        items = list(self.entries.items())
        messages = []
        for start in range(0, len(items), p.MAX_FDS):
            chunk = items[start : start + p.MAX_FDS]
            specs = tuple(p.BufferSpec(i, kind_of(v)) for i, v in chunk)
            messages.append((p.MapBuffers(specs), [fd_of(v) for _, v in chunk]))
        return messages

    def close(self) -> None:
        """Close every duplicate."""
        self.unmapped(list(self.entries))


def _dup(value: BufferArg) -> BufferArg:
    if isinstance(value, DmaBuf):
        return DmaBuf(os.dup(value.fd), value.writable)
    if isinstance(value, Output):
        return Output(os.dup(value.fd))
    return os.dup(value)


def _bad(message: str, buffer_id: object) -> BadArguments:
    return BadArguments(message, {"buffer_id": buffer_id, "sent": False})
