"""gRPC over HTTP/2 on a UNIX socket, on asyncio: what berth-grpc answers containerd's
clients with, in place of grpcio. HTTP/2 itself is `http2.ServerConnection` (sans-IO).

grpcio was a third of berth-grpc's memory (its C core, its threads and arenas: berth-grpc
was 34 MiB RSS on it, 24 without) for a front end that serves one local socket. gRPC's
wire protocol over HTTP/2 is small (grpc/doc/PROTOCOL-HTTP2.md):

- a call is one HTTP/2 stream: request HEADERS (`:method POST`, `:path /Service/Method`,
  `content-type: application/grpc...`, optional `grpc-timeout`, the caller's metadata),
  then DATA carrying length-prefixed messages (1 byte compressed flag, 4 bytes big-endian
  length, the protobuf bytes), ended by the client's END_STREAM;
- the answer is HEADERS (`:status 200`), the response messages framed the same way, and
  trailers (`grpc-status`, `grpc-message` percent-encoded) with END_STREAM; an answer with
  no message may be "trailers only", one HEADERS frame carrying both.

`MessageReader` is the sans-IO half of the message framing (bytes in, whole messages out,
bounded); `Server` drives connections. Facts that bite:

- a graceful stop sends GOAWAY and keeps answering the calls already begun; a stream the
  client opens after it is refused (REFUSED_STREAM), which gRPC clients retry on a new
  connection (here: the successor's socket).
- HTTP/2 flow control: data received is acknowledged (WINDOW_UPDATE) as the handler takes
  it, so a client streaming faster than berthd stores (Content.Write) is held back by its
  window instead of filling this process's memory; data sent waits for the client's window.
- one malformed request is a stream error (RFC 9113 8.1.1), not a connection's: requests
  are checked here (`malformed_headers`), as grpc-go does; a malformed one's stream is
  reset, the connection and its other calls go on.

A hostile or broken client is held to bounds of its own connection (tests/
test_grpc_h2_hostile.py): its handlers running at once, those of calls it reset
included, are bounded (MAX_CONCURRENT_CALLS: Rapid Reset); what is queued for it is
bounded by WRITE_LIMIT,
whatever windows it grants; a frame header longer than SETTINGS_MAX_FRAME_SIZE ends it at
once, before its body is buffered; its preface must come within HANDSHAKE_TIMEOUT; and
clients past `max_connections` are closed at once. `http2` bounds a header block
(encoded, CONTINUATION frames, and decoded: MAX_HEADER_LIST_SIZE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import heapq
import logging
import resource
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from berth.daemon.grpc.calls import Aborted, Context, Route, StatusCode
from berth.daemon.grpc.http2 import (
    INITIAL_WINDOW_SIZE,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    RequestReceived,
    ServerConnection,
    SettingsReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger("berth.grpc.h2")

PREFIX = struct.Struct(">BI")  # compressed flag, message length
MAX_MESSAGE = 32 * 1024 * 1024  # containerd's limit, both ways
# Flow control. A call's data is acknowledged as its handler takes it, so a call can hold
# at most STREAM_WINDOW of the connection's window unacknowledged: CONNECTION_WINDOW /
# STREAM_WINDOW slow calls (128) would be needed to stall the others on a connection.
STREAM_WINDOW = 1024 * 1024  # what a client may send on one call before an acknowledgement
CONNECTION_WINDOW = 128 * 1024 * 1024
HELD_LIMIT = 1024 * 1024  # received messages a handler has not taken yet, per call
# Request bytes one connection may hold (messages begun, and messages not yet taken): past
# it, no call of the connection is acknowledged until some are taken. A stream's window
# alone does not bound them: a message in progress is acknowledged as it arrives.
CONNECTION_BUDGET = 4 * MAX_MESSAGE
MESSAGE_OVERHEAD = 64  # what a received message counts against HELD_LIMIT beyond its bytes
MAX_STATUS_MESSAGE = 1024  # bytes of an encoded grpc-message (errors may echo client input)
YIELD_EVERY = 64  # HTTP/2 events handled before other connections get the loop
WRITE_LIMIT = 1024 * 1024  # queued for a client that does not read: stop reading from it,
# and stop sending to it (a client's window may be 2 GiB a call, a thousand calls at once)
SEND_CHUNK = 64 * 1024  # response bytes put in a DATA frame, whatever the client's frame size
CLOSE_TIMEOUT = 1.0  # for a client's socket to take what is queued before it is cut
# Calls one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS), and handlers it
# may have running, reset calls' included. grpc-go's server (containerd's) sets no limit,
# and dockerd keeps a Tasks/Wait open per container on one connection: at 1000 its
# 1001st container's calls queued in the client for good (a review's stress run).
# Rapid Reset (CVE-2023-44487): a stream reset at once leaves the streams' count, so a
# client could have handlers begun without end. As grpc-go (1.58) does, a connection
# whose running handlers reach the bound is not read from until one ends. An earlier
# budget of resets a second ended the connection instead, and with it a legitimate
# client's calls: grpc-go clients cancel calls on their deadlines at that rate.
MAX_CONCURRENT_CALLS = 16384
# A client has this long to send its preface and SETTINGS (one that connects and sends
# nothing, or a byte at a time, would hold a descriptor for ever).
HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 4096  # clients at most (an idle one costs ~20 KiB), whatever the rlimit
READ_SIZE = 256 * 1024
MAX_HEADER_LIST_SIZE = 64 * 1024  # a request's headers, decoded (grpc-go: 16 MiB)
_END = None  # the inbox's end-of-requests mark
RESPONSE_HEADERS = ((":status", "200"), ("content-type", "application/grpc"))


def connection_limit() -> int:
    """Clients served at once: at most half the descriptors this process may open, so
    that the calls of those served always have descriptors for berthd (a server stream
    takes a connection of its own); a client past it is closed at once."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class MessageReader:
    """One call's DATA bytes in, whole gRPC messages out. Bounded: a message declared
    larger than `max_message` is refused before any of it is buffered. A client that
    breaks the framing gets `Aborted`, with the status its call ends with."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= PREFIX.size:
            compressed, length = PREFIX.unpack_from(self._buffer)
            if compressed:
                # no compression is offered (no grpc-accept-encoding), so none may be used
                raise Aborted(StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
            if length > self.max_message:
                raise Aborted(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"message of {length} bytes exceeds the limit of {self.max_message}",
                )
            end = PREFIX.size + length
            if len(self._buffer) < end:
                break
            messages.append(bytes(self._buffer[PREFIX.size : end]))
            del self._buffer[:end]
        return messages

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def partial(self) -> bool:
        """A message has begun and not ended (at the end of the stream: truncated)."""
        return bool(self._buffer)


def frame_message(payload: bytes) -> bytes:
    return PREFIX.pack(0, len(payload)) + payload


def parse_timeout(value: str) -> float | None:
    """`grpc-timeout` (1 to 8 digits and a unit: H M S m u n) in seconds; None if bad."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    digits, unit = value[:-1], value[-1:]
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 8 or unit not in units:
        return None
    return int(digits) * units[unit]


