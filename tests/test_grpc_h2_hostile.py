"""berth-grpc's HTTP/2 server (daemon/grpc/h2server.py) against hostile clients, the kinds
of abuse real HTTP/2 servers have been hit by: Rapid Reset (CVE-2023-44487), a client
with a huge window that reads nothing while the server streams to it, clients that never
finish their preface (slowloris), more connections than descriptors. Each writes raw
frames (hyperframe, hpack) on one connection, and checks that the server's state stays
bounded and that another client, on a connection of its own, is still answered."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.grpc import h2server, http2
from berth.daemon.grpc.calls import Context, Route
from berth.daemon.grpc.h2server import Server, frame_message

Bytes = wrappers_pb2.BytesValue
Text = wrappers_pb2.StringValue
SERVICE = "berth.test.Hostile"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BIG = 1 << 20  # a server-streamed message


class Seen:
    def __init__(self) -> None:
        self.slow_started = 0  # Slow handlers begun
        self.slow_running = 0  # Slow handlers not yet ended
        self.slow_running_most = 0
        self.cleanup_seconds = 0.0  # a Slow handler's time to end once cancelled
        self.big_yielded = 0  # Big messages produced


def _routes(seen: Seen) -> dict[tuple[str, str], Route]:
    async def echo(request: Any, context: Context) -> Any:
        return Text(value=request.value)

    async def slow(request: Any, context: Context) -> Any:
        seen.slow_started += 1
        seen.slow_running += 1
        seen.slow_running_most = max(seen.slow_running_most, seen.slow_running)
        try:
            await asyncio.sleep(float(request.value))
        except asyncio.CancelledError:
            # a handler slow to end when its call is reset (one whose cleanup asks
            # berthd): what makes reset calls' handlers pile up without a bound
            await asyncio.sleep(seen.cleanup_seconds)
            raise
        finally:
            seen.slow_running -= 1
        return Text(value="slept")

    async def big(request: Any, context: Context) -> AsyncIterator[Any]:
        for _ in range(int(request.value)):
            seen.big_yielded += 1
            yield Bytes(value=b"b" * BIG)

    return {
        (SERVICE, "Echo"): Route(Text, echo),
        (SERVICE, "Slow"): Route(Text, slow),
        (SERVICE, "Big"): Route(Text, big, server_streaming=True),
    }


Body = Callable[[str, Server, Seen, Callable[[], Awaitable[None]]], Awaitable[None]]


def _serve(socket_dir: Path, body: Body, max_connections: int | None = None) -> None:
    """Run `body(path, server, seen, other)` against a server of its own; `other()` makes
    a call on another client's connection (grpcio's), which must be answered."""

    async def main() -> None:
        seen = Seen()
        server = Server(_routes(seen))
        if max_connections is not None:
            server.max_connections = max_connections
        path = str(socket_dir / "grpc.sock")
        await server.listen(path)
        try:
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                echo = channel.unary_unary(
                    f"/{SERVICE}/Echo",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=Text.FromString,
                )

                async def other() -> None:
                    reply = await echo(Text(value="other"), timeout=30.0)
                    assert reply.value == "other"

                await other()  # connected before the hostile client
                await body(path, server, seen, other)
        finally:
            await server.stop(grace=0.5)

    asyncio.run(main())


def _request_headers(encoder: Encoder, method: str) -> bytes:
    data: bytes = encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/{SERVICE}/{method}"),
            (":authority", "berth"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    return data


def _frames(*frames: Frame) -> bytes:
    return b"".join(f.serialize() for f in frames)


def _call(encoder: Encoder, stream_id: int, method: str, value: str) -> bytes:
    headers = HeadersFrame(stream_id, flags=["END_HEADERS"])
    headers.data = _request_headers(encoder, method)
    data = DataFrame(stream_id, flags=["END_STREAM"])
    data.data = frame_message(Text(value=value).SerializeToString())
    return _frames(headers, data)


async def _connect(path: str, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def _read_to_end(s: socket.socket, deadline: float) -> bytes:
    """What the server sends until it closes; fails if it has not closed by `deadline`."""
    loop = asyncio.get_running_loop()
    received = b""
    while True:
        data = await asyncio.wait_for(loop.sock_recv(s, 1 << 20), deadline)
        if not data:
            return received
        received += data


def _goaway_codes(received: bytes) -> list[int]:
    codes, offset = [], 0
    while offset + 9 <= len(received):
        frame, length = Frame.parse_frame_header(memoryview(received[offset : offset + 9]))
        body = received[offset + 9 : offset + 9 + length]
        if len(body) < length:
            break
        if isinstance(frame, GoAwayFrame):
            frame.parse_body(memoryview(body))
            codes.append(frame.error_code)
        offset += 9 + length
    return codes


def test_rapid_reset_is_held_to_a_bound_of_running_handlers(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVE-2023-44487: calls begun and reset at once leave the count of open streams, so
    without a bound of their own a client has the server begin handlers for as long as it
    sends. As grpc-go does, handlers running at once (reset calls' included) are held to
    MAX_CONCURRENT_CALLS: past it the connection is not read until one ends. The
    connection is not ended (a budget of resets that ended it also ended legitimate
    clients that cancel on short deadlines); no handler is left; others are served."""
    limit = 64
    monkeypatch.setattr(h2server, "MAX_CONCURRENT_CALLS", limit)

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        seen.cleanup_seconds = 0.3
        loop = asyncio.get_running_loop()
        s = await _connect(path)
        with s:
            encoder = Encoder()
            await loop.sock_sendall(s, PREFACE + _frames(SettingsFrame(0)))
            stream_id = 1
            for _ in range(40):
                # a round of calls is read and begun, then reset: the resets' handlers
                # take 0.3 s to end, and the next round's calls come meanwhile
                opened = list(range(stream_id, stream_id + 2 * limit, 2))
                stream_id += 2 * limit
                await loop.sock_sendall(
                    s, b"".join(_call(encoder, i, "Slow", "60") for i in opened)
                )
                await asyncio.sleep(0.005)
                resets = []
                for i in opened:
                    reset = RstStreamFrame(i)
                    reset.error_code = 8  # CANCEL
                    resets.append(reset.serialize())
                await loop.sock_sendall(s, b"".join(resets))
            await other()
            # the connection still serves: one more call on it is answered
            await loop.sock_sendall(s, _call(encoder, stream_id, "Echo", "after"))
            statuses = await _statuses(s, {stream_id})
        assert statuses[stream_id] == "0", statuses
        assert seen.slow_started >= limit  # the flood did begin handlers
        assert seen.slow_running_most <= limit, seen.slow_running_most
        for _ in range(100):
            if not server._calls:
                break
            await asyncio.sleep(0.1)
        assert not server._calls, f"{len(server._calls)} handlers left running"
        await other()

    _serve(socket_dir, body)


