"""The wire protocol, sans I/O: round trips, fuzzed packets and every refusal, with plain bytes."""

from __future__ import annotations

import functools
import os
import struct
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipad.protocol import wire as p

INT64 = st.integers(-(2**63), 2**63 - 1)
U64 = st.integers(0, p.MAX_REQUEST_ID)
TEXT = st.text(st.characters(codec="utf-8"), max_size=16)
SCALARS = (
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | TEXT | st.binary(max_size=16)
)
#: Anything msgpack carries and msgspec gives back unchanged (lists, not tuples; str keys).
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


#: Strategies for the field types that have no parameters.
SIMPLE: dict[type[mi.Type], st.SearchStrategy[Any]] = {
    mi.AnyType: VALUES,
    mi.NoneType: st.none(),
    mi.BoolType: st.booleans(),
    mi.IntType: INT64,
    mi.FloatType: st.floats(allow_nan=False),
    mi.StrType: TEXT,
    mi.BytesType: st.binary(max_size=16),
}


def strategy_for(kind: mi.Type) -> st.SearchStrategy[Any]:
    """Values of a msgspec field type, so a new message gets a strategy without a test change."""
    if type(kind) in SIMPLE:
        return SIMPLE[type(kind)]
    match kind:
        case mi.DictType(key_type=key, value_type=value):
            return st.dictionaries(strategy_for(key), strategy_for(value), max_size=4)
        case mi.VarTupleType(item_type=item):
            return st.lists(strategy_for(item), max_size=4).map(tuple)
        case mi.ListType(item_type=item):
            return st.lists(strategy_for(item), max_size=4)
        case mi.UnionType(types=types):
            return st.one_of(*(strategy_for(t) for t in types))
        case mi.StructType(cls=cls, fields=fields):
            return struct_strategy(cls, fields)
    raise NotImplementedError(f"no strategy for {kind!r}: extend strategy_for")


def struct_strategy(cls: type[Any], fields: tuple[mi.Field, ...]) -> st.SearchStrategy[Any]:
    """Instances of a Struct; fields with defaults are sometimes left to them."""
    required = {f.name: strategy_for(f.type) for f in fields if f.required}
    optional = {f.name: strategy_for(f.type) for f in fields if not f.required}
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


@functools.cache
def message_strategy(cls: type[p.Message]) -> st.SearchStrategy[p.Message]:
    """Every instance of one message class hypothesis can think of."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    strategy: st.SearchStrategy[p.Message] = strategy_for(info)
    return strategy


MESSAGES: st.SearchStrategy[p.Message] = st.sampled_from(list(p.MESSAGE_CLASSES.values())).flatmap(
    message_strategy
)


@st.composite
def encoded(draw: st.DrawFn) -> tuple[p.Message, int, int, bytes]:
    """A valid packet: its message, request id, announced fd count and bytes."""
    message = draw(MESSAGES)
    request_id = draw(U64)
    nfds = draw(st.integers(0, p.FD_LIMITS.get(message.TYPE, 0)))
    return message, request_id, nfds, p.encode(message, request_id, nfds)


@st.composite
def mutated_packets(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid packet with one kind of damage, and the fd count the original announced."""
    _, _, nfds, original = draw(encoded())
    packet = bytearray(original)
    damage = draw(st.sampled_from(["flip", "truncate", "extend", "length", "field", "retype"]))
    if damage == "flip":
        for _ in range(draw(st.integers(1, 4))):
            packet[draw(st.integers(0, len(packet) - 1))] ^= draw(st.integers(1, 255))
    elif damage == "truncate":
        del packet[draw(st.integers(0, len(packet) - 1)) :]
    elif damage == "extend":
        packet += draw(st.binary(min_size=1, max_size=32))
    elif damage == "length":
        struct.pack_into("<I", packet, 16, draw(st.integers(0, 2**32 - 1)))
    elif damage == "field":
        # One header field (offset, struct format) set to any value it can hold.
        offset, fmt = draw(st.sampled_from([(2, "<B"), (3, "<B"), (4, "<H"), (6, "<H")]))
        struct.pack_into(
            fmt, packet, offset, draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
        )
    else:
        # Another type's header on this payload: valid msgpack of the wrong shape.
        packet[3] = draw(st.sampled_from(list(p.MsgType)))
    return bytes(packet), nfds


