"""containerd's services over ttrpc (`<grpc address>.ttrpc`), for clients that use it.

ttrpc is gRPC's small cousin (containerd/ttrpc 1.1, what containerd 1.6 speaks): on a
UNIX stream socket, each message is a 10-byte header - payload length (uint32, big
endian, at most 4 MiB), stream id (uint32: a client's are odd), type (1 request,
2 response), flags (unused) - then a protobuf payload. A request names its service and
method, carries the method's request message, an optional timeout (ns) and metadata
(the namespace as `containerd-namespace-ttrpc`); the response carries a google.rpc.Status
and the method's response message. Requests on one connection are independent: each is
answered under its stream id, in any order. 1.1 has no streams: streaming methods (events,
content writes and reads, list streams) are answered UNIMPLEMENTED; clients use gRPC.

The framing is sans-IO (`FrameReader`, `encode_frame`); `serve_connection` drives one
socket; the methods are the gRPC services' own handlers (services.routes), so both sockets
answer alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Iterator
from typing import Any

from berth.daemon.grpc.calls import Aborted, Context, Route, StatusCode

log = logging.getLogger("berth.grpc.ttrpc")

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20  # containerd/ttrpc's messageLengthMax
TYPE_REQUEST = 1
TYPE_RESPONSE = 2
NAMESPACE_HEADER = "containerd-namespace-ttrpc"
MAX_IN_FLIGHT = 128  # requests served at once per connection; more wait to be read
MAX_STATUS_MESSAGE = 1024  # characters of an error's message (errors may echo input)


class FrameError(Exception):
    """The peer broke the framing (an oversized message): the connection ends."""


class FrameReader:
    """Bytes in, whole messages out: (stream id, type, flags, payload)."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        while len(self._buffer) >= HEADER.size:
            length, stream_id, kind, flags = HEADER.unpack_from(self._buffer)
            if length > self.max_message:
                raise FrameError(f"message of {length} bytes exceeds {self.max_message}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            yield stream_id, kind, flags, payload


def encode_frame(stream_id: int, kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), stream_id, kind, 0) + payload


# -- ttrpc's own messages ------------------------------------------------------------------


class _Messages:
    """ttrpc's Request, Response and KeyValue, declared from their wire layout (field
    numbers and types as containerd/ttrpc's types.go gives them) into protobuf's pool."""

    def __init__(self) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        from berth.daemon.grpc import convert as capi

        capi.types()  # puts google/rpc/status.proto (the stubs') into the pool
        pool = descriptor_pool.Default()
        name = "berth/ttrpc/messages.proto"
        try:
            pool.FindFileByName(name)
        except KeyError:
            proto = descriptor_pb2.FileDescriptorProto(
                name=name, package="berth.ttrpc", syntax="proto3"
            )
            proto.dependency.append("google/rpc/status.proto")
            f = descriptor_pb2.FieldDescriptorProto
            opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
            layout = {
                "KeyValue": [
                    ("key", 1, f.TYPE_STRING, opt, ""),
                    ("value", 2, f.TYPE_STRING, opt, ""),
                ],
                "Request": [
                    ("service", 1, f.TYPE_STRING, opt, ""),
                    ("method", 2, f.TYPE_STRING, opt, ""),
                    ("payload", 3, f.TYPE_BYTES, opt, ""),
                    ("timeout_nano", 4, f.TYPE_INT64, opt, ""),
                    ("metadata", 5, f.TYPE_MESSAGE, rep, ".berth.ttrpc.KeyValue"),
                ],
                "Response": [
                    ("status", 1, f.TYPE_MESSAGE, opt, ".google.rpc.Status"),
                    ("payload", 2, f.TYPE_BYTES, opt, ""),
                ],
            }
            for message, fields in layout.items():
                m = proto.message_type.add(name=message)
                for field_name, number, kind, label, type_name in fields:
                    added = m.field.add(name=field_name, number=number, type=kind, label=label)
                    if type_name:
                        added.type_name = type_name
            pool.Add(proto)
        get = message_factory.GetMessageClass
        self.Request = get(pool.FindMessageTypeByName("berth.ttrpc.Request"))
        self.Response = get(pool.FindMessageTypeByName("berth.ttrpc.Response"))
        self.Status = get(pool.FindMessageTypeByName("google.rpc.Status"))


_messages: _Messages | None = None