_PSEUDO_HEADERS = {b":method", b":scheme", b":authority", b":path"}
_NAME_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_CONNECTION_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade"}
# A header value's forbidden bytes: the controls but the tab, and DEL. Checked by deleting
# them (bytes.translate, in C): a generator over each byte was half of a call's header
# handling (~200 bytes of headers a call, profiled).
_CONTROL_BYTES = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"


def malformed_headers(headers: Any) -> str | None:
    """Why a request's headers are malformed (RFC 9113 8.2, 8.3), or None: a name that is
    not a lowercase token, a value with a control character (grpc-go's test: a space or a
    tab around it is taken), a pseudo-header unknown, repeated or after a regular header,
    a connection-specific header. grpc-go resets such a stream (a PROTOCOL_ERROR)."""
    seen: set[bytes] = set()
    regular = False
    for name_raw, value_raw in headers:
        name, value = bytes(name_raw), bytes(value_raw)
        if name.startswith(b":"):
            if regular or name not in _PSEUDO_HEADERS or name in seen:
                return f"pseudo-header {name!r} unknown, repeated or after a regular one"
            seen.add(name)
        else:
            regular = True
            if not name or not _NAME_CHARS.issuperset(name):
                return f"header name {name!r} is not a lowercase token"
            if name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
                return f"connection-specific header {name!r}"
        if len(value.translate(None, _CONTROL_BYTES)) != len(value):
            return f"header {name!r}: a control character in its value"
    return None