@st.composite
def random_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A packet with valid magic and every other header field and the payload chosen freely."""
    if draw(st.booleans()):
        payload = msgspec.msgpack.encode(draw(MESSAGES))
    else:
        payload = draw(st.binary(max_size=64))
    version = draw(st.just(p.PROTOCOL_VERSION) | st.integers(0, 255))
    kind = draw(st.sampled_from(list(p.MsgType)) | st.integers(0, 255))
    flags = draw(st.just(0) | st.integers(0, 2**16 - 1))
    nfds = draw(st.integers(0, p.MAX_FDS + 2))
    length = draw(st.just(len(payload)) | st.integers(0, 2**32 - 1))
    header = p.HEADER.pack(p.MAGIC, version, kind, flags, nfds, draw(U64), length)
    return header + payload, draw(st.just(nfds) | st.integers(0, p.MAX_FDS + 2))


def open_fds(n: int) -> list[int]:
    """``n`` fresh descriptors (duplicates of a pipe's read end), to pass along with a packet."""
    read_end, write_end = os.pipe()
    try:
        return [os.dup(read_end) for _ in range(n)]
    finally:
        os.close(read_end)
        os.close(write_end)


def is_closed(fd: int) -> bool:
    """True if ``fd`` is not an open descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def decode_outcome(
    packet: bytes, fds: list[int], allowed: frozenset[p.MsgType] | None = None
) -> p.Frame | p.ProtocolError:
    """What ``decode`` did: a Frame or a ProtocolError; anything else fails the test."""
    try:
        return p.decode(packet, fds, allowed=allowed)
    except p.ProtocolError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the property itself: nothing else may escape
        p.close_fds(fds)
        pytest.fail(f"decode raised {exc!r} instead of ProtocolError for {packet!r}")


def check_outcome(
    packet: bytes, fds: list[int], allowed: frozenset[p.MsgType] | None = None
) -> None:
    """Decode ``packet`` with ``fds``: a Frame owns exactly them; a ProtocolError closed them all."""
    outcome = decode_outcome(packet, fds, allowed)
    if isinstance(outcome, p.Frame):
        try:
            assert outcome.fds == tuple(fds)
            assert allowed is None or outcome.message.TYPE in allowed
        finally:
            outcome.close_fds()
    elif isinstance(outcome, p.ProtocolError):
        assert outcome.reason
        assert str(outcome) == outcome.reason
        still_open = [fd for fd in fds if not is_closed(fd)]
        p.close_fds(still_open)
        assert not still_open, f"{outcome.reason!r} left fds open"


def header_of(packet: bytes) -> tuple[bytes, int, int, int, int, int, int]:
    """The header fields of a packet."""
    fields: tuple[bytes, int, int, int, int, int, int] = p.HEADER.unpack_from(packet)
    return fields


def packet_for(kind: int, payload: bytes, *, request_id: int = 7, nfds: int = 0) -> bytes:
    """A packet with a correct header around ``payload``."""
    return (
        p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, kind, 0, nfds, request_id, len(payload))
        + payload
    )


def expect_error(
    packet: bytes,
    fds: list[int] | None = None,
    *,
    allowed: frozenset[p.MsgType] | None = None,
    max_payload: int = p.MAX_PAYLOAD,
) -> p.ProtocolError:
    """The ProtocolError ``decode`` raises for ``packet``, after checking it closed every fd."""
    fds = fds or []
    with pytest.raises(p.ProtocolError) as info:
        p.decode(packet, fds, allowed=allowed, max_payload=max_payload)
    assert all(is_closed(fd) for fd in fds)
    return info.value


# --- the tables ----------------------------------------------------------------


def test_header_is_twenty_bytes() -> None:
    """The header is the documented 20 bytes."""
    assert p.HEADER_SIZE == 20
    assert p.MAX_PACKET == p.HEADER_SIZE + p.MAX_PAYLOAD


def test_every_type_has_one_class() -> None:
    """Each MsgType number has exactly one message class, whose TYPE is that number."""
    assert set(p.MESSAGE_CLASSES) == set(p.MsgType)
    for kind, cls in p.MESSAGE_CLASSES.items():
        assert cls.TYPE is kind


def test_every_type_has_a_receiver() -> None:
    """Every message type is accepted by at least one side of one channel."""
    received = (
        p.FROM_CLIENT
        | p.FROM_DAEMON
        | p.TO_WORKER_CONTROL
        | p.FROM_WORKER_CONTROL
        | p.TO_WORKER_CHANNEL
        | p.FROM_WORKER_CHANNEL
        | p.TO_FORKSERVER
        | p.FROM_FORKSERVER
    )
    assert received == set(p.MsgType)


def test_fd_limits_stay_within_max_fds() -> None:
    """No message type may carry more descriptors than a receiver makes room for."""
    assert all(0 < limit <= p.MAX_FDS for limit in p.FD_LIMITS.values())


def test_ping_packet_bytes() -> None:
    """A PING with request id 7 is exactly the bytes docs/protocol.md shows."""
    assert p.encode(p.Ping(), 7) == bytes.fromhex(
        "4950 01 24 0000 0000 0700000000000000 01000000 80"
    )


def test_call_payload_is_a_map_by_field_name() -> None:
    """A payload is a msgpack map keyed by field name, defaults included."""
    packet = p.encode(p.Call("process", {"frame": 1}, ("stats",)), 1, 1)
    payload = msgspec.msgpack.decode(packet[p.HEADER_SIZE :])
    assert payload == {"method": "process", "args": {"frame": 1}, "fd_args": ["stats"]}


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("cls", list(p.MESSAGE_CLASSES.values()), ids=lambda c: c.TYPE.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[p.Message], data: st.DataObject) -> None:
    """decode(encode(m)) gives back the message, the request id and the fds, for every type."""
    message = data.draw(message_strategy(cls))
    request_id = data.draw(U64)
    nfds = data.draw(st.integers(0, p.FD_LIMITS.get(cls.TYPE, 0)))
    fds = open_fds(nfds)
    try:
        packet = p.encode(message, request_id, nfds)
        frame = p.decode(packet, fds)
        assert frame.message == message
        assert type(frame.message) is cls
        assert frame.request_id == request_id
        assert frame.fds == tuple(fds)
        assert header_of(packet) == (
            p.MAGIC,
            p.PROTOCOL_VERSION,
            cls.TYPE,
            0,
            nfds,
            request_id,
            len(packet) - p.HEADER_SIZE,
        )
    finally:
        p.close_fds(fds)


@settings(max_examples=300, deadline=None)
@given(packet=encoded(), allowed=st.frozensets(st.sampled_from(list(p.MsgType))))
def test_allowed_decides_acceptance(
    packet: tuple[p.Message, int, int, bytes], allowed: frozenset[p.MsgType]
) -> None:
    """A valid packet decodes exactly when its type is in ``allowed``."""
    message, request_id, nfds, data = packet
    fds = open_fds(nfds)
    if message.TYPE in allowed:
        frame = p.decode(data, fds, allowed=allowed)
        frame.close_fds()
        assert frame.message == message
    else:
        error = expect_error(data, fds, allowed=allowed)
        assert error.reason == f"unexpected message {message.TYPE.name}"
        assert error.request_id == request_id


def test_moderate_nesting_round_trips() -> None:
    """Arguments nested a hundred levels deep are ordinary data."""
    value: Any = 1
    for _ in range(100):
        value = [value]
    message = p.Call("deep", {"value": value})
    assert p.decode(p.encode(message, 1)).message == message


# --- fuzzing ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(packet=st.binary(max_size=80))
def test_any_bytes_decode_or_protocol_error(packet: bytes) -> None:
    """Any byte string decodes to a Frame or raises ProtocolError, never anything else."""
    check_outcome(packet, [])


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=80))
def test_any_bytes_after_the_magic_decode_or_protocol_error(tail: bytes) -> None:
    """Bytes after a valid magic get past the first check and still only give ProtocolError."""
    check_outcome(p.MAGIC + tail, [])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated=mutated_packets())
def test_damaged_packets_decode_or_protocol_error(mutated: tuple[bytes, int]) -> None:
    """A valid packet flipped, cut, extended, mislengthed or retyped never breaks decode."""
    packet, nfds = mutated
    check_outcome(packet, open_fds(nfds))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    packet=random_headers(),
    allowed=st.none() | st.frozensets(st.sampled_from(list(p.MsgType))),
)
def test_random_headers_close_fds_on_error(
    packet: tuple[bytes, int], allowed: frozenset[p.MsgType] | None
) -> None:
    """With any header and any fd count, a ProtocolError leaves none of the passed fds open."""
    data, nfds = packet
    check_outcome(data, open_fds(nfds), allowed)


# --- each refusal, and its reason ----------------------------------------------------


def test_short_packet() -> None:
    """A packet shorter than the header is refused, saying so."""
    error = expect_error(b"IP\x01", open_fds(1))
    assert error.reason == "packet of 3 bytes is shorter than the header"
    assert error.request_id == 0


def test_empty_packet() -> None:
    """An empty packet is refused like any short one."""
    assert "shorter than the header" in expect_error(b"").reason


def test_bad_magic() -> None:
    """A packet that does not start with b"IP" is refused before anything else is trusted."""
    packet = b"XY" + p.encode(p.Ping(), 9)[2:]
    error = expect_error(packet, open_fds(2))
    assert error.reason == "bad magic b'XY'"
    assert error.request_id == 0  # nothing after the magic is trusted


def test_unsupported_version() -> None:
    """Another protocol version is refused, naming it, with the request id kept for the reply."""
    packet = bytearray(p.encode(p.Ping(), 9))
    packet[2] = 2
    error = expect_error(bytes(packet), open_fds(1))
    assert error.reason == "unsupported protocol version 2"
    assert error.request_id == 9


def test_unknown_type() -> None:
    """A type number with no message is refused, naming the number."""
    error = expect_error(packet_for(99, b"\x80"))
    assert error.reason == "unknown message type 99"
    assert error.request_id == 7


def test_unknown_flags() -> None:
    """Reserved flags must be zero."""
    packet = bytearray(p.encode(p.Ping(), 9))
    struct.pack_into("<H", packet, 4, 0x10)
    error = expect_error(bytes(packet))
    assert error.reason == "unknown flags 0x10"


@pytest.mark.parametrize(("announced", "extra"), [(5, b""), (0, b""), (1, b"\x80\x80")])
def test_length_mismatch(announced: int, extra: bytes) -> None:
    """The header's length must be the number of payload bytes that arrived."""
    packet = p.HEADER.pack(p.MAGIC, 1, p.MsgType.PING, 0, 0, 3, announced) + b"\x80" + extra
    error = expect_error(packet, open_fds(1))
    assert error.reason == (
        f"payload length {announced} does not match the {1 + len(extra)} bytes received"
    )


def test_payload_over_max_payload() -> None:
    """A payload over the receiver's limit is refused, naming both sizes."""
    packet = p.encode(p.Result(b"x" * 100), 4)
    size = len(packet) - p.HEADER_SIZE
    error = expect_error(packet, max_payload=size - 1)
    assert error.reason == f"payload of {size} bytes exceeds {size - 1}"
    assert p.decode(packet, max_payload=size).message == p.Result(b"x" * 100)


def test_largest_payload_is_accepted() -> None:
    """A payload of exactly MAX_PAYLOAD bytes is encoded and decoded; one more byte is refused."""
    # fixmap(1) + fixstr "value" + bin32 header: 12 bytes around the value
    fits = p.Result(b"x" * (p.MAX_PAYLOAD - 12))
    packet = p.encode(fits)
    assert len(packet) == p.MAX_PACKET
    assert p.decode(packet).message == fits
    with pytest.raises(ValueError, match=f"RESULT payload of {p.MAX_PAYLOAD + 1} bytes exceeds"):
        p.encode(p.Result(b"x" * (p.MAX_PAYLOAD - 11)))


def test_fd_count_mismatch() -> None:
    """The header's fd count must be the number of fds that arrived."""
    packet = p.encode(p.Call("f", fd_args=("a", "b")), 5, 2)
    error = expect_error(packet, open_fds(1))
    assert error.reason == "header announces 2 file descriptors but 1 arrived"
    error = expect_error(p.encode(p.Call("f"), 5, 0), open_fds(3))
    assert error.reason == "header announces 0 file descriptors but 3 arrived"


def test_fds_with_a_type_that_carries_none() -> None:
    """A STATUS that comes with a descriptor is refused and the descriptor closed."""
    packet = packet_for(p.MsgType.STATUS, b"\x80", nfds=1)
    error = expect_error(packet, open_fds(1))
    assert error.reason == "STATUS cannot carry 1 file descriptor"


def test_more_fds_than_a_type_allows() -> None:
    """PROXY_GRANTED carries one channel; two fds are refused and both closed."""
    granted = p.ProxyGranted(1, "awb", "1.0", 42, (), "valid", 3)
    payload = msgspec.msgpack.encode(granted)
    error = expect_error(packet_for(p.MsgType.PROXY_GRANTED, payload, nfds=2), open_fds(2))
    assert error.reason == "PROXY_GRANTED cannot carry 2 file descriptors"


def test_spawn_carries_control_output_and_cgroup() -> None:
    """SPAWN brings the control socket, the output pipe and the cgroup; a fourth is refused."""
    spawn = p.Spawn({"LANG": "C"}, cgroup=True)
    frame = p.decode(p.encode(spawn, 4, 3), open_fds(3), allowed=p.TO_FORKSERVER)
    assert frame.message == spawn
    frame.close_fds()
    error = expect_error(packet_for(p.MsgType.SPAWN, msgspec.msgpack.encode(spawn), nfds=4),
                         open_fds(4))  # fmt: skip
    assert error.reason == "SPAWN cannot carry 4 file descriptors"


def test_type_not_allowed() -> None:
    """A worker's control socket refuses a CALL, which belongs on a channel."""
    fds = open_fds(1)
    error = expect_error(p.encode(p.Call("f"), 3, 1), fds, allowed=p.TO_WORKER_CONTROL)
    assert error.reason == "unexpected message CALL"
    assert error.request_id == 3


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        ({"versions": "1"}, "Expected `array`, got `str` - at `$.versions`"),
        ({"client": "x"}, "Object missing required field `versions`"),
        ({"versions": [1.5]}, "Expected `int`, got `float` - at `$.versions[0]`"),
        ([[1], "x"], "Expected `object`, got `array`"),
        (None, "Expected `object`, got `None`"),
    ],
)
def test_payload_of_the_wrong_shape(payload: object, phrase: str) -> None:
    """Valid msgpack that is not a HELLO is refused, and the reason says which field is wrong."""
    error = expect_error(packet_for(p.MsgType.HELLO, msgspec.msgpack.encode(payload)))
    assert error.reason.startswith("bad HELLO payload: ")
    assert phrase in error.reason
    assert error.request_id == 7


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        (b"", "Input data was truncated"),
        (b"\x81\xa6method", "Input data was truncated"),
        (b"\x81\xa6method\xa1f\x80", "trailing characters"),
        (b"\xc1", "MessagePack data is malformed"),
    ],
)
def test_payload_that_is_not_msgpack(payload: bytes, phrase: str) -> None:
    """Bytes that are not one msgpack value are refused with msgspec's reason."""
    fds = open_fds(1)
    packet = packet_for(p.MsgType.CALL, payload, nfds=1)
    error = expect_error(packet, fds)
    assert error.reason.startswith("bad CALL payload: ")
    assert phrase in error.reason