async def _statuses(s: socket.socket, wanted: set[int]) -> dict[int, str]:
    """Read the server's frames until each stream in `wanted` has ended: its grpc-status
    (or its HTTP status, for an answer that is not gRPC's)."""
    loop = asyncio.get_running_loop()
    decoder = Decoder()
    buffer = b""
    statuses: dict[int, str] = {}
    while not wanted <= statuses.keys():
        data = await asyncio.wait_for(loop.sock_recv(s, 1 << 16), 30.0)
        assert data, f"closed with {statuses}, waiting for {wanted}"
        buffer += data
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            buffer = buffer[9 + length :]
            if isinstance(frame, HeadersFrame):
                headers = dict(decoder.decode(frame.data, raw=True))
                if "END_STREAM" in frame.flags:
                    status = headers.get(b"grpc-status", headers.get(b":status", b"?"))
                    statuses[frame.stream_id] = status.decode()
    return statuses


def test_requests_reset_in_the_write_that_opens_them_leave_the_connection_alone(
    socket_dir: Path,
) -> None:
    """A client may reset a call in the same write that opens it; all of that read's
    frames are taken before any call is begun, so the stream is gone when its request is
    handled. A malformed request, a GET and a request after a graceful GOAWAY each used
    to be answered on the gone stream, which failed and closed the whole connection: a
    call already running on it never got its answer."""

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        s = await _connect(path)
        with s:
            encoder = Encoder()

            def reset(stream_id: int) -> bytes:
                frame = RstStreamFrame(stream_id)
                frame.error_code = 8  # CANCEL
                return bytes(frame.serialize())

            def opened(stream_id: int, headers: list[tuple[str, str]]) -> bytes:
                frame = HeadersFrame(stream_id, flags=["END_HEADERS", "END_STREAM"])
                frame.data = encoder.encode(headers)
                return bytes(frame.serialize()) + reset(stream_id)

            await loop.sock_sendall(s, PREFACE + _frames(SettingsFrame(0)))
            await loop.sock_sendall(s, _call(encoder, 1, "Slow", "1.0"))
            malformed = [(":method", "POST"), (":path", f"/{SERVICE}/Echo"), ("Bad", "x")]
            a_get = [(":method", "GET"), (":scheme", "http"), (":path", "/"), ("te", "trailers")]
            await loop.sock_sendall(
                s, opened(3, malformed) + opened(5, a_get) + _call(encoder, 7, "Echo", "e")
            )
            statuses = await _statuses(s, {7})
            for connection in server._connections.values():
                connection.goaway()  # a graceful stop's: calls begun go on
            await loop.sock_sendall(s, _call(encoder, 9, "Echo", "late") + reset(9))
            statuses.update(await _statuses(s, {1}))
        assert statuses[1] == "0" and statuses[7] == "0", statuses
        assert 9 not in statuses  # refused, and reset by the client anyway

    _serve(socket_dir, body)


