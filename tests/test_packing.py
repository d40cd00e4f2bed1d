"""The CLI's pure-Python msgpack (shim/wire/packing.py) against the msgpack package itself:
the same bytes out for every value berth sends, the same value (or a refusal) for any bytes
in, and the bounds a hostile peer could probe."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.shim.wire import packing
from berth.shim.wire.protocol import (
    LEAN,
    LEAN_DECODE_LIMIT,
    MSGPACK,
    Connection,
    Hello,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    Welcome,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SCALARS = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False) | st.text() | st.binary()
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.text() | st.binary(), children, max_size=20)
    ),
    max_leaves=30,
)


def reference_pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def reference_unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)


def contains_ext(value: Any) -> bool:
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        return True
    if isinstance(value, list):
        return any(contains_ext(v) for v in value)
    if isinstance(value, dict):
        return any(contains_ext(k) or contains_ext(v) for k, v in value.items())
    return False


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_pack_is_byte_for_byte_msgpack(value: Any) -> None:
    assert packing.pack(value) == reference_pack(value)


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_unpack_reads_what_msgpack_writes(value: Any) -> None:
    data = reference_pack(value)
    assert packing.unpack(data) == reference_unpack(data) == value


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=True, width=32), st.floats(allow_nan=True))
def test_floats_of_both_widths_including_nan(single: float, double: float) -> None:
    for data in (msgpack.packb(single, use_single_float=True), reference_pack(double)):
        ours, theirs = packing.unpack(data), reference_unpack(data)
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == theirs
        assert type(ours) is float


def agree(data: bytes) -> None:
    """Both decoders accept `data` with equal values, or both refuse it; ext types, which
    msgpack reads and berth's wire never carries, are refused by ours."""
    try:
        theirs = reference_unpack(data)
    except Exception:
        with pytest.raises((packing.UnpackError, UnicodeDecodeError)):
            packing.unpack(data)
        return
    if contains_ext(theirs):
        with pytest.raises(packing.UnpackError):
            packing.unpack(data)
        return
    ours = packing.unpack(data)
    # Compare encodings: NaN != NaN, but its bytes are equal.
    assert reference_pack(ours) == reference_pack(theirs)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_any_bytes_decode_as_msgpack_decodes_them(data: bytes) -> None:
    agree(data)


@settings(max_examples=800, deadline=None)
@given(VALUES, st.data())
def test_damaged_documents_decode_as_msgpack_decodes_them(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(reference_pack(value))
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if action == "flip" and encoded:
            at = data.draw(st.integers(0, len(encoded) - 1))
            encoded[at] = data.draw(st.integers(0, 255))
        elif action == "cut" and encoded:
            del encoded[data.draw(st.integers(0, len(encoded) - 1)) :]
        else:
            encoded += data.draw(st.binary(min_size=1, max_size=4))
    agree(bytes(encoded))


@pytest.mark.parametrize(
    "value",
    [
        0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
        -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
        "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536, "é" * 20,
        b"", b"x" * 255, b"x" * 256, b"x" * 65536,
        list(range(15)), list(range(16)), list(range(65536)),
        {str(i): i for i in range(15)}, {str(i): i for i in range(16)},
        {str(i): i for i in range(65536)},
        (1, 2), bytearray(b"ab"), memoryview(b"cd"),
    ],
)  # fmt: skip
def test_every_width_boundary(value: Any) -> None:
    assert packing.pack(value) == reference_pack(value)
    agree(reference_pack(value))


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_integers_beyond_64_bits_are_refused_like_msgpack(value: int) -> None:
    with pytest.raises(OverflowError):
        reference_pack(value)
    with pytest.raises(OverflowError):
        packing.pack(value)


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j, [None, {"k": object()}]])
def test_values_msgpack_cannot_carry_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        packing.pack(value)


