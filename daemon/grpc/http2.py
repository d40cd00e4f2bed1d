"""HTTP/2 for a gRPC server, sans-IO (RFC 9113): bytes in, typed events out; answers in,
bytes out. No socket, no clock, no task: `h2server` drives it on asyncio.

Why not h2, python-hyper's full HTTP/2 state machine, which berth-grpc used before: for
a small unary call (containerd's clients make 40 of them per `ctr run --rm`) h2 and
hyperframe were ~40% of berth-grpc's CPU, profiled; every frame passed through generic
frame objects, a per-stream state machine with its own validation and eager debug
formatting. A gRPC server needs a narrow part of HTTP/2: no push, no priorities, no
CONNECT, no upgrade, requests only from the client. That part is written here against
the RFC; header compression stays with `hpack` (the same project's HPACK codec, Huffman
and dynamic table included) for what clients send.

What this connection takes on itself, so that its user cannot get it wrong:
- every frame header is checked against SETTINGS_MAX_FRAME_SIZE as it arrives, before
  any of its body is buffered; a header block is bounded (`max_header_list_size` plus
  HEADER_BLOCK_SLACK encoded, MAX_CONTINUATIONS frames, MAX_TABLE_SIZE_UPDATES, and
  `max_header_list_size` decoded);
- HEADERS for a stream that is already gone (reset by this side, whose peer's frames
  may still be in flight) are decoded, to keep the table in step, and ignored;
- the peer's SETTINGS are applied and acknowledged, its PINGs answered, its flow-control
  windows kept (a send past them is a local error, never a frame);
- received data is acknowledged (WINDOW_UPDATE) only as the user says it was taken
  (`acknowledge_received_data`), batched to one update per half window; data for a
  stream that is gone is acknowledged for the connection at once (no event);
- streams past `max_concurrent_streams` are refused (REFUSED_STREAM, which gRPC clients
  retry); a stream error resets that stream and reports it as `StreamReset`, so the user
  ends its call; a connection error queues a GOAWAY and raises `RemoteProtocolError`.

The encoder never uses HPACK's dynamic table (its first header block sets the table
size to 0, RFC 7541 6.3), so the peer's SETTINGS_HEADER_TABLE_SIZE can never be broken.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable

from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">HBBBI")  # length (3 bytes: 2 + 1), type, flags, stream id
WINDOW_INCREMENT = struct.Struct(">I")
SETTING = struct.Struct(">HI")
GOAWAY = struct.Struct(">II")
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1
# An encoded header block is never longer than its decoded list counts (32 bytes a field
# on top of name and value, RFC 7541 4.1), but for two table size updates at its start:
# a block longer than the list's limit plus this is refused before hpack reads it.
HEADER_BLOCK_SLACK = 64
MAX_TABLE_SIZE_UPDATES = 2  # at a block's start (RFC 7541 4.2); hpack takes any number
MAX_CONTINUATIONS = 64  # CONTINUATION frames of one header block

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY_TYPE = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 1, 2, 3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 4, 5, 6
ENABLE_CONNECT_PROTOCOL = 8


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class RemoteProtocolError(Exception):
    """The peer broke HTTP/2: the connection is over, its GOAWAY (with `code`) queued."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code


class LocalProtocolError(Exception):
    """This side asked for something HTTP/2 forbids (a bug of the caller, or a race with
    the peer that the caller handles)."""


class StreamClosedError(LocalProtocolError):
    """The stream is gone (ended both ways, or reset by either side)."""


class _StreamError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# -- events --------------------------------------------------------------------------------