def test_encode_refuses_fds_a_type_cannot_carry() -> None:
    """Encoding never announces fds for a type that carries none, or more than its limit."""
    with pytest.raises(ValueError, match=r"^STATUS cannot carry 1 file descriptor$"):
        p.encode(p.Status(), 1, 1)
    with pytest.raises(ValueError, match=r"^OPEN_INSTANCE cannot carry 2 file descriptors$"):
        p.encode(p.OpenInstance(1), 1, 2)
    with pytest.raises(ValueError, match=rf"^CALL cannot carry {p.MAX_FDS + 1} file descriptors$"):
        p.encode(p.Call("f"), 1, p.MAX_FDS + 1)
    with pytest.raises(ValueError, match=r"^CALL cannot carry -1 file descriptors$"):
        p.encode(p.Call("f"), 1, -1)


def test_encode_refuses_an_oversized_payload() -> None:
    """Encoding refuses a message whose payload is over MAX_PAYLOAD, naming its size."""
    with pytest.raises(ValueError, match=r"^CALL payload of \d+ bytes exceeds 262144$"):
        p.encode(p.Call("f", {"blob": b"x" * p.MAX_PAYLOAD}))


def test_close_fds_ignores_closed_ones() -> None:
    """Frame.close_fds closes every fd, even when one is already closed."""
    fds = open_fds(3)
    os.close(fds[1])
    p.Frame(p.Call("f"), 1, tuple(fds)).close_fds()
    assert all(is_closed(fd) for fd in fds)


