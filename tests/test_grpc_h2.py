"""berth-grpc's gRPC transport (daemon/grpc/h2server.py: h2 on asyncio), driven by grpcio's
own client: calls of every shape, messages of containerd's largest size both ways, flow
control against a slow handler, deadlines and resets reaching the handler, errors with
their codes, malformed input, and a graceful stop. The services above it are tested
through berth-grpc elsewhere (test_grpc_*, test_ctr, test_dockerd, test_go_client)."""

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
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.daemon.grpc.calls import Aborted, Context, Route, StatusCode
from berth.daemon.grpc.h2server import (
    MAX_MESSAGE,
    MAX_STATUS_MESSAGE,
    MessageReader,
    Server,
    encode_grpc_message,
    frame_message,
    parse_timeout,
)

Bytes = wrappers_pb2.BytesValue
Text = wrappers_pb2.StringValue
SERVICE = "berth.test.Echo"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2 * MAX_MESSAGE),
    ("grpc.max_send_message_length", 2 * MAX_MESSAGE),
]


class Probe:
    """What the handlers saw: to show that the server, not only the client, acted."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.taken = 0  # streamed requests the handler has taken
        self.sent = 0  # streamed requests the client has produced
        self.most_ahead = 0


def _routes(probe: Probe) -> dict[tuple[str, str], Route]:
    async def echo(request: Any, context: Context) -> Any:
        headers = dict(context.invocation_metadata())
        return Text(value=f"{request.value}|{headers.get('containerd-namespace', '')}")

    async def size(request: Any, context: Context) -> Any:
        return Text(value=str(len(request.value)))

    async def blob(request: Any, context: Context) -> Any:
        return Bytes(value=b"b" * int(request.value))

    async def fail(request: Any, context: Context) -> Any:
        if request.value.startswith("echo:"):  # an error that repeats what the client sent
            await context.abort(StatusCode.INVALID_ARGUMENT, f"bad {request.value!r}")
        if request.value == "abort":
            await context.abort(StatusCode.NOT_FOUND, "naïve 100% not found\nhere")
        raise KeyError("a bug")

    async def slow(request: Any, context: Context) -> Any:
        try:
            await asyncio.sleep(float(request.value))
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return Text(value="slept")

    async def count(request: Any, context: Context) -> AsyncIterator[Any]:
        for i in range(int(request.value)):
            yield Text(value=str(i))

    async def total(requests: AsyncIterator[Any], context: Context) -> Any:
        n = 0
        async for request in requests:
            probe.taken += 1
            probe.most_ahead = max(probe.most_ahead, probe.sent - probe.taken)
            n += len(request.value)
            await asyncio.sleep(0.01)  # slower than the client sends
        return Text(value=str(n))

    async def chat(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            yield Text(value=request.value.upper())

    def unary(handler: Any, request_cls: Any = Text) -> Route:
        return Route(request_cls, handler)

    return {
        (SERVICE, "Echo"): unary(echo),
        (SERVICE, "Size"): unary(size, Bytes),
        (SERVICE, "Blob"): unary(blob),
        (SERVICE, "Fail"): unary(fail),
        (SERVICE, "Slow"): unary(slow),
        (SERVICE, "Count"): Route(Text, count, server_streaming=True),
        (SERVICE, "Total"): Route(Bytes, total, client_streaming=True),
        (SERVICE, "Chat"): Route(Text, chat, client_streaming=True, server_streaming=True),
    }


def _method(channel: grpc.aio.Channel, kind: str, name: str, response_cls: Any = Text) -> Any:
    make = getattr(channel, kind)
    return make(
        f"/{SERVICE}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )


def _serve(
    socket_dir: Path, body: Callable[[grpc.aio.Channel, Server, Probe], Awaitable[None]]
) -> None:
    """Run `body` against a server on a socket of its own, and stop the server after."""

    async def main() -> None:
        probe = Probe()
        server = Server(_routes(probe))
        path = str(socket_dir / "grpc.sock")
        await server.listen(path)
        try:
            async with grpc.aio.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS) as ch:
                await body(ch, server, probe)
        finally:
            await server.stop(grace=1.0)

    asyncio.run(main())


def test_a_unary_call_carries_its_request_and_metadata(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        echo = _method(ch, "unary_unary", "Echo")
        reply = await echo(Text(value="hi"), metadata=(("containerd-namespace", "ns1"),))
        assert reply.value == "hi|ns1"
        replies = await asyncio.gather(*(echo(Text(value=str(i))) for i in range(200)))
        assert [r.value for r in replies] == [f"{i}|" for i in range(200)]

    _serve(socket_dir, body)


def test_messages_of_containerds_largest_size_pass_both_ways(socket_dir: Path) -> None:
    """32 MiB, far beyond every HTTP/2 window: flow control on both sides."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        size = _method(ch, "unary_unary", "Size")
        big = MAX_MESSAGE - 16
        assert (await size(Bytes(value=b"x" * big))).value == str(big)
        blob = _method(ch, "unary_unary", "Blob", Bytes)
        assert len((await blob(Text(value=str(big)))).value) == big

    _serve(socket_dir, body)