@pytest.mark.parametrize("depth", [1023, 1024, 1025, 1026])
@pytest.mark.parametrize("innermost", [1, [], {}])
def test_deep_values_pack_or_are_refused_where_msgpack_does(depth: int, innermost: Any) -> None:
    """The CLI must be able to send what msgpack can: berthd, not the client, refuses a
    request nested too deep, with an error that says so (tests/test_hostile.py)."""
    for wrap in (lambda v: [v], lambda v: {"k": v}):
        value = innermost
        for _ in range(depth):
            value = wrap(value)
        try:
            expected: bytes | None = reference_pack(value)
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(ValueError, match="recursion limit"):
                packing.pack(value)
        else:
            assert packing.pack(value) == expected


def test_a_lone_surrogate_is_refused_like_msgpack() -> None:
    with pytest.raises(UnicodeEncodeError):
        packing.pack("\ud800")


def test_a_claimed_length_allocates_nothing() -> None:
    """An array32 claiming 2^32-1 items in a few bytes fails at the end of the input."""
    for data in (b"\xdd\xff\xff\xff\xff\x01", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xffab"):
        with pytest.raises(packing.UnpackError, match="incomplete"):
            packing.unpack(data)


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(packing.UnpackError, match="nested too deeply"):
        packing.unpack(deep)
    shallow = b"\x91" * (packing.MAX_DEPTH - 1) + b"\xc0"
    depth, value = 0, packing.unpack(shallow)
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert depth == packing.MAX_DEPTH - 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x81\x01\x02", "map key"),  # int key
        (b"\x81\x90\x02", "map key"),  # array key
        (b"\x81\x80\x02", "map key"),  # map key
        (b"\xc1", "invalid first byte"),
        (b"\xd4\x01\x02", "ext types"),
        (b"\xd6\xff\x00\x00\x00\x00", "ext types"),  # a msgpack Timestamp
        (b"\xc0\xc0", "extra data"),
        (b"", "incomplete"),
    ],
)
def test_refusals_name_the_fault(data: bytes, message: str) -> None:
    with pytest.raises(packing.UnpackError, match=message):
        packing.unpack(data)


def test_a_pure_client_and_a_msgpack_server_speak() -> None:
    """The CLI's end (LEAN) against berthd's (MSGPACK), through the protocol's own rules."""
    client = Connection(Role.CLIENT, peer_name="cli", codec=LEAN)
    server = Connection(Role.SERVER, peer_name="berthd", codec=MSGPACK)
    server.receive_data(client.send(Hello()))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    client.receive_data(server.send(server.server_handshake(hello)))
    assert isinstance(client.next_event(), Welcome)
    params = {"id": "c1", "labels": {"a": "é" * 40}, "n": 2**63 - 1, "blob": b"\x00" * 300}
    rid = client.next_request_id()
    server.receive_data(client.send(Request(rid, "containers.create", params, {"ns": "x"})))
    request = server.next_event()
    assert isinstance(request, Request) and request.params == params
    client.receive_data(server.send(Response(rid, {"created": [1.5, None, True]})))
    response = client.next_event()
    assert isinstance(response, Response) and response.result == {"created": [1.5, None, True]}
    # A reply past LEAN_DECODE_LIMIT (a long listing) is read with the C package: same value.
    listing = {"containers": [{"id": f"c{i}", "labels": {"k": "v" * 50}} for i in range(500)]}
    assert len(reference_pack(listing)) > LEAN_DECODE_LIMIT
    rid = client.next_request_id()
    server.receive_data(client.send(Request(rid, "containers.list", {}, {})))
    assert isinstance(server.next_event(), Request)
    client.receive_data(server.send(Response(rid, listing)))
    response = client.next_event()
    assert isinstance(response, Response) and response.result == listing


def test_a_pure_connection_answers_a_bad_frame_and_carries_on() -> None:
    client = Connection(Role.CLIENT, peer_name="cli", codec=LEAN)
    server = Connection(Role.SERVER, peer_name="berthd")
    server.receive_data(client.send(Hello()))
    client.receive_data(server.send(server.server_handshake(server.next_event())))  # type: ignore[arg-type]
    client.next_event()
    client.receive_data(b"\x00\x00\x00\x02\xd6\xff")  # an ext type: not berth's wire
    with pytest.raises(RemoteProtocolError, match="not valid msgpack: UnpackError") as caught:
        client.next_event()
    assert not caught.value.fatal