class RequestReceived:
    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived:
    __slots__ = ("data", "flow_controlled_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length  # with padding: acknowledge it


class StreamEnded:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset:
    """The stream is gone: reset by the peer (`remote`), or by this side for the peer's
    stream error (its RST_STREAM is queued)."""

    __slots__ = ("error_code", "remote", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote: bool = True) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote = remote


class WindowUpdated:
    """The peer opened a window (stream 0: the connection's). A change of every stream's
    by SETTINGS_INITIAL_WINDOW_SIZE comes as `SettingsReceived`."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class SettingsReceived:
    __slots__ = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


class ConnectionTerminated:
    """The peer's GOAWAY: it opens no more streams, and nothing more can be sent."""

    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


Event = (
    RequestReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | SettingsReceived
    | ConnectionTerminated
)


# -- header encoding -----------------------------------------------------------------------

_STATIC_NAMES = {b":status": 8, b"content-type": 31}  # RFC 7541 appendix A
_STATIC_PAIRS = {(b":status", b"200"): 8}
_TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update to 0 (RFC 7541 6.3)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `first`'s high bits as the pattern."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    return _integer(len(value), 7, 0x00) + value  # never Huffman-coded


@functools.lru_cache(maxsize=64)  # a call's headers and trailers are mostly the same few
def encode_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    """A header block without the dynamic table: static-table pairs indexed, the rest
    literal and never indexed into the peer's table (RFC 7541 6.2.2)."""
    out = bytearray()
    for name_text, value_text in headers:
        name, value = name_text.encode("latin-1"), value_text.encode("utf-8")
        index = _STATIC_PAIRS.get((name, value))
        if index is not None:
            out += _integer(index, 7, 0x80)
            continue
        name_index = _STATIC_NAMES.get(name)
        if name_index is not None:
            out += _integer(name_index, 4, 0x10)
        else:
            out += b"\x10" + _string(name)
        out += _string(value)
    return bytes(out)


def _table_size_updates(block: bytes) -> int:
    """How many dynamic table size updates (001xxxxx, a 5-bit prefix integer) begin the
    block: hpack decodes any number of them, one Python loop each (a 64 KiB block of
    them held the loop for ~0.1 s), where RFC 7541 4.2 allows two."""
    count = at = 0
    while at < len(block) and block[at] & 0xE0 == 0x20:
        count += 1
        if count > MAX_TABLE_SIZE_UPDATES:
            break
        at += 1
        if block[at - 1] & 0x1F == 0x1F:  # the integer goes on while the high bit is set
            while at < len(block) and block[at] & 0x80:
                at += 1
            at += 1
    return count


# -- the connection ------------------------------------------------------------------------


class _Stream:
    __slots__ = ("local_ended", "receive_window", "remote_ended", "send_window", "unacknowledged")

    def __init__(self, send_window: int, receive_window: int) -> None:
        self.send_window = send_window
        self.receive_window = receive_window  # what the peer may still send
        self.unacknowledged = 0  # taken by the user, not yet given back to the peer
        self.remote_ended = False
        self.local_ended = False


class ServerConnection:
    """The server's side of one HTTP/2 connection.

    `receive_data(bytes) -> [events]` (raises `RemoteProtocolError`); `send_headers`,
    `send_data`, `reset_stream`, `acknowledge_received_data`, `goaway` queue frames;
    `data_to_send()` takes what is queued."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 100,
        initial_window_size: int = DEFAULT_WINDOW,
        connection_window: int = DEFAULT_WINDOW,
        max_header_list_size: int = 65536,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size  # ours: what a stream may receive
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        self.max_inbound_frame_size = DEFAULT_MAX_FRAME  # ours: never raised
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME  # the peer's
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # the connection's, for what this side sends
        # the peer may send until we announce more: SETTINGS' window counts once the
        # peer has it, and being generous early is harmless (RFC 9113 6.9.2)
        self.receive_window = connection_window
        self.unacknowledged = 0  # connection-level bytes taken, not yet given back
        self.highest_inbound_stream_id = 0
        self.streams: dict[int, _Stream] = {}
        self.closed = False  # a GOAWAY for an error is queued, or the peer's came
        self._max_block = max_header_list_size + HEADER_BLOCK_SLACK
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self._decoder.max_allowed_table_size = 4096  # SETTINGS_HEADER_TABLE_SIZE: default
        self._buffer = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        self._block: bytearray | None = None  # a header block begun, waiting for its end
        self._block_stream = 0
        self._block_end_stream = False
        self._block_frames = 0
        self._out: list[bytes] = []
        self._table_size_sent = False

    # -- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        length = len(payload)
        self._out.append(
            FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload
        )

    def initiate_connection(self) -> None:
        """The server's preface: its SETTINGS, and the connection's window opened."""
        settings = (
            SETTING.pack(MAX_CONCURRENT_STREAMS, self.max_concurrent_streams)
            + SETTING.pack(INITIAL_WINDOW_SIZE, self.initial_window_size)
            + SETTING.pack(MAX_HEADER_LIST_SIZE, self.max_header_list_size)
        )
        self._frame(SETTINGS, 0, 0, settings)
        if self.connection_window > DEFAULT_WINDOW:
            increment = self.connection_window - DEFAULT_WINDOW
            self._frame(WINDOW_UPDATE, 0, 0, WINDOW_INCREMENT.pack(increment))

    def local_flow_control_window(self, stream_id: int) -> int:
        """Bytes of DATA this side may send on the stream now."""
        stream = self._open_stream(stream_id)
        return min(self.send_window, stream.send_window)

    def _open_stream(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_ended:
            raise StreamClosedError(f"stream {stream_id} is closed")
        return stream

    def send_headers(
        self, stream_id: int, headers: tuple[tuple[str, str], ...], end_stream: bool = False
    ) -> None:
        stream = self._open_stream(stream_id)
        block = encode_headers(headers)
        if not self._table_size_sent:
            self._table_size_sent = True
            block = _TABLE_SIZE_ZERO + block
        size = self.max_outbound_frame_size
        first, rest = block[:size], block[size:]
        flags = (END_STREAM if end_stream else 0) | (0 if rest else END_HEADERS)
        self._frame(HEADERS, flags, stream_id, first)
        while rest:
            piece, rest = rest[:size], rest[size:]
            self._frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, piece)
        if end_stream:
            self._end_locally(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._open_stream(stream_id)
        if len(data) > min(self.send_window, stream.send_window):
            raise LocalProtocolError(f"{len(data)} bytes exceed stream {stream_id}'s window")
        if len(data) > self.max_outbound_frame_size:
            raise LocalProtocolError(f"{len(data)} bytes exceed the peer's frame size")
        self.send_window -= len(data)
        stream.send_window -= len(data)
        self._frame(DATA, END_STREAM if end_stream else 0, stream_id, data)
        if end_stream:
            self._end_locally(stream_id, stream)

    def _end_locally(self, stream_id: int, stream: _Stream) -> None:
        stream.local_ended = True
        if stream.remote_ended:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.NO_ERROR) -> None:
        """End the stream both ways; nothing for a stream already gone (the peer's reset
        may have come in the same read as its request: events are all made first)."""
        if self.streams.pop(stream_id, None) is not None:
            self._frame(RST_STREAM, 0, stream_id, WINDOW_INCREMENT.pack(error_code))

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """`size` flow-controlled bytes of the stream were taken: the peer may send that
        much more. Given back in one WINDOW_UPDATE per half window (h2 and grpc-go do the
        same), at once when the window is below half."""
        if size <= 0:
            return
        self._give_back_connection(size)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_ended:
            return  # nothing more will come on it: its window does not matter
        stream.unacknowledged += size
        if stream.receive_window < self.initial_window_size // 2:
            stream.receive_window += stream.unacknowledged
            self._frame(WINDOW_UPDATE, 0, stream_id, WINDOW_INCREMENT.pack(stream.unacknowledged))
            stream.unacknowledged = 0

    def _give_back_connection(self, size: int) -> None:
        self.unacknowledged += size
        if self.unacknowledged and self.receive_window < self.connection_window // 2:
            self.receive_window += self.unacknowledged
            self._frame(WINDOW_UPDATE, 0, 0, WINDOW_INCREMENT.pack(self.unacknowledged))
            self.unacknowledged = 0

    def goaway(self, error_code: int = ErrorCode.NO_ERROR, reason: bytes = b"") -> None:
        """Tell the peer to open no more streams; those it opened (up to the highest seen)
        may still be answered: the user decides whether the connection goes on."""
        payload = GOAWAY.pack(self.highest_inbound_stream_id, error_code) + reason
        self._frame(GOAWAY_TYPE, 0, 0, payload)

    def _connection_error(self, code: ErrorCode, reason: str) -> RemoteProtocolError:
        if not self.closed:
            self.closed = True
            self.goaway(code, reason.encode("utf-8", "replace")[:256])
        return RemoteProtocolError(code, reason)

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events `data` completes. After a connection error or the peer's GOAWAY,
        nothing more is read."""
        if self.closed:
            return []
        buffer = self._buffer
        buffer += data
        events: list[Event] = []
        at = 0
        if not self._preface_seen:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(buffer)):
                    raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "not HTTP/2")
                return events
            if buffer[: len(PREFACE)] != PREFACE:
                raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "not HTTP/2")
            self._preface_seen = True
            at = len(PREFACE)
        try:
            while len(buffer) - at >= 9 and not self.closed:
                high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, at)
                length = (high << 8) | low
                stream_id &= 0x7FFFFFFF
                if length > self.max_inbound_frame_size:
                    raise self._connection_error(
                        ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes"
                    )
                if len(buffer) - at - 9 < length:
                    break
                payload = bytes(buffer[at + 9 : at + 9 + length])
                at += 9 + length
                self._receive_frame(kind, flags, stream_id, payload, events)
        finally:
            del buffer[:at]
        return events

    def _receive_frame(
        self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if not self._settings_seen and (kind != SETTINGS or flags & ACK):
            raise self._connection_error(
                ErrorCode.PROTOCOL_ERROR, "the client's preface must be a SETTINGS frame"
            )
        if self._block is not None and (kind != CONTINUATION or stream_id != self._block_stream):
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "a header block interrupted")
        handler = _HANDLERS.get(kind)
        if handler is None:
            return  # an unknown type is ignored (RFC 9113 5.5)
        try:
            handler(self, flags, stream_id, payload, events)
        except _StreamError as error:
            self._stream_error(stream_id, error.code, events)

    def _receive_ping(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != 0:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if not flags & ACK:
            self._frame(PING, ACK, 0, payload)

    def _receive_priority(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        """Priorities are not used (RFC 9113 deprecates them); the frame is checked."""
        if stream_id == 0:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")

    def _receive_goaway(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != 0:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
        last, code = GOAWAY.unpack_from(payload)
        self.closed = True
        events.append(ConnectionTerminated(code, last & 0x7FFFFFFF))

    def _receive_push_promise(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "a client's PUSH_PROMISE")

    def _stream_error(self, stream_id: int, code: ErrorCode, events: list[Event]) -> None:
        if self.streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, code, remote=False))
        self._frame(RST_STREAM, 0, stream_id, WINDOW_INCREMENT.pack(code))

    def _unpad(self, flags: int, payload: bytes, skip: int = 0) -> bytes:
        if not flags & PADDED:
            return payload[skip:] if skip else payload
        if not payload:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "padded frame without pad")
        padding = payload[0]
        if padding + skip >= len(payload):
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "padding exceeds the frame")
        return payload[1 + skip : len(payload) - padding]

    def _idle(self, stream_id: int) -> bool:
        return stream_id > self.highest_inbound_stream_id

    def _receive_data(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0 or self._idle(stream_id):
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
        length = len(payload)  # flow control counts the padding too
        if length > self.receive_window:
            raise self._connection_error(ErrorCode.FLOW_CONTROL_ERROR, "connection window")
        self.receive_window -= length
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None:  # gone (reset by either side, or answered): counted, dropped
            self._give_back_connection(length)
            return
        if stream.remote_ended:
            self._give_back_connection(length)
            raise _StreamError(ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
        if length > stream.receive_window:
            self._give_back_connection(length)
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "stream window")
        stream.receive_window -= length
        events.append(DataReceived(stream_id, data, length))
        if flags & END_STREAM:
            self._end_remotely(stream_id, stream, events)

    def _end_remotely(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        stream.remote_ended = True
        events.append(StreamEnded(stream_id))
        if stream.local_ended:
            del self.streams[stream_id]

    def _receive_headers(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "HEADERS on a bad stream")
        skip = 5 if flags & PRIORITY_FLAG else 0
        if len(payload) < skip + (1 if flags & PADDED else 0):
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
        block = self._unpad(flags, payload, skip)
        if len(block) > self._max_block:
            raise self._connection_error(ErrorCode.ENHANCE_YOUR_CALM, "header block too long")
        self._block = bytearray(block)
        self._block_stream = stream_id
        self._block_end_stream = bool(flags & END_STREAM)
        self._block_frames = 0
        if flags & END_HEADERS:
            self._end_block(events)

    def _receive_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._block is None:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION alone")
        self._block += payload
        self._block_frames += 1
        if len(self._block) > self._max_block or self._block_frames > MAX_CONTINUATIONS:
            raise self._connection_error(ErrorCode.ENHANCE_YOUR_CALM, "header block too long")
        if flags & END_HEADERS:
            self._end_block(events)

    def _end_block(self, events: list[Event]) -> None:
        assert self._block is not None
        block, stream_id = bytes(self._block), self._block_stream
        end_stream = self._block_end_stream
        self._block = None
        if _table_size_updates(block) > MAX_TABLE_SIZE_UPDATES:
            raise self._connection_error(ErrorCode.COMPRESSION_ERROR, "table size updates")
        try:  # decoded whatever becomes of the stream: the table must stay in step
            headers: list[tuple[bytes, bytes]] = list(self._decoder.decode(block, raw=True))
        except OversizedHeaderListError:
            raise self._connection_error(
                ErrorCode.ENHANCE_YOUR_CALM, "header list too large"
            ) from None
        except (HPACKError, ValueError, IndexError) as exc:
            raise self._connection_error(
                ErrorCode.COMPRESSION_ERROR, f"header block: {exc}"
            ) from None
        if not self._idle(stream_id):
            stream = self.streams.get(stream_id)
            if stream is None:
                return  # a stream already gone: ignored, like its data
            if stream.remote_ended:
                raise _StreamError(ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
            if not end_stream:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")
            self._end_remotely(stream_id, stream, events)  # trailers: nothing a gRPC call uses
            return
        self.highest_inbound_stream_id = stream_id
        if len(self.streams) >= self.max_concurrent_streams:
            self._frame(RST_STREAM, 0, stream_id, WINDOW_INCREMENT.pack(ErrorCode.REFUSED_STREAM))
            return
        stream = _Stream(self.peer_initial_window, self.initial_window_size)
        self.streams[stream_id] = stream
        events.append(RequestReceived(stream_id, headers))
        if end_stream:
            self._end_remotely(stream_id, stream, events)

    def _receive_reset(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id == 0 or self._idle(stream_id):
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        if len(payload) != 4:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if self.streams.pop(stream_id, None) is not None:
            (code,) = WINDOW_INCREMENT.unpack(payload)
            events.append(StreamReset(stream_id, code))

    def _receive_settings(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if stream_id != 0:
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with data")
            return
        if len(payload) % 6:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not 6-byte items")
        changed: dict[int, int] = {}
        for offset in range(0, len(payload), 6):
            code, value = SETTING.unpack_from(payload, offset)
            if code in (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL) and value > 1:
                raise self._connection_error(ErrorCode.PROTOCOL_ERROR, f"setting {code}: {value}")
            if code == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
                raise self._connection_error(ErrorCode.FLOW_CONTROL_ERROR, "initial window")
            if code == MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                raise self._connection_error(ErrorCode.PROTOCOL_ERROR, f"max frame size {value}")
            changed[code] = value
        if INITIAL_WINDOW_SIZE in changed:
            delta = changed[INITIAL_WINDOW_SIZE] - self.peer_initial_window
            self.peer_initial_window = changed[INITIAL_WINDOW_SIZE]
            for stream in self.streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise self._connection_error(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        if MAX_FRAME_SIZE in changed:
            self.max_outbound_frame_size = changed[MAX_FRAME_SIZE]
        if HEADER_TABLE_SIZE in changed:  # a decoder that lowered it waits for an update
            self._table_size_sent = False
        self._settings_seen = True
        self._frame(SETTINGS, ACK, 0)
        events.append(SettingsReceived(changed))

    def _receive_window_update(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if len(payload) != 4:
            raise self._connection_error(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        (increment,) = WINDOW_INCREMENT.unpack(payload)
        increment &= 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "a window update of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise self._connection_error(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            events.append(WindowUpdated(0))
            return
        if self._idle(stream_id):
            raise self._connection_error(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # gone: allowed, and ignored
        if increment == 0:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR, "a window update of 0")
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        events.append(WindowUpdated(stream_id))


_Handler = Callable[[ServerConnection, int, int, bytes, list[Event]], None]
_HANDLERS: dict[int, _Handler] = {
    DATA: ServerConnection._receive_data,
    HEADERS: ServerConnection._receive_headers,
    PRIORITY: ServerConnection._receive_priority,
    RST_STREAM: ServerConnection._receive_reset,
    SETTINGS: ServerConnection._receive_settings,
    PUSH_PROMISE: ServerConnection._receive_push_promise,
    PING: ServerConnection._receive_ping,
    GOAWAY_TYPE: ServerConnection._receive_goaway,
    WINDOW_UPDATE: ServerConnection._receive_window_update,
    CONTINUATION: ServerConnection._receive_continuation,
}