def messages() -> _Messages:
    global _messages
    if _messages is None:
        _messages = _Messages()
    return _messages


# -- serving -------------------------------------------------------------------------------


def _metadata(request: Any) -> list[tuple[str, str]]:
    """The request's metadata as gRPC headers (ttrpc's namespace key included)."""
    out = []
    for kv in request.metadata:
        key = kv.key.lower()
        if key == NAMESPACE_HEADER:
            key = "containerd-namespace"
        out.append((key, kv.value))
    return out


async def answer(routes: dict[tuple[str, str], Route], raw: bytes) -> bytes:
    """One request's payload in, its response's payload out (never an exception)."""
    m = messages()
    code, details, payload = StatusCode.OK, "", b""
    try:
        request = m.Request.FromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError
        code, details = StatusCode.INVALID_ARGUMENT, f"malformed ttrpc request: {exc}"
        request = None
    if request is not None:
        route = routes.get((request.service, request.method))
        if route is None:
            code = StatusCode.UNIMPLEMENTED
            details = f"{request.service}/{request.method} is not served here"
        elif route.streaming:
            code = StatusCode.UNIMPLEMENTED
            details = f"{request.service}/{request.method} streams: use the gRPC socket"
        else:
            code, details, payload = await _call(route, request)
    if len(payload) > MAX_MESSAGE - 1024:  # a Go ttrpc client refuses larger messages
        code, details = (
            StatusCode.RESOURCE_EXHAUSTED,
            (f"response of {len(payload)} bytes exceeds ttrpc's {MAX_MESSAGE}: use gRPC"),
        )
        payload = b""
    if len(details) > MAX_STATUS_MESSAGE:  # errors may echo what a client sent
        details = details[: MAX_STATUS_MESSAGE - 3] + "..."
    status = m.Status(code=int(code), message=details)
    return bytes(m.Response(status=status, payload=payload).SerializeToString())


async def _call(route: Route, request: Any) -> tuple[StatusCode, str, bytes]:
    try:
        message = route.request_cls.FromString(request.payload)
    except Exception as exc:  # DecodeError
        return (
            StatusCode.INVALID_ARGUMENT,
            f"malformed {route.request_cls.__name__}: {exc}",
            b"",
        )
    context = Context(_metadata(request))
    timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
    try:
        async with asyncio.timeout(timeout):  # not wait_for: see client.connect
            reply = await route.handler(message, context)
        return StatusCode.OK, "", reply.SerializeToString()
    except Aborted as aborted:
        return aborted.code, aborted.details, b""
    except TimeoutError:
        return StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", b""
    except Exception as exc:  # a bug of this front end: answered, logged, never silent
        log.exception("ttrpc %s/%s failed", request.service, request.method)
        return StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}", b""


class Server:
    """The ttrpc listener: connections, and the requests in flight on them (a stop lets
    those finish, within a grace period, before it closes the connections)."""

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        messages()  # declared now: a failure stops start-up, not a request
        self.routes = routes
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Server | None = None

    async def listen(self, path: str) -> None:
        self._listener = await asyncio.start_unix_server(self._connection, path=path)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await serve_connection(reader, writer, self)
        finally:
            self._connections.discard(task)

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def stop(self, grace: float) -> None:
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
) -> None:
    """Serve one client until it leaves or breaks the framing."""
    frames = FrameReader()
    slots = asyncio.Semaphore(MAX_IN_FLIGHT)
    sending = asyncio.Lock()
    running: set[asyncio.Task[None]] = set()

    async def respond(stream_id: int, raw: bytes) -> None:
        server.started()
        try:
            response = await answer(server.routes, raw)
            async with sending:
                writer.write(encode_frame(stream_id, TYPE_RESPONSE, response))
                await writer.drain()
        except (OSError, ConnectionError):
            pass  # the client left
        finally:
            server.finished()
            slots.release()

    try:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            frames.feed(data)
            for stream_id, kind, _flags, payload in frames.frames():
                if kind != TYPE_REQUEST:
                    continue  # nothing else is asked of a server in ttrpc 1.1
                await slots.acquire()
                task = asyncio.create_task(respond(stream_id, payload))
                running.add(task)
                task.add_done_callback(running.discard)
    except FrameError as exc:
        log.warning("ttrpc client dropped: %s", exc)
    except (OSError, ConnectionError):
        pass
    finally:
        for task in running:
            task.cancel()
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
