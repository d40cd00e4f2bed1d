"""berth-grpc's sans-IO HTTP/2 (daemon/grpc/http2.py) against h2, python-hyper's strict
HTTP/2 implementation, as the client: what one side writes the other must take, and
what breaks the protocol must end as RFC 9113 says. No socket: bytes pass by hand."""

from __future__ import annotations

import itertools
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.grpc import http2
from berth.daemon.grpc.http2 import ErrorCode, ServerConnection

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/berth.test.Service/Call"),
    (":authority", "berth"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
RESPONSE = ((":status", "200"), ("content-type", "application/grpc"))


def _client(local: dict[Any, int] | None = None) -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    if local:
        client.update_settings(local)
    return client


def _texts(headers: Any) -> dict[str, str]:
    """h2's headers, decoded (header_encoding): typed as bytes by its stubs."""
    return dict(headers)


def _server(**options: Any) -> ServerConnection:
    server = ServerConnection(**options)
    server.initiate_connection()
    return server


def _pump(
    client: h2.connection.H2Connection, server: ServerConnection
) -> tuple[list[Any], list[Any]]:
    """Pass bytes both ways until neither side has any: (server's events, client's)."""
    server_events: list[Any] = []
    client_events: list[Any] = []
    for _ in range(20):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return server_events, client_events
        if to_server:
            server_events += server.receive_data(to_server)
        if to_client:
            client_events += client.receive_data(to_client)
    raise AssertionError("the two sides never went quiet")


def _frames(received: bytes) -> list[Frame]:
    frames, offset = [], 0
    while offset + 9 <= len(received):
        frame, length = Frame.parse_frame_header(memoryview(received[offset : offset + 9]))
        frame.parse_body(memoryview(received[offset + 9 : offset + 9 + length]))
        frames.append(frame)
        offset += 9 + length
    assert offset == len(received)
    return frames


def _goaway(server: ServerConnection) -> int:
    codes = [f.error_code for f in _frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert len(codes) == 1, codes
    return codes[0]


def _greeted() -> tuple[h2.connection.H2Connection, ServerConnection]:
    client, server = _client(), _server()
    _pump(client, server)
    return client, server


def _raw_greeted(**options: Any) -> tuple[ServerConnection, Encoder]:
    """A server past the handshake, for a client that writes frames by hand."""
    server = _server(**options)
    server.receive_data(http2.PREFACE + SettingsFrame(0).serialize())
    server.data_to_send()
    return server, Encoder()


def _headers_frame(encoder: Encoder, stream_id: int, flags: tuple[str, ...]) -> bytes:
    frame = HeadersFrame(stream_id, flags=list(flags))
    frame.data = encoder.encode(REQUEST)
    return bytes(frame.serialize())


def test_a_call_passes_both_ways_with_a_strict_peer() -> None:
    client, server = _greeted()
    client.send_headers(1, [*REQUEST, ("x-meta", "v")])
    client.send_data(1, b"\x00\x00\x00\x00\x03abc", end_stream=True)
    events, _ = _pump(client, server)
    kinds = [type(e) for e in events]
    assert kinds == [http2.RequestReceived, http2.DataReceived, http2.StreamEnded]
    assert (b":path", b"/berth.test.Service/Call") in events[0].headers
    assert (b"x-meta", b"v") in events[0].headers
    assert events[1].data == b"\x00\x00\x00\x00\x03abc"
    assert events[1].flow_controlled_length == 8
    server.send_headers(1, RESPONSE)
    server.send_data(1, b"\x00\x00\x00\x00\x02ok")
    server.send_headers(1, (("grpc-status", "0"), ("grpc-message", "fine")), end_stream=True)
    _, answers = _pump(client, server)
    response = next(e for e in answers if isinstance(e, h2.events.ResponseReceived))
    assert _texts(response.headers) == {":status": "200", "content-type": "application/grpc"}
    data = next(e for e in answers if isinstance(e, h2.events.DataReceived))
    assert data.data == b"\x00\x00\x00\x00\x02ok"
    trailers = next(e for e in answers if isinstance(e, h2.events.TrailersReceived))
    assert _texts(trailers.headers) == {"grpc-status": "0", "grpc-message": "fine"}
    assert any(isinstance(e, h2.events.StreamEnded) for e in answers)
    assert server.streams == {}  # ended both ways: forgotten


def test_headers_take_a_peer_without_a_dynamic_table_and_split_at_its_frame_size() -> None:
    """The encoder never indexes (its first block sets the table to 0), so a client that
    allows no dynamic table decodes it; a block past the client's frame size goes out as
    HEADERS and CONTINUATION."""
    client = _client({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    server = _server()
    _pump(client, server)
    client.send_headers(1, REQUEST, end_stream=True)
    _pump(client, server)
    long_value = "x" * 40000
    server.send_headers(1, (*RESPONSE, ("grpc-status", "2"), ("grpc-message", long_value)), True)
    raw = server.data_to_send()
    assert [type(f).__name__ for f in _frames(raw)] == ["HeadersFrame"] + ["ContinuationFrame"] * 2
    answers = client.receive_data(raw)
    response = next(e for e in answers if isinstance(e, h2.events.ResponseReceived))
    assert _texts(response.headers)["grpc-message"] == long_value


def test_send_windows_follow_the_peers_settings_and_updates() -> None:
    client = _client({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    server = _server()
    _pump(client, server)
    client.send_headers(1, REQUEST, end_stream=True)
    _pump(client, server)
    assert server.local_flow_control_window(1) == 10
    server.send_headers(1, RESPONSE)
    server.send_data(1, b"x" * 10)
    assert server.local_flow_control_window(1) == 0
    with pytest.raises(http2.LocalProtocolError):
        server.send_data(1, b"y")  # past the window: refused here, never sent
    _pump(client, server)
    client.increment_flow_control_window(5, stream_id=1)
    events, _ = _pump(client, server)
    assert any(isinstance(e, http2.WindowUpdated) and e.stream_id == 1 for e in events)
    assert server.local_flow_control_window(1) == 5
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 20})
    _pump(client, server)
    assert server.local_flow_control_window(1) == 15  # the delta applies to open streams


def test_received_data_is_given_back_once_per_half_window() -> None:
    server, encoder = _raw_greeted()
    window = server.initial_window_size
    server.receive_data(_headers_frame(encoder, 1, ("END_HEADERS",)))
    chunk = DataFrame(1)
    chunk.data = b"d" * 16384
    sent = given_back = 0
    updates: list[int] = []
    while sent < 3 * window:
        events: list[Any] = server.receive_data(chunk.serialize())
        sent += 16384
        for event in events:
            server.acknowledge_received_data(event.flow_controlled_length, 1)
            given_back += event.flow_controlled_length
        updates += [
            f.window_increment
            for f in _frames(server.data_to_send())
            if isinstance(f, WindowUpdateFrame) and f.stream_id == 1
        ]
    assert 4 <= len(updates) <= 7, updates  # never one per frame
    assert all(u >= window // 2 for u in updates)
    # the window never ran out: everything taken was given back in time
    assert sent - sum(updates) <= window


def test_a_stream_past_its_window_is_reset_and_the_connection_goes_on() -> None:
    server, encoder = _raw_greeted(connection_window=1 << 24)
    server.receive_data(_headers_frame(encoder, 1, ("END_HEADERS",)))
    chunk = DataFrame(1)
    chunk.data = b"d" * 16384
    events: list[Any] = []
    for _ in range(server.initial_window_size // 16384 + 1):
        events += server.receive_data(chunk.serialize())
    resets = [e for e in events if isinstance(e, http2.StreamReset)]
    assert [(r.stream_id, r.error_code, r.remote) for r in resets] == [
        (1, ErrorCode.FLOW_CONTROL_ERROR, False)
    ]
    assert any(isinstance(f, RstStreamFrame) for f in _frames(server.data_to_send()))
    events = server.receive_data(_headers_frame(encoder, 3, ("END_HEADERS", "END_STREAM")))
    assert isinstance(events[0], http2.RequestReceived)


def test_the_connection_window_is_enforced() -> None:
    server = _server(connection_window=65535, initial_window_size=1 << 20)
    server.receive_data(http2.PREFACE + SettingsFrame(0).serialize())
    encoder = Encoder()
    server.receive_data(_headers_frame(encoder, 1, ("END_HEADERS",)))
    chunk = DataFrame(1)
    chunk.data = b"d" * 16384
    server.data_to_send()
    with pytest.raises(http2.RemoteProtocolError) as raised:
        for _ in range(5):
            server.receive_data(chunk.serialize())
    assert raised.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert _goaway(server) == ErrorCode.FLOW_CONTROL_ERROR
    assert server.receive_data(chunk.serialize()) == []  # nothing more is read


def test_streams_past_the_limit_are_refused_not_the_connection() -> None:
    server = _server(max_concurrent_streams=2)
    server.receive_data(http2.PREFACE + SettingsFrame(0).serialize())
    server.data_to_send()
    encoder = Encoder()
    events: list[Any] = []
    for stream_id in (1, 3, 5):
        events += server.receive_data(_headers_frame(encoder, stream_id, ("END_HEADERS",)))
    assert [e.stream_id for e in events] == [1, 3]
    refused = [f for f in _frames(server.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in refused] == [(5, ErrorCode.REFUSED_STREAM)]
    server.reset_stream(1, ErrorCode.CANCEL)
    events = list(server.receive_data(_headers_frame(encoder, 7, ("END_HEADERS",))))
    assert [e.stream_id for e in events] == [7]  # the HPACK state stayed in step


def test_a_header_block_of_endless_continuations_ends_the_connection() -> None:
    server, encoder = _raw_greeted()
    frame = HeadersFrame(1)
    frame.data = encoder.encode(REQUEST)
    wire = frame.serialize()
    with pytest.raises(http2.RemoteProtocolError) as raised:
        for _ in range(http2.MAX_CONTINUATIONS + 2):
            continuation = ContinuationFrame(1)
            continuation.data = b"\x00"
            server.receive_data(wire + continuation.serialize())
            wire = b""
    assert raised.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert _goaway(server) == ErrorCode.ENHANCE_YOUR_CALM


def test_a_header_block_in_continuations_is_one_request() -> None:
    server, encoder = _raw_greeted()
    block = encoder.encode(REQUEST)
    frame = HeadersFrame(1, flags=["END_STREAM"])
    frame.data = block[:5]
    continuation = ContinuationFrame(1, flags=["END_HEADERS"])
    continuation.data = block[5:]
    events = server.receive_data(frame.serialize() + continuation.serialize())
    assert [type(e) for e in events] == [http2.RequestReceived, http2.StreamEnded]
    interrupted = HeadersFrame(3)
    interrupted.data = encoder.encode(REQUEST)
    with pytest.raises(http2.RemoteProtocolError):
        server.receive_data(interrupted.serialize() + PingFrame(0).serialize())


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ErrorCode.PROTOCOL_ERROR),
        (http2.PREFACE + PingFrame(0).serialize(), ErrorCode.PROTOCOL_ERROR),
        (http2.PREFACE + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5, 6),
        (
            http2.PREFACE + SettingsFrame(0, settings={5: 100}).serialize(),
            ErrorCode.PROTOCOL_ERROR,
        ),
        (
            http2.PREFACE + SettingsFrame(0, settings={4: 2**31}).serialize(),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
        (
            http2.PREFACE + SettingsFrame(0).serialize() + DataFrame(1, data=b"x").serialize(),
            ErrorCode.PROTOCOL_ERROR,  # DATA on an idle stream
        ),
        (
            http2.PREFACE + SettingsFrame(0).serialize() + WindowUpdateFrame(0).serialize(),
            ErrorCode.PROTOCOL_ERROR,  # an increment of 0
        ),
        (
            http2.PREFACE + SettingsFrame(0).serialize() + HeadersFrame(2).serialize(),
            ErrorCode.PROTOCOL_ERROR,  # a server's stream id
        ),
        (
            http2.PREFACE
            + SettingsFrame(0).serialize()
            + HeadersFrame(1, data=b"\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize(),
            ErrorCode.COMPRESSION_ERROR,
        ),
    ],
)
def test_protocol_errors_end_the_connection_with_their_code(wire: bytes, code: int) -> None:
    server = _server()
    server.data_to_send()
    with pytest.raises(http2.RemoteProtocolError) as raised:
        server.receive_data(wire)
    assert raised.value.code == code
    assert _goaway(server) == code


def test_pings_are_answered_and_a_goaway_ends_reading() -> None:
    server, _ = _raw_greeted()
    server.receive_data(PingFrame(0, opaque_data=b"12345678").serialize())
    (pong,) = _frames(server.data_to_send())
    assert isinstance(pong, PingFrame) and "ACK" in pong.flags and pong.opaque_data == b"12345678"
    events = server.receive_data(GoAwayFrame(0).serialize() + PingFrame(0).serialize())
    assert [type(e) for e in events] == [http2.ConnectionTerminated]
    assert server.data_to_send() == b""  # the PING after it was not read


def test_a_graceful_goaway_keeps_the_streams_begun() -> None:
    client, server = _greeted()
    client.send_headers(1, REQUEST, end_stream=True)
    _pump(client, server)
    server.goaway()
    server.send_headers(1, (*RESPONSE, ("grpc-status", "0")), end_stream=True)
    goaway, answer = _frames(server.data_to_send())
    assert isinstance(goaway, GoAwayFrame)
    assert (goaway.last_stream_id, goaway.error_code) == (1, ErrorCode.NO_ERROR)
    assert isinstance(answer, HeadersFrame) and answer.stream_id == 1
    assert "END_STREAM" in answer.flags


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20))
def test_events_are_the_same_however_the_bytes_are_cut(cuts: list[int]) -> None:
    client = _client()
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, [*REQUEST, ("x-n", str(stream_id))])
        client.send_data(stream_id, b"m" * 700 * stream_id, end_stream=True)
    client.ping(b"pingping")
    wire = client.data_to_send()

    def summary(pieces: list[bytes]) -> list[tuple[Any, ...]]:
        server = _server()
        out: list[tuple[Any, ...]] = []
        for piece in pieces:
            for event in server.receive_data(piece):
                out.append((type(event).__name__, getattr(event, "stream_id", None)))
                if isinstance(event, http2.DataReceived):
                    out.append((len(event.data),))
        return out

    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    assert summary([wire[a:b] for a, b in itertools.pairwise(points)]) == summary([wire])


_FRAME = st.tuples(
    st.integers(min_value=0, max_value=12),  # the types, and a few unknown
    st.integers(min_value=0, max_value=255),
    st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),
    st.binary(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(junk=st.binary(max_size=64), frames=st.lists(_FRAME, max_size=10))
def test_arbitrary_frames_after_the_handshake_end_cleanly(
    junk: bytes, frames: list[tuple[int, int, int, bytes]]
) -> None:
    """Whatever follows a valid handshake, the connection yields events or ends with a
    RemoteProtocolError and its GOAWAY; it never raises anything else, and never holds
    more than a frame of input."""
    server = _server()
    server.receive_data(http2.PREFACE + SettingsFrame(0).serialize())
    encoder = Encoder()
    wire = _headers_frame(encoder, 1, ("END_HEADERS",)) + b"".join(
        http2.FRAME_HEADER.pack(len(p) >> 8, len(p) & 0xFF, kind, flags, stream) + p
        for kind, flags, stream, p in frames
    )
    wire += junk
    try:
        for piece in (wire[: len(wire) // 2], wire[len(wire) // 2 :]):
            server.receive_data(piece)
    except http2.RemoteProtocolError:
        assert server.closed
        assert any(isinstance(f, GoAwayFrame) for f in _frames(server.data_to_send()))
    assert len(server._buffer) < 9 + server.max_inbound_frame_size


def test_table_size_updates_past_two_and_blocks_past_the_list_limit_are_refused() -> None:
    """hpack decodes any number of table size updates, each in a Python loop: a block of
    them held the loop ~0.1 s per 64 KiB, repeatable on a stream already gone. RFC 7541
    allows two; a block longer than the header list limit allows is refused unread."""
    server, encoder = _raw_greeted()
    two = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    two.data = b"\x3f\xe1\x1f\x20" + encoder.encode(REQUEST)  # 4096, then 0
    assert isinstance(server.receive_data(two.serialize())[0], http2.RequestReceived)
    three = HeadersFrame(3, flags=["END_HEADERS"])
    three.data = b"\x20\x20\x20" + encoder.encode(REQUEST)
    with pytest.raises(http2.RemoteProtocolError) as raised:
        server.receive_data(three.serialize())
    assert raised.value.code == ErrorCode.COMPRESSION_ERROR
    server = _server(max_header_list_size=1000)
    server.receive_data(http2.PREFACE + SettingsFrame(0).serialize())
    long_block = HeadersFrame(1, flags=["END_HEADERS"])
    long_block.data = b"\x20" + b"\x80" * (1000 + http2.HEADER_BLOCK_SLACK)
    with pytest.raises(http2.RemoteProtocolError) as raised:
        server.receive_data(long_block.serialize())
    assert raised.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_stream_state_edges() -> None:
    server, encoder = _raw_greeted()
    server.receive_data(_headers_frame(encoder, 1, ("END_HEADERS", "END_STREAM")))
    events = server.receive_data(_headers_frame(encoder, 1, ("END_HEADERS", "END_STREAM")))
    assert [(type(e), e.error_code) for e in events] == [  # type: ignore[union-attr]
        (http2.StreamReset, ErrorCode.STREAM_CLOSED)
    ]
    server.data_to_send()
    server.reset_stream(1)  # gone already: nothing, no error
    server.acknowledge_received_data(0, 3)
    assert server.data_to_send() == b""
    short = http2.FRAME_HEADER.pack(0, 2, http2.HEADERS, 0x24, 3) + b"\x00\x00"
    with pytest.raises(http2.RemoteProtocolError) as raised:  # PRIORITY's 5 bytes missing
        server.receive_data(short)
    assert raised.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_a_lowered_header_table_size_is_answered_with_an_update() -> None:
    client, server = _greeted()
    client.send_headers(1, REQUEST, end_stream=True)
    client.send_headers(3, REQUEST, end_stream=True)
    _pump(client, server)
    server.send_headers(1, (*RESPONSE, ("grpc-status", "0")), end_stream=True)
    client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    _pump(client, server)
    server.send_headers(3, (*RESPONSE, ("grpc-status", "0")), end_stream=True)
    (answer,) = _frames(server.data_to_send())
    assert isinstance(answer, HeadersFrame) and answer.data.startswith(b"\x20")