# --- payloads msgspec refuses with exceptions other than DecodeError ------------------


@pytest.mark.parametrize(
    ("kind", "payload", "nfds"),
    [
        (p.MsgType.HELLO, b"\x82\xa8versions\x91\x01\xa6client\xa1\xff", 0),
        (p.MsgType.CALL, b"\x81\xa6method\xa2f\xff", 2),
        (p.MsgType.CALL, b"\x82\xa6method\xa1f\xa4args\x81\xa1x\xa1\xff", 1),
    ],
    ids=["hello-value", "call-method", "call-argument"],
)
def test_invalid_utf8_is_a_protocol_error(kind: p.MsgType, payload: bytes, nfds: int) -> None:
    """A msgpack str that is not UTF-8 is a bad payload like any other, and the fds are closed."""
    fds = open_fds(nfds)
    try:
        error = expect_error(packet_for(kind, payload, nfds=nfds), fds)
    finally:
        p.close_fds(fds)
    assert error.reason.startswith(f"bad {kind.name} payload: ")


@pytest.mark.parametrize(
    "kind", [p.MsgType.CALL, p.MsgType.RESULT, p.MsgType.ERROR], ids=lambda k: k.name
)
def test_deep_nesting_is_a_protocol_error(kind: p.MsgType) -> None:
    """Any-typed data nested 10 000 deep is refused as a bad payload, and the fds are closed."""
    deep = b"\x91" * 10_000 + b"\xc0"
    payloads = {
        p.MsgType.CALL: b"\x82\xa6method\xa1f\xa4args\x81\xa1x" + deep,
        p.MsgType.RESULT: b"\x81\xa5value" + deep,
        p.MsgType.ERROR: b"\x83\xa4code\xa1x\xa7message\xa1y\xa7details\x81\xa1x" + deep,
    }
    nfds = p.FD_LIMITS.get(kind, 0)
    fds = open_fds(nfds)
    try:
        error = expect_error(packet_for(kind, payloads[kind], nfds=nfds), fds)
    finally:
        p.close_fds(fds)
    assert error.reason.startswith(f"bad {kind.name} payload: ")