def test_a_message_over_the_limit_is_refused_both_ways(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        size = _method(ch, "unary_unary", "Size")
        with pytest.raises(grpc.aio.AioRpcError) as sent:
            await size(Bytes(value=b"x" * (MAX_MESSAGE + 1)))
        assert sent.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        blob = _method(ch, "unary_unary", "Blob", Bytes)
        with pytest.raises(grpc.aio.AioRpcError) as asked:
            await blob(Text(value=str(MAX_MESSAGE + 1)))
        assert asked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="after"))).value == "after|"  # the connection serves on

    _serve(socket_dir, body)


def test_streams_both_ways_keep_order(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        count = _method(ch, "unary_stream", "Count")
        assert [r.value async for r in count(Text(value="2000"))] == [str(i) for i in range(2000)]
        chat = _method(ch, "stream_stream", "Chat")

        async def words() -> AsyncIterator[Any]:
            for word in ("a", "b", "c"):
                yield Text(value=word)

        assert [r.value async for r in chat(words())] == ["A", "B", "C"]

    _serve(socket_dir, body)


def test_a_slow_handler_holds_a_fast_client_back(socket_dir: Path) -> None:
    """A client streaming 1 MiB messages to a handler that takes one every 10 ms gets
    only a bounded distance ahead: the server acknowledges data as the handler takes it
    (HTTP/2 windows), instead of buffering the whole stream."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        total = _method(ch, "stream_unary", "Total")
        chunk = b"z" * (1 << 20)

        async def chunks() -> AsyncIterator[Any]:
            for _ in range(96):
                probe.sent += 1
                yield Bytes(value=chunk)

        assert (await total(chunks())).value == str(96 * len(chunk))
        assert probe.taken == 96
        # the call's window + what it holds (1 MiB each) + grpcio's own buffers; not all 96
        assert probe.most_ahead <= 24, probe.most_ahead

    _serve(socket_dir, body)


def test_a_deadline_ends_the_call_and_its_handler(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        slow = _method(ch, "unary_unary", "Slow")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await slow(Text(value="30"), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(probe.cancelled.wait(), 5.0)  # the handler did not go on

    _serve(socket_dir, body)


def test_a_call_the_client_cancels_stops_its_handler(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        call = _method(ch, "unary_unary", "Slow")(Text(value="30"))
        await asyncio.sleep(0.3)
        call.cancel()
        await asyncio.wait_for(probe.cancelled.wait(), 5.0)

    _serve(socket_dir, body)


def test_errors_keep_their_code_and_message(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        fail = _method(ch, "unary_unary", "Fail")
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await fail(Text(value="abort"))
        assert aborted.value.code() == grpc.StatusCode.NOT_FOUND
        assert aborted.value.details() == "naïve 100% not found\nhere"
        with pytest.raises(grpc.aio.AioRpcError) as bug:
            await fail(Text(value="bug"))
        assert bug.value.code() == grpc.StatusCode.INTERNAL
        assert "KeyError" in (bug.value.details() or "")
        unknown = ch.unary_unary(f"/{SERVICE}/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await unknown(b"")
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="still"))).value == "still|"

    _serve(socket_dir, body)


def test_a_malformed_request_is_invalid_argument(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        raw = ch.unary_unary(f"/{SERVICE}/Echo")  # bytes as they are
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\x0a\xff\xff\xff")  # field 1, a length running past the end
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "google.protobuf.StringValue" in (info.value.details() or "")

    _serve(socket_dir, body)


def test_a_client_breaking_http2_is_dropped_alone(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        bad_headers = b"\x00\x00\x05\x01\x05\x00\x00\x00\x01" + b"\xff" * 5  # not HPACK
        for garbage in (
            b"GET / HTTP/1.1\r\n\r\n",  # not HTTP/2
            preface + b"\x00" * 9,  # DATA on stream 0
            preface + settings_frame + bad_headers,
        ):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.setblocking(False)
                await loop.sock_connect(s, str(socket_dir / "grpc.sock"))
                await loop.sock_sendall(s, garbage)
                received = b""
                while True:  # the server answers (h2's GOAWAY, if any) and closes
                    data = await asyncio.wait_for(loop.sock_recv(s, 65536), 5.0)
                    if not data:
                        break
                    received += data
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="ok"))).value == "ok|"

    _serve(socket_dir, body)


def test_a_stop_finishes_calls_begun_and_ends_the_rest_unavailable(socket_dir: Path) -> None:
    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        slow = _method(ch, "unary_unary", "Slow")
        short = asyncio.ensure_future(slow(Text(value="0.5")))
        long = asyncio.ensure_future(slow(Text(value="30")))
        await asyncio.sleep(0.2)
        await server.stop(grace=1.5)
        assert (await short).value == "slept"  # finished within the grace period
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await long
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert probe.cancelled.is_set()

    _serve(socket_dir, body)


def test_calls_that_end_holding_data_give_the_connection_its_window_back(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client-streaming call that ends (aborted, reset) while the client had run ahead
    of its handler: the bytes it held are acknowledged to the connection, else a few such
    calls leave the connection's window at 0 and every later call on it hangs."""
    from berth.daemon.grpc import h2server

    monkeypatch.setattr(h2server, "CONNECTION_WINDOW", 3 << 20)  # a few calls' worth
    monkeypatch.setattr(h2server, "HELD_LIMIT", 1 << 16)

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        total = _method(ch, "stream_unary", "Total")

        async def flood() -> AsyncIterator[Any]:
            for _ in range(64):
                yield Bytes(value=b"q" * (256 << 10))

        for _ in range(8):
            call = total(flood())
            await asyncio.sleep(0.15)  # ahead of the handler, by its whole window
            call.cancel()
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="flows"), timeout=5.0)).value == "flows|"

    _serve(socket_dir, body)


