"""Codec cost on the call path: msgspec vs cattrs+msgpack, next to a raw socket round trip.

One call costs an encode and a decode at each end. This measures both codecs on
the same Call message and, in the same run, a SOCK_SEQPACKET ping-pong between
two processes, so the codec's share of a call is a ratio, not an absolute time.
Run: python bench/bench_codec.py  (prints a table, writes bench/results/codec.json)
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
import msgpack
import msgspec
from _common import (
    Row,
    echo_back,
    exit_on_sigterm,
    forked_peer,
    parser,
    print_rows,
    rounds_us,
    row,
    write_results,
)

from ipad.protocol import wire as p

ROUNDS = 7
CALLS = 20_000
PINGS = 20_000


class CallStruct(msgspec.Struct, frozen=True, array_like=True):
    """The call message as a msgspec Struct (array-like: no field names on the wire)."""

    method: str
    args: dict[str, Any]
    fd_args: tuple[str, ...] = ()


@attrs.frozen
class CallAttrs:
    """The same message as an attrs class, for msgspec's attrs support and for cattrs."""

    method: str
    args: dict[str, Any]
    fd_args: tuple[str, ...] = ()


ARGS: dict[str, Any] = {"frame": 1234, "sensor": {"exposure_us": 10000, "gain": 1.5}}


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Median over ROUNDS of the time per call, in microseconds."""
    return statistics.median(rounds_us(fn, n, ROUNDS))


def codec_figures(calls: int) -> dict[str, float]:
    """Encode+decode of one call message with each codec."""
    struct_enc = msgspec.msgpack.Encoder()
    struct_dec = msgspec.msgpack.Decoder(CallStruct)
    attrs_dec = msgspec.msgpack.Decoder(CallAttrs)
    conv = cattrs.Converter()
    s_msg = CallStruct("process_stats", ARGS, ("stats",))
    a_msg = CallAttrs("process_stats", ARGS, ("stats",))

    def msgspec_struct() -> object:
        return struct_dec.decode(struct_enc.encode(s_msg))

    def msgspec_attrs() -> object:
        return attrs_dec.decode(struct_enc.encode(a_msg))

    def cattrs_msgpack() -> object:
        data = msgpack.packb(conv.unstructure(a_msg))
        return conv.structure(msgpack.unpackb(data), CallAttrs)

    wire = p.Call("process_stats", ARGS, ("stats",))

    def ipad_wire() -> object:
        return p.decode(p.encode(wire, 1), allowed=p.TO_WORKER_CHANNEL)

    return {
        "ipad encode()+decode() (header, map)": per_call_us(ipad_wire, calls),
        "msgspec Struct": per_call_us(msgspec_struct, calls),
        "msgspec + attrs": per_call_us(msgspec_attrs, calls),
        "cattrs + msgpack": per_call_us(cattrs_msgpack, calls),
    }


def socket_round_trip_us(pings: int) -> float:
    """One 64-byte SEQPACKET message there and back between two processes."""
    payload = b"x" * 64
    with forked_peer(echo_back) as sock:

        def ping() -> None:
            sock.send(payload)
            sock.recv(4096)

        return per_call_us(ping, pings)


def main(argv: list[str] | None = None) -> int:
    """Print the table and save the figures."""
    exit_on_sigterm()
    args = parser(__doc__).parse_args(argv)
    calls, pings = (200, 200) if args.quick else (CALLS, PINGS)
    codecs = codec_figures(calls)
    rtt = socket_round_trip_us(pings)
    # A call costs two encode+decode pairs (the request and its reply).
    rows: list[Row] = [
        row(f"codec: {name}", us, "us", rtt, "socket RTT") for name, us in codecs.items()
    ]
    rows.append(row("limit: raw SEQPACKET round trip", rtt, "us", rtt, "socket RTT"))
    print_rows("codec (encode+decode of one call message), us and share of a socket RTT", rows)
    data = {
        "quick": args.quick,
        "socket_round_trip_us": rtt,
        "codecs_us": codecs,
        "codec_share_of_round_trip": {name: us / rtt for name, us in codecs.items()},
    }
    write_results(args.results, "codec", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