# --- compatibility within a major version: unknown fields --------------------------

#: The fork server's messages stay strict: daemon and fork server come from one install, and a
#: sandbox field silently ignored would weaken a worker's confinement (docs/protocol.md).
STRICT = frozenset({p.MsgType.SPAWN, p.MsgType.SPAWNED, p.MsgType.PRELOAD})
#: Extra fields a newer peer might send: every kind of value, under names no message has.
EXTRAS = st.dictionaries(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).map(lambda k: f"zz_{k}"),
    VALUES,
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize(
    "cls",
    [cls for kind, cls in p.MESSAGE_CLASSES.items() if kind not in STRICT],
    ids=lambda cls: cls.TYPE.name,
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_unknown_fields_are_ignored(cls: type[p.Message], data: st.DataObject) -> None:
    """A message from a newer peer, with fields this side does not know, decodes as without them."""
    message = data.draw(message_strategy(cls))
    payload = msgspec.msgpack.decode(msgspec.msgpack.encode(message))
    assert isinstance(payload, dict)
    payload.update(data.draw(EXTRAS))
    nfds = p.FD_LIMITS.get(cls.TYPE, 0)
    fds = open_fds(nfds)
    try:
        frame = p.decode(packet_for(cls.TYPE, msgspec.msgpack.encode(payload), nfds=nfds), fds)
    finally:
        p.close_fds(fds)
    assert frame.message == message


def test_unknown_fields_of_nested_structs_are_ignored() -> None:
    """A newer worker's method entries may carry fields this daemon does not know."""
    method = {"name": "init", "setup": True, "undoes": None, "signature": {"params": []}}
    ready = {"module": "m", "version": "1", "methods": [method], "pid": 9, "minor": 99}
    frame = p.decode(packet_for(p.MsgType.READY, msgspec.msgpack.encode(ready)))
    assert isinstance(frame.message, p.Ready)
    assert frame.message.methods == (p.MethodSpec("init", setup=True),)


def test_unknown_field_that_is_not_utf8_is_ignored() -> None:
    """A field name that is not even UTF-8 is still only an unknown field: skipped, never stored."""
    frame = p.decode(packet_for(p.MsgType.STATUS, b"\x81\xa1\xff\x01"))
    assert frame.message == p.Status()


def test_deep_nesting_in_an_unknown_field_is_a_protocol_error() -> None:
    """An unknown field's value is skipped but still parsed: absurd nesting there is refused too."""
    payload = b"\x82\xa5value\xc0\xa5extra" + b"\x91" * 10_000 + b"\xc0"
    error = expect_error(packet_for(p.MsgType.RESULT, payload))
    assert error.reason.startswith("bad RESULT payload: ")


@pytest.mark.parametrize(
    ("cls", "payload"),
    [
        (p.Spawn, {"env": {}, "extra": True}),
        (p.Spawn, {"env": {}, "sandbox": {"module": "m", "seccomp_profile": "strict"}}),
        (p.Spawned, {"pid": 3, "extra": 1}),
        (p.Preload, {"modules": [], "extra": 1}),
    ],
    ids=["spawn", "sandbox-spec", "spawned", "preload"],
)
def test_fork_server_messages_refuse_unknown_fields(
    cls: type[p.Message], payload: dict[str, Any]
) -> None:
    """The fork server's messages stay strict: an unknown sandbox setting is never dropped."""
    nfds = 2 if cls is p.Spawn else 0
    fds = open_fds(nfds)
    error = expect_error(packet_for(cls.TYPE, msgspec.msgpack.encode(payload), nfds=nfds), fds)
    assert "unknown field" in error.reason


@pytest.mark.parametrize(
    ("theirs", "agreed"),
    [
        (0, 0),
        (p.PROTOCOL_MINOR, p.PROTOCOL_MINOR),
        (99, p.PROTOCOL_MINOR),
        (-5, 0),
        (2**63 - 1, p.PROTOCOL_MINOR),
    ],
)
def test_the_agreed_minor_is_the_lower_of_both(theirs: int, agreed: int) -> None:
    """Two peers speak the lower of their minors; a hostile peer's negative one counts as 0."""
    assert p.agreed_minor(theirs) == agreed


def test_a_worker_cannot_claim_a_minor_the_daemon_does_not_speak() -> None:
    """The daemon stores a READY's minor only as agreed: a worker's nonsense is clamped."""
    from ipad.daemon.bounds import bound_worker_message  # noqa: PLC0415 - the daemon's side

    for claimed, stored in ((2**63 - 1, p.PROTOCOL_MINOR), (-1, 0)):
        ready = bound_worker_message(p.Ready("m", "1", (), 9, minor=claimed))
        assert isinstance(ready, p.Ready)
        assert ready.minor == stored