def test_a_client_that_never_reads_is_not_read_from_and_stop_is_bounded(
    socket_dir: Path,
) -> None:
    """PINGs from a client that reads nothing: their answers pile up for it, so the
    server stops reading from it (its sends block) instead of queueing without bound;
    and a stop does not wait on that client for ever."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"p" * 8
        pings = ping * (65536 // len(ping))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(str(socket_dir / "grpc.sock"))
            s.setblocking(False)
            s.send(preface)
            sent, blocked, pending = 0, False, memoryview(pings)
            deadline = loop.time() + 60.0
            while sent < (64 << 20) and loop.time() < deadline:
                try:
                    n = s.send(pending)
                except BlockingIOError:
                    await asyncio.sleep(1.0)  # the server may only be busy
                    try:
                        n = s.send(pending)
                    except BlockingIOError:
                        blocked = True
                        break
                sent += n
                pending = pending[n:] or memoryview(pings)  # whole frames only
                await asyncio.sleep(0)
            assert blocked, f"the server read {sent} bytes of PINGs from a client not reading"
            echo = _method(ch, "unary_unary", "Echo")
            assert (await echo(Text(value="others"), timeout=5.0)).value == "others|"
            started = loop.time()
            await server.stop(grace=0.5)
            assert loop.time() - started < 5.0

    _serve(socket_dir, body)


def test_a_cancelled_subscription_closes_its_berthd_stream() -> None:
    """Events/Subscribe cancelled while it waits for an event (ctr events ^C, a client
    gone): the stream it follows from berthd is closed, not left running."""
    from berth.daemon.grpc import convert as capi
    from berth.daemon.grpc.handoff import Handoff
    from berth.daemon.grpc.services.events import Events

    closed = asyncio.Event()

    class Backend:
        handoff = Handoff("")

        async def events(self, params: Any, cursor: Any) -> AsyncIterator[Any]:
            try:
                await asyncio.sleep(3600)
                yield {}
            finally:
                closed.set()

    async def main() -> None:
        service = Events(Backend())  # type: ignore[arg-type]
        context = Context([("containerd-namespace", "ns")])
        request = capi.types().events.SubscribeRequest()

        async def follow() -> None:
            async for _ in service.subscribe(request, context):
                pass

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), 2.0)

    asyncio.run(main())


# -- the sans-IO parts ---------------------------------------------------------------------


@settings(max_examples=200)
@given(
    messages=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
)
def test_messages_come_out_whole_however_the_bytes_are_cut(
    messages: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(frame_message(m) for m in messages)
    points = sorted({0, len(wire), *(c for c in cuts if c < len(wire))})
    reader = MessageReader()
    out = []
    for start, end in itertools.pairwise(points):
        out += reader.feed(wire[start:end])
    assert out == messages
    assert not reader.partial


def test_an_oversized_or_compressed_message_is_refused_before_buffering() -> None:
    reader = MessageReader(max_message=1024)
    with pytest.raises(Aborted) as big:
        reader.feed(b"\x00" + (1025).to_bytes(4, "big"))
    assert big.value.code == StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(Aborted) as packed:
        MessageReader().feed(b"\x01\x00\x00\x00\x01x")
    assert packed.value.code == StatusCode.UNIMPLEMENTED


def test_grpc_timeout_and_message_encodings() -> None:
    assert parse_timeout("100m") == pytest.approx(0.1)
    assert parse_timeout("2S") == 2.0
    assert parse_timeout("1H") == 3600.0
    assert parse_timeout("5n") == pytest.approx(5e-9)
    for bad in ("", "S", "123456789S", "10x", "-1S", "1.5S", "\u00b2S", "\u0661S"):
        assert parse_timeout(bad) is None, bad
    assert encode_grpc_message("plain text") == "plain text"
    assert encode_grpc_message("100%\n") == "100%25%0A"
    assert encode_grpc_message("é") == "%C3%A9"
    long = encode_grpc_message("\u4e2d" * 100_000)
    assert len(long) <= MAX_STATUS_MESSAGE and long.endswith("...")
    assert not long[:-3].endswith(("%", "%E", "%E4", "%E4%")), long[-12:]


def test_an_error_echoing_a_huge_request_is_cut_and_keeps_the_loop(socket_dir: Path) -> None:
    """An error message that repeats a client's 300 KiB string: h2's HPACK encoder takes
    quadratic time in a header's length, and an uncut grpc-message held berth-grpc's only
    loop for a minute. It is cut to MAX_STATUS_MESSAGE, and the answer is prompt."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        fail = _method(ch, "unary_unary", "Fail")
        began = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fail(Text(value="echo:" + "\u4e2d" * 100_000))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert details.startswith("bad 'echo:") and details.endswith("...")
        assert asyncio.get_running_loop().time() - began < 5
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="still"))).value == "still|"

    _serve(socket_dir, body)