def encode_grpc_message(details: str) -> str:
    """`grpc-message`'s percent-encoding: printable ASCII but '%' as is, the rest as %XX of
    its UTF-8 bytes; at most MAX_STATUS_MESSAGE bytes, cut with "...". Errors may echo what
    a client sent: a trailer of 300 KiB would be sent as is, and some clients refuse
    header lists past 8 or 16 KiB (h2's HPACK encoder held the loop for a minute on it)."""
    out: list[str] = []
    size = 0
    for char in details[:MAX_STATUS_MESSAGE]:  # cut between characters, never inside one
        piece = "".join(
            chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}"
            for byte in char.encode("utf-8", "replace")
        )
        if size + len(piece) > MAX_STATUS_MESSAGE - 3:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


class _Call:
    """One stream: its route, what the client has sent that the handler has not taken
    (and the flow-controlled bytes not yet acknowledged for it), and its task."""

    def __init__(
        self, stream_id: int, route: Route, metadata: list[tuple[str, str]], path: str = ""
    ) -> None:
        self.stream_id = stream_id
        self.path = path
        self.route = route
        self.metadata = metadata
        self.timeout: float | None = None
        self.reader = MessageReader()
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.held = 0  # bytes of messages in the inbox
        self.counted = 0  # what of held and its reader's buffer the connection's total has
        self.received = 0  # request messages so far
        self.unacknowledged = 0  # flow-controlled bytes received, not yet acknowledged
        self.ended = False  # the client's END_STREAM came
        self.headers_sent = False
        self.finished = False
        self.code: StatusCode | None = None  # how it ended, if it was answered
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.window_waiter: asyncio.Future[None] | None = None  # while blocked on a window

    def release(self) -> None:
        """Drop what an ended call still holds: its task, unread messages, a message
        begun. A cancelled task keeps its frames, and through them this call: the cycle
        kept a cut-off upload's megabytes until the collector ran (a review: 650 MB
        after 600 cut Content.Write calls, on an idle berth-grpc)."""
        self.task = None
        self.reader = MessageReader()
        self.inbox = asyncio.Queue()