def test_a_client_with_a_huge_window_that_reads_nothing_gets_a_bounded_queue(
    socket_dir: Path,
) -> None:
    """Sixteen server-streaming calls of 1 MiB messages, to a client that opened every
    window to 2 GiB and reads nothing: what is queued for it is bounded by the server
    (WRITE_LIMIT), not by the client's windows; it was a whole message a call (16 MiB
    here; a thousand calls a connection: 1 GiB)."""

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        s = await _connect(path, rcvbuf=4096)
        with s:
            encoder = Encoder()
            windows = SettingsFrame(0)
            windows.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = 2**31 - 1
            window = WindowUpdateFrame(0)
            window.window_increment = 2**31 - 1 - 65535
            calls = 16
            await loop.sock_sendall(
                s,
                PREFACE
                + _frames(windows, window)
                + b"".join(_call(encoder, 2 * i + 1, "Big", "8") for i in range(calls)),
            )
            for _ in range(300):  # every call has made its first message
                if seen.big_yielded >= calls:
                    break
                await asyncio.sleep(0.1)
            assert seen.big_yielded >= calls
            queued = 0
            for _ in range(10):
                await asyncio.sleep(0.1)
                for connection in server._connections.values():
                    queued = max(queued, connection.writer.transport.get_write_buffer_size())
            limit = h2server.WRITE_LIMIT + h2server.SEND_CHUNK + 64 * 1024
            assert queued <= limit, f"{queued} bytes queued for a client reading nothing"
            await other()

    _serve(socket_dir, body)