def test_messages_beyond_the_connections_budget_together_all_complete(socket_dir: Path) -> None:
    """Five 30 MiB requests at once on one connection: 150 MiB in progress is past the
    connection's budget (CONNECTION_BUDGET, 128 MiB), so acknowledgements are held back,
    but the call furthest into its message always gets them: every call completes (each
    waiting for the others' messages to finish would wait for ever)."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        size = _method(ch, "unary_unary", "Size")
        payload = b"x" * (30 * 1024 * 1024)
        replies = await asyncio.wait_for(
            asyncio.gather(*(size(Bytes(value=payload)) for _ in range(5))), 60
        )
        assert [r.value for r in replies] == [str(len(payload))] * 5
        for connection in server._connections.values():  # the running total kept in step
            held = sum(c.held + c.reader.buffered for c in connection.calls.values())
            assert connection.held_bytes == held == 0

    _serve(socket_dir, body)


def test_a_unary_call_with_a_second_request_message_is_refused(socket_dir: Path) -> None:
    """One request message on a unary call, as grpc-go enforces: a client that sends more
    (here 20,000 empty ones, which used to pile up unread and unbounded) gets INTERNAL."""

    async def body(ch: grpc.aio.Channel, server: Server, probe: Probe) -> None:
        raw = ch.stream_unary(f"/{SERVICE}/Slow")  # a client that streams to a unary method

        async def many() -> AsyncIterator[bytes]:
            yield Text(value="30").SerializeToString()
            for _ in range(20_000):
                yield b""

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(raw(many()), 10)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "more than one request message" in (info.value.details() or "")
        assert await asyncio.wait_for(probe.cancelled.wait(), 5) is True  # handler stopped
        echo = _method(ch, "unary_unary", "Echo")
        assert (await echo(Text(value="still"))).value == "still|"

    _serve(socket_dir, body)