class _Connection:
    """One client: its HTTP/2 state, its calls, and the writes to its socket."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.http2 = ServerConnection(
            max_concurrent_streams=MAX_CONCURRENT_CALLS,
            initial_window_size=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_header_list_size=MAX_HEADER_LIST_SIZE,
        )
        self.calls: dict[int, _Call] = {}
        self.held_bytes = 0  # request bytes the calls hold (see CONNECTION_BUDGET)
        self._deferred: dict[int, _Call] = {}  # calls with data not yet acknowledged
        self._partial: list[tuple[int, int]] = []  # (-bytes of a message begun, stream id)
        self.greeted = False  # the client's preface and first SETTINGS came
        self.running = 0  # handlers not yet ended, reset calls' included
        self._handler_ended = asyncio.Event()
        self.draining = False
        self.closed = False
        # calls blocked on the connection's window, each woken in turn (lazily cleaned)
        self._connection_waiters: collections.deque[tuple[_Call, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._drain_lock = asyncio.Lock()

    # -- writing -----------------------------------------------------------------------

    def flush(self) -> None:
        data = self.http2.data_to_send()
        if data and not self.closed and not self.writer.transport.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        async with self._drain_lock:  # one drain at a time (StreamWriter's waiter)
            await self.writer.drain()

    async def _wait_for_window(self, call: _Call) -> None:
        """Until the call's window may have opened. Woken one at a time: a call blocked
        on its stream's window by an update of that stream; one blocked on the
        connection's by a connection update, or by the sender before it once that one
        has sent and left some window. One event shared by every waiter cost O(waiters)
        an update (a review: ~86 ms an update with 16,384 calls waiting)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        call.window_waiter = future
        on_connection = self.http2.send_window <= 0
        if on_connection:
            self._connection_waiters.append((call, future))
            if len(self._connection_waiters) > 2 * self.running + 64:  # mostly stale
                live = [(c, f) for c, f in self._connection_waiters if not f.done()]
                self._connection_waiters = collections.deque(live)
        else:
            self._wake_connection_waiter()  # what window there is, another may use
        try:
            await future  # woken but gone: send_message passes the turn on as it ends
        finally:
            call.window_waiter = None

    def _wake_connection_waiter(self) -> None:
        """Wake the first call waiting for the connection's window, if it has some."""
        while self._connection_waiters and self.http2.send_window > 0:
            _, future = self._connection_waiters.popleft()
            if not future.done():
                future.set_result(None)
                return

    def _wake_stream_waiters(self, stream_id: int | None) -> None:
        """Wake the call blocked on that stream's window (None: every call, for a change
        of every stream's window by SETTINGS)."""
        calls = self.calls.values() if stream_id is None else [self.calls.get(stream_id)]
        for call in calls:
            waiter = call.window_waiter if call is not None else None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _send_headers(self, call: _Call) -> None:
        if not call.headers_sent:
            call.headers_sent = True
            self.http2.send_headers(call.stream_id, RESPONSE_HEADERS)

    async def send_message(self, call: _Call, payload: bytes, *, last: bool = False) -> None:
        """Frame and send one response message, within the client's window. The `last`
        of a call is not written yet: its trailers follow at once (`finish`), in the
        same write (one system call per unary call, not two)."""
        if len(payload) > MAX_MESSAGE:
            raise Aborted(
                StatusCode.RESOURCE_EXHAUSTED,
                f"response of {len(payload)} bytes exceeds the limit of {MAX_MESSAGE}",
            )
        self._send_headers(call)
        # the prefix, then the payload in frames, without a framed copy of the payload: a
        # call waiting for its client holds one response message, not two
        pending = bytearray(PREFIX.pack(0, len(payload)))  # bytes for the next frame
        body, offset = memoryview(payload), 0
        try:
            while pending or offset < len(body):
                window = self.http2.local_flow_control_window(call.stream_id)
                if window <= 0:
                    self.flush()
                    await self._wait_for_window(call)
                    continue
                if self.writer.transport.get_write_buffer_size() > WRITE_LIMIT:
                    await self.drain()  # the client's window is no bound on what it reads
                    continue
                size = min(window, self.http2.max_outbound_frame_size, SEND_CHUNK)
                if len(pending) < size:
                    taken = body[offset : offset + size - len(pending)]
                    pending += taken
                    offset += len(taken)
                self.http2.send_data(call.stream_id, bytes(pending[:size]))
                del pending[:size]
                if self._connection_waiters:
                    self._wake_connection_waiter()  # the window left is the next one's
                if pending or offset < len(body) or not last:
                    self.flush()  # the last frame of a `last` message goes with its trailers
        finally:
            if self._connection_waiters:  # however this ends: the next one's turn
                self._wake_connection_waiter()
        if not last:
            await self.drain()

    def finish(self, call: _Call, code: StatusCode, details: str = "") -> None:
        """End the call with its status (trailers, or trailers only if nothing was sent)."""
        if call.finished:
            return
        call.finished = True
        call.code = code
        status: tuple[tuple[str, str], ...] = (("grpc-status", str(int(code))),)
        if details:
            status += (("grpc-message", encode_grpc_message(details)),)
        with contextlib.suppress(LocalProtocolError):  # the stream is gone: the client left
            if call.headers_sent:
                self.http2.send_headers(call.stream_id, status, end_stream=True)
            else:
                call.headers_sent = True
                self.http2.send_headers(call.stream_id, RESPONSE_HEADERS + status, end_stream=True)
            if not call.ended:  # the client is still sending: it need not (grpc-go does this)
                self.http2.reset_stream(call.stream_id, ErrorCode.NO_ERROR)
        self._forget(call)  # what it held is given back to the connection's window
        self._acknowledge_waiting()  # and is free for the others
        self.flush()

    # -- reading -------------------------------------------------------------------------

    async def serve(self) -> None:
        self.http2.initiate_connection()
        self.flush()
        # one deadline for the whole handshake, however slowly it trickles in
        handshake_ends = asyncio.get_running_loop().time() + HANDSHAKE_TIMEOUT
        try:
            while not self.closed:
                if self.greeted:
                    data = await self.reader.read(READ_SIZE)
                else:
                    try:
                        async with asyncio.timeout_at(handshake_ends):
                            data = await self.reader.read(READ_SIZE)
                    except TimeoutError:
                        log.info("gRPC client dropped: no HTTP/2 preface in %ss", HANDSHAKE_TIMEOUT)
                        return
                if not data:
                    return
                try:
                    events = self.http2.receive_data(data)
                except RemoteProtocolError as exc:
                    log.warning("gRPC client dropped: HTTP/2 protocol error: %s", exc)
                    self.flush()  # the GOAWAY says why
                    return
                for index, event in enumerate(events, 1):
                    if self.failed():
                        break  # nothing more of this client is taken
                    while isinstance(event, RequestReceived) and (
                        self.running >= MAX_CONCURRENT_CALLS
                    ):
                        self.flush()  # Rapid Reset: nothing more is read until one ends
                        await self._handler_ended.wait()
                    self._dispatch(event)
                    if index % YIELD_EVERY == 0:  # a flood (rapid resets) shares the loop
                        self.flush()
                        await asyncio.sleep(0)
                self.flush()
                if self.writer.transport.get_write_buffer_size() > WRITE_LIMIT:
                    await self.drain()  # a client that does not read is not read from
        except (OSError, ConnectionError):
            pass
        except Exception:  # a bug of this module: this client is dropped, not the process
            log.exception("gRPC connection failed")
        finally:
            await self.close()

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, RequestReceived):
            self._begin(event.stream_id, event.headers)
        elif isinstance(event, DataReceived):
            self._data(event.stream_id, event.data, event.flow_controlled_length)
        elif isinstance(event, StreamEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                self._end_of_requests(call)
        elif isinstance(event, StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                self._forget(call)  # the stream is gone; the connection's credit is not
                call.finished = True
                if call.task is not None:
                    call.task.cancel()  # the client gave up on it (a sender blocked too)
        elif isinstance(event, WindowUpdated):
            self.greeted = True
            if event.stream_id == 0:
                self._wake_connection_waiter()
            else:
                self._wake_stream_waiters(event.stream_id)
        elif isinstance(event, SettingsReceived):
            self.greeted = True  # the first SETTINGS (the preface was checked before it)
            if INITIAL_WINDOW_SIZE in event.changed:  # every stream's window moved
                self._wake_stream_waiters(None)
        elif isinstance(event, ConnectionTerminated):
            self.closed = True  # the client's GOAWAY: nothing more can be sent

    def _ended(self, call: _Call, task: asyncio.Task[None]) -> None:
        """A handler's task is done, however (one cancelled before its first step never
        ran its own `finally`)."""
        self.running -= 1
        self._handler_ended.set()
        self._handler_ended = asyncio.Event()
        self._forget(call)
        call.release()

    def failed(self) -> bool:
        """Closed while its events were handled (`fail`, the client's GOAWAY)."""
        return self.closed

    def _begin(self, stream_id: int, raw_headers: Any) -> None:
        if stream_id not in self.http2.streams:
            return  # reset in the read that opened it (by the client, or for its error)
        if self.draining:
            self.http2.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)  # retried elsewhere
            return
        problem = malformed_headers(raw_headers)
        if problem is not None:
            log.info("gRPC request refused: %s", problem)
            self.http2.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        headers: dict[str, str] = {}
        metadata: list[tuple[str, str]] = []
        for name_raw, value_raw in raw_headers:
            name = bytes(name_raw).decode("latin-1")
            value = bytes(value_raw).decode("utf-8", "replace")
            headers[name] = value
            if not name.startswith(":") and not name.endswith("-bin"):
                metadata.append((name, value))
        content_type = headers.get("content-type", "")
        if headers.get(":method") != "POST" or not content_type.startswith("application/grpc"):
            self.http2.send_headers(stream_id, ((":status", "415"),), end_stream=True)
            if stream_id in self.http2.streams:  # the client may still send: it need not
                self.http2.reset_stream(stream_id, ErrorCode.NO_ERROR)
            return
        service, _, method = headers.get(":path", "").lstrip("/").rpartition("/")
        route = self.server.routes.get((service, method))
        if route is None:
            call = _Call(stream_id, Route(None, None), metadata)  # answered, then reset
            self.finish(call, StatusCode.UNIMPLEMENTED, f"unknown method {service}/{method}")
            return
        call = _Call(stream_id, route, metadata, f"{service}/{method}")
        timeout = headers.get("grpc-timeout")
        if timeout is not None:
            call.timeout = parse_timeout(timeout)
            if call.timeout is None:
                self.finish(call, StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
                return
        self.calls[stream_id] = call
        call.task = asyncio.create_task(self._serve_call(call), name=f"grpc {service}/{method}")
        self.running += 1
        call.task.add_done_callback(functools.partial(self._ended, call))
        self.server.begun(call.task)

    def _data(self, stream_id: int, data: bytes, flow_controlled: int) -> None:
        call = self.calls.get(stream_id)
        if call is None or call.finished:
            if flow_controlled:  # a call already answered: its bytes still count
                self.http2.acknowledge_received_data(flow_controlled, stream_id)
            return
        call.unacknowledged += flow_controlled
        try:
            messages = call.reader.feed(data)
        except Aborted as exc:
            self._abort(call, exc.code, exc.details)
            return
        if messages and not call.route.client_streaming and (call.received or len(messages) > 1):
            # one request message, as grpc-go enforces: more would pile up unread
            self._abort(call, StatusCode.INTERNAL, "more than one request message")
            return
        for message in messages:
            call.received += 1
            # empty messages count too: a stream of them must not pile up unacknowledged
            call.held += len(message) + MESSAGE_OVERHEAD
            call.inbox.put_nowait(message)
        self._count(call)
        if call.unacknowledged:
            self._defer(call)  # before the choice below: this call may be the one
        if call.held < HELD_LIMIT:
            if self.held_bytes < CONNECTION_BUDGET:
                self._acknowledge(call)
            else:
                self._acknowledge_waiting()

    def _abort(self, call: _Call, code: StatusCode, details: str) -> None:
        """End a call for what its client sent: its handler stops, the client is told."""
        if call.task is not None:
            call.task.cancel()
        self.finish(call, code, details)

    def _defer(self, call: _Call) -> None:
        """The call's data waits for an acknowledgement; one furthest into a message is
        found through a heap (lazily cleaned), not a scan: over the budget, a scan of
        the waiting calls at each DATA frame cost O(calls) a frame (a review: 6.9 ms an
        empty frame with 16,000 calls waiting)."""
        self._deferred[call.stream_id] = call
        self._push_partial(call)

    def _push_partial(self, call: _Call) -> None:
        if not call.reader.buffered:
            return
        heapq.heappush(self._partial, (-call.reader.buffered, call.stream_id))
        if len(self._partial) > 2 * len(self._deferred) + 64:  # mostly stale: rebuilt
            begun = [c for c in self._deferred.values() if c.reader.buffered]
            self._partial = [(-c.reader.buffered, c.stream_id) for c in begun]
            heapq.heapify(self._partial)

    def _furthest(self) -> _Call | None:
        """The waiting call furthest into a message that may take more (held below
        HELD_LIMIT), or None; stale heap entries are dropped on the way."""
        while self._partial:
            negative, stream_id = self._partial[0]
            call = self._deferred.get(stream_id)
            if call is not None and call.reader.buffered == -negative and call.held < HELD_LIMIT:
                return call
            heapq.heappop(self._partial)
        return None

    def _count(self, call: _Call) -> None:
        """Keep `held_bytes` in step with what a call holds. A sum over the calls at
        each DATA frame made a flood of empty frames cost O(calls) each (a review: 1 MiB
        of them took 21 s of CPU with 1000 calls open)."""
        if self.calls.get(call.stream_id) is call:
            now = call.held + call.reader.buffered
            self.held_bytes += now - call.counted
            call.counted = now

    def _forget(self, call: _Call) -> None:
        """The call leaves the connection's books (answered, reset, or gone); what it
        received counts against the connection's window no more."""
        self._acknowledge(call)
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
            self.held_bytes -= call.counted
            call.counted = 0
        self._deferred.pop(call.stream_id, None)

    def _acknowledge_waiting(self) -> None:
        """Calls held back by the connection's budget: all of them once it has room; past
        it, the one furthest into a message, so that one message always completes (each
        call waiting for the others to finish theirs would wait for ever)."""
        if not self._deferred:
            return
        if self.held_bytes < CONNECTION_BUDGET:
            # those held at HELD_LIMIT stay: at most the budget's worth of them
            for call in [c for c in self._deferred.values() if c.held < HELD_LIMIT]:
                self._acknowledge(call)
            return
        furthest = self._furthest()  # None: the handlers must take their messages first
        if furthest is not None:
            self._acknowledge(furthest)

    def _acknowledge(self, call: _Call) -> None:
        if call.unacknowledged:
            self.http2.acknowledge_received_data(call.unacknowledged, call.stream_id)
            call.unacknowledged = 0
        self._deferred.pop(call.stream_id, None)

    def _end_of_requests(self, call: _Call) -> None:
        call.ended = True
        call.inbox.put_nowait(_END)

    # -- one call --------------------------------------------------------------------------

    async def _next_request(self, call: _Call) -> Any:
        """The next request message, decoded; _END once the client has finished."""
        payload = await call.inbox.get()
        if payload is _END:
            if call.reader.partial:
                raise Aborted(StatusCode.INTERNAL, "the request stream ended inside a message")
            return _END
        call.held -= len(payload) + MESSAGE_OVERHEAD
        self._count(call)
        if call.stream_id in self._deferred:  # it may take more now
            self._push_partial(call)
        if call.held < HELD_LIMIT:
            self._acknowledge_waiting()
            self.flush()
        try:
            return call.route.request_cls.FromString(payload)
        except Exception as exc:  # google.protobuf.message.DecodeError
            raise Aborted(
                StatusCode.INVALID_ARGUMENT,
                f"malformed {call.route.request_cls.DESCRIPTOR.full_name}: {exc}",
            ) from exc

    async def _requests(self, call: _Call) -> AsyncIterator[Any]:
        while True:
            request = await self._next_request(call)
            if request is _END:
                return
            yield request

    async def _serve_call(self, call: _Call) -> None:
        try:
            try:
                async with asyncio.timeout(call.timeout) as deadline:
                    await self._answer(call, call.route)
            except TimeoutError:
                if not deadline.expired():
                    raise  # the handler's own: a bug, answered below
                raise Aborted(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
            self.finish(call, StatusCode.OK)
        except Aborted as aborted:
            self.finish(call, aborted.code, aborted.details)
        except asyncio.CancelledError:
            if not call.finished:  # the server is stopping, not the client resetting
                self.finish(call, StatusCode.UNAVAILABLE, "berth-grpc is stopping: call again")
            raise
        except (OSError, LocalProtocolError) as exc:
            if self._gone(call):
                call.finished = True  # the client left, or reset the call
            else:  # the handler's own (a TimeoutError is an OSError): a bug, answered
                log.exception("gRPC %s failed", call.path)
                self.finish(call, StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug of this front end: answered, logged, never silent
            log.exception("gRPC %s failed", call.path)
            self.finish(call, StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self._forget(call)
            if log.isEnabledFor(logging.DEBUG):  # each call, as `--log-level debug` asks
                ended = call.code.name if call.code is not None else "client gone"
                elapsed = (time.monotonic() - call.started) * 1000
                log.debug("%s: %s in %.1f ms", call.path, ended, elapsed)

    def _gone(self, call: _Call) -> bool:
        """The call's client is gone: the connection, or the call's stream."""
        return (
            self.closed
            or self.writer.transport.is_closing()
            or call.stream_id not in self.http2.streams
        )

    async def _answer(self, call: _Call, route: Route) -> None:
        context = Context(call.metadata)
        if route.client_streaming:
            request: Any = self._requests(call)
        else:
            request = await self._next_request(call)
            if request is _END:
                raise Aborted(StatusCode.INTERNAL, "the call carried no request message")
        if route.server_streaming:
            responses = route.handler(request, context)
            try:
                async for response in responses:
                    await self.send_message(call, response.SerializeToString())
            finally:
                await responses.aclose()
        else:
            response = await route.handler(request, context)
            await self.send_message(call, response.SerializeToString(), last=True)

    # -- stopping --------------------------------------------------------------------------

    def goaway(self) -> None:
        """Ask the client to open new calls elsewhere; the calls begun go on."""
        if self.draining or self.closed or self.writer.transport.is_closing():
            return
        self.draining = True
        self.http2.goaway(ErrorCode.NO_ERROR)
        self.flush()

    async def close(self) -> None:
        """Cancel the calls and close the socket; bounded, even for a client that reads
        nothing (what is queued for it is dropped after CLOSE_TIMEOUT)."""
        self.flush()
        self.closed = True  # the cancelled calls' answers have nowhere to go
        tasks = [c.task for c in self.calls.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):  # not wait_for: see client.connect
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ConnectionError):
            self.writer.transport.abort()


class Server:
    """The gRPC listener: its connections, and the calls in flight on them (a stop asks
    clients to go elsewhere and lets those calls finish, within a grace period)."""

    def __init__(self, routes: dict[tuple[str, str], Route]) -> None:
        self.routes = routes
        self._calls: set[asyncio.Task[None]] = set()
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._listener: asyncio.Server | None = None
        self.max_connections = connection_limit()
        self._refused = 0  # clients closed at once for max_connections, logged now and then

    async def listen(self, path: str) -> None:
        self._listener = await asyncio.start_unix_server(
            self._connection, path=path, limit=READ_SIZE
        )

    def begun(self, task: asyncio.Task[None]) -> None:
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            if self._refused % 1000 == 0:
                log.warning(
                    "gRPC client refused: %d connections already (%d refused)",
                    len(self._connections),
                    self._refused + 1,
                )
            self._refused += 1
            writer.transport.abort()  # nothing is queued: the descriptor is freed at once
            return
        connection = _Connection(self, reader, writer)
        self._connections[task] = connection
        try:
            await connection.serve()
        finally:
            self._connections.pop(task, None)

    async def stop(self, grace: float) -> None:
        if self._listener is not None:
            self._listener.close()
        for connection in self._connections.values():
            connection.goaway()
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=grace)
        for task in list(self._calls):  # answered UNAVAILABLE: the client calls again
            task.cancel()
        if self._calls:
            await asyncio.wait(list(self._calls), timeout=1.0)
        await asyncio.gather(*(c.close() for c in list(self._connections.values())))
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