def test_a_client_that_never_finishes_its_preface_is_dropped(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and sends nothing, and one that sends its preface a byte
    at a time (slowloris): each held a descriptor and a connection for ever. They are
    closed once HANDSHAKE_TIMEOUT has passed, however the bytes trickle in."""
    monkeypatch.setattr(h2server, "HANDSHAKE_TIMEOUT", 1.0)

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        silent = await _connect(path)
        trickle = await _connect(path)
        with silent, trickle:
            ended = asyncio.ensure_future(_read_to_end(silent, 30.0))
            closed = False
            for byte in PREFACE:  # 24 bytes, one every 0.2 s: longer than the timeout
                try:
                    await loop.sock_sendall(trickle, bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                await asyncio.sleep(0.2)
            if not closed:
                await _read_to_end(trickle, 30.0)
            await ended
        for _ in range(100):
            if len(server._connections) == 1:
                break
            await asyncio.sleep(0.1)
        assert len(server._connections) == 1  # the other client's
        await other()

    _serve(socket_dir, body)


def test_connections_past_the_limit_are_closed_and_those_served_go_on(socket_dir: Path) -> None:
    """Idle connections, more than the server takes (max_connections, half its
    descriptors): those past it are closed at once, so that the clients served keep the
    descriptors their calls need (a server stream takes one to berthd)."""

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        sockets = [await _connect(path) for _ in range(24)]
        try:
            for s in sockets:  # a proper preface: idle, not slow
                await loop.sock_sendall(s, PREFACE + _frames(SettingsFrame(0)))
            await asyncio.sleep(0.5)
            assert len(server._connections) <= 8, len(server._connections)
            closed = 0
            for s in sockets:
                try:
                    while await asyncio.wait_for(loop.sock_recv(s, 65536), 0.2):
                        pass
                    closed += 1
                except TimeoutError:
                    pass  # served: open
                except ConnectionResetError:
                    closed += 1
            assert closed >= 24 - 7, closed
            await other()
        finally:
            for s in sockets:
                s.close()

    _serve(socket_dir, body, max_connections=8)


def test_a_frame_declared_oversized_ends_the_connection_before_its_body(
    socket_dir: Path,
) -> None:
    """A frame header declaring 16 MiB (the server's SETTINGS_MAX_FRAME_SIZE is 16 KiB):
    h2 checks a frame's length only once all of it has come, so the server buffered up
    to 16 MiB for each such connection first. It is refused at its header: GOAWAY
    FRAME_SIZE_ERROR, the connection closed, its body never awaited."""

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        s = await _connect(path)
        with s:
            header = (0xFFFFFF).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"  # DATA
            start = PREFACE + _frames(SettingsFrame(0)) + header + b"\x00" * 8192
            await loop.sock_sendall(s, start)  # 8 KiB of the 16 MiB declared, in one read
            received = await _read_to_end(s, 30.0)
        assert 0x6 in _goaway_codes(received)  # FRAME_SIZE_ERROR
        await other()

    _serve(socket_dir, body)


@settings(max_examples=200)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=64), max_size=12),
    big=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_frame_sizes_are_read_however_the_bytes_are_cut(
    lengths: list[int], big: bool, cuts: list[int]
) -> None:
    """A frame header declaring more than SETTINGS_MAX_FRAME_SIZE ends the connection
    (FRAME_SIZE_ERROR) as soon as its 9 bytes are in, before any of its body, however the
    bytes arrive; frames of an unknown type under the limit pass."""
    settings_frame = _frames(SettingsFrame(0))
    wire = PREFACE + settings_frame
    wire += b"".join(
        n.to_bytes(3, "big") + b"\x77\x00\x00\x00\x00\x01" + b"\x07" * n for n in lengths
    )
    oversized_at = len(wire) + 9  # where its header ends
    if big:
        wire += (16385).to_bytes(3, "big") + b"\x00" * 6
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    connection = http2.ServerConnection()
    refused = None
    for a, b in itertools.pairwise(points):
        try:
            connection.receive_data(wire[a:b])
        except http2.RemoteProtocolError as error:
            refused = (error.code, b)
            break
    if big:
        assert refused is not None and refused[0] == http2.ErrorCode.FRAME_SIZE_ERROR
        assert refused[1] >= oversized_at  # not before the header was whole
        assert _goaway_codes(connection.data_to_send()) == [http2.ErrorCode.FRAME_SIZE_ERROR]
    else:
        assert refused is None


async def _h2_client(path: str, settings: dict[int, int]) -> tuple[socket.socket, Any]:
    """A raw connection driven by h2 (a strict HTTP/2 client) with the given SETTINGS."""
    import h2.config
    import h2.connection

    s = await _connect(path)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings(settings)
    await asyncio.get_running_loop().sock_sendall(s, client.data_to_send())
    return s, client


def _open_big(client: Any, stream_id: int, count: int) -> None:
    client.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/{SERVICE}/Big"),
            (":authority", "berth"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    client.send_data(stream_id, frame_message(Text(value=str(count)).SerializeToString()), True)


def test_responses_waiting_on_the_connections_window_all_complete_in_turn(
    socket_dir: Path,
) -> None:
    """Twenty 1 MiB responses behind one small connection window (the client's default,
    64 KiB, given back as it reads; streams' windows wide open): each update wakes one
    waiting response, and each passes what is left to the next. A chain that dropped the
    turn anywhere would leave responses waiting with window to spare: every one must
    arrive whole."""
    import h2.events
    import h2.settings

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        s, client = await _h2_client(
            path, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        )
        with s:
            streams = list(range(1, 41, 2))
            for stream_id in streams:
                _open_big(client, stream_id, 1)
            await loop.sock_sendall(s, client.data_to_send())
            received = dict.fromkeys(streams, 0)
            ended: set[int] = set()

            async def read_all() -> None:
                while len(ended) < len(streams):
                    data = await loop.sock_recv(s, 1 << 16)
                    assert data, f"closed with {len(ended)} of {len(streams)} ended"
                    for event in client.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            received[event.stream_id] += len(event.data)
                            client.acknowledge_received_data(
                                event.flow_controlled_length, event.stream_id
                            )
                        elif isinstance(event, h2.events.StreamEnded):
                            ended.add(event.stream_id)
                    await loop.sock_sendall(s, client.data_to_send())

            await asyncio.wait_for(read_all(), 60)
        # each: the 5-byte prefix and 1 MiB of bytes, wrapped in a BytesValue
        assert all(r > BIG for r in received.values()), received
        await other()

    _serve(socket_dir, body)


def test_a_streams_window_update_wakes_only_its_own_response(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifty responses blocked on streams' windows of 0: an update of one stream wakes
    that stream's response alone (one event shared by all woke every one of them on
    every update: O(responses) an update, ~86 ms at 16,384)."""
    import h2.settings

    waits = 0
    original = h2server._Connection._wait_for_window

    async def counted(self: Any, call: Any) -> None:
        nonlocal waits
        waits += 1
        await original(self, call)

    monkeypatch.setattr(h2server._Connection, "_wait_for_window", counted)

    async def body(path: str, server: Server, seen: Seen, other: Any) -> None:
        loop = asyncio.get_running_loop()
        s, client = await _h2_client(path, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        with s:
            streams = list(range(1, 101, 2))
            for stream_id in streams:
                _open_big(client, stream_id, 1)
            await loop.sock_sendall(s, client.data_to_send())
            for _ in range(100):  # every response begun and blocked
                if waits >= len(streams):
                    break
                await asyncio.sleep(0.05)
            assert waits >= len(streams)
            base = waits
            for _ in range(20):  # one stream's window opened a little, twenty times
                client.increment_flow_control_window(100, stream_id=streams[0])
                await loop.sock_sendall(s, client.data_to_send())
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
        assert base < waits <= base + 20, (base, waits)
        await other()

    _serve(socket_dir, body)
