"""berth's wire protocol, sans-IO: bytes in, typed events out, and back.

One protocol for every hop (CLI -> berthd, berthd -> shim, berthd -> zygote). Like h11, the
`Connection` object owns no socket: the caller feeds it received bytes and writes the bytes
`send()` returns. That keeps it testable with plain bytes and usable from trio (daemon),
a selectors loop (shim) and blocking sockets (CLI).

Framing: a 4-byte big-endian length, then one msgpack document (a list) of that length.

    HELLO    [0, versions:[int], peer:str]          client -> server, first frame
    WELCOME  [1, version:int, peer:str]             server -> client, answer to HELLO
    REQUEST  [2, id:int, method:str, params:map, meta:map]
    RESPONSE [3, id:int, result]                    final frame of a request
    ERROR    [4, id:int|nil, code:str, message:str] final frame of a request; nil id: the
                                                    error concerns the connection/frame
    ITEM     [5, id:int, item]                      one item of a server-to-client stream
    END      [6, id:int]                            final frame of a stream
    CANCEL   [7, id:int]                            client asks the server to finish early

Rules, checked on both sides:
  1. The client sends HELLO first and nothing else until WELCOME arrives; the server picks
     the highest version both support. No common version is fatal.
  2. Every REQUEST gets exactly one final frame (RESPONSE, ERROR or END), even after CANCEL.
     ITEMs for a request come before its final frame.
  3. Every buffer is bounded. A frame longer than `max_frame_size` is skipped without being
     buffered and reported as a RemoteProtocolError; the connection stays usable, because
     the length prefix keeps frame boundaries intact. So does a frame that is not valid
     msgpack or not a valid message.

Errors: `RemoteProtocolError` means the peer broke the rules (answer it and carry on unless
`fatal`); `LocalProtocolError` means this side's caller did (a bug here).
"""

from __future__ import annotations

import struct

from berth.shim.wire import packing
from berth.shim.wire.errors import BerthError, error_from_wire

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Final

    _Prepared = tuple[list[Any], Callable[[], None] | None]

# Plain slotted classes, not dataclasses/enum/typing at run time: this module is imported
# by every CLI invocation, and those three cost ~10 ms of start-up (measured).

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)
HEADER: Final = struct.Struct(">I")
DEFAULT_MAX_FRAME: Final = 4 * 1024 * 1024
MAX_METHOD_LEN: Final = 128
MAX_REQUEST_ID: Final = 2**63 - 1
# Request params and meta nest at most this deep. msgpack alone accepts ~1,000 levels,
# and a handler that later walks or JSON-encodes such a value (a container's spec is
# stored as JSON) died with RecursionError; real requests nest fewer than 10 levels.
MAX_NESTING: Final = 64
# Slack the caller may feed beyond one maximal frame before it must drain next_event().
FEED_SLACK: Final = 256 * 1024

_HELLO, _WELCOME, _REQUEST, _RESPONSE, _ERROR, _ITEM, _END, _CANCEL = range(8)


class ProtocolError(Exception):
    """Base class for protocol violations."""


class LocalProtocolError(ProtocolError):
    """This side's caller broke a protocol rule: a bug in this process."""


class ConnectionEnded(LocalProtocolError):
    """A send after the connection ended (the peer closed it, or broke it): not a bug of
    the caller's, who may learn of the end only now (a reply to a call it was serving)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke a protocol rule.

    `fatal`: the connection cannot continue (close it). Otherwise the offending frame has
    been consumed and the caller should answer (ERROR with `request_id`, which may be None)
    and carry on.
    """

    def __init__(
        self,
        message: str,
        *,
        fatal: bool = False,
        request_id: int | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.fatal = fatal
        self.request_id = request_id
        self.code = code  # the peer's error code, when it refused the handshake with one


class Role:
    CLIENT = "client"
    SERVER = "server"


# --- events ---------------------------------------------------------------------------


class _Event:
    """Value semantics from __slots__: equality and repr over the fields."""

    __slots__: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Hello(_Event):
    __slots__ = ("peer", "versions")

    def __init__(self, versions: tuple[int, ...] = SUPPORTED_VERSIONS, peer: str = "") -> None:
        self.versions = versions
        self.peer = peer


class Welcome(_Event):
    __slots__ = ("peer", "version")

    def __init__(self, version: int = PROTOCOL_VERSION, peer: str = "") -> None:
        self.version = version
        self.peer = peer


class Request(_Event):
    __slots__ = ("id", "meta", "method", "params")

    def __init__(
        self,
        id: int,
        method: str,
        params: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.method = method
        self.params: dict[str, Any] = params if params is not None else {}
        self.meta: dict[str, Any] = meta if meta is not None else {}


class Response(_Event):
    __slots__ = ("id", "result")

    def __init__(self, id: int, result: Any = None) -> None:
        self.id = id
        self.result = result


def sendable_text(text: str) -> str:
    """`text` as UTF-8 can carry it. An error may name a path read from a tar or a
    directory, whose undecodable bytes Python keeps as lone surrogates (surrogateescape):
    unsendable, such an error ended the connection instead of reaching its caller. Those
    bytes are shown as `\\xNN`, any other lone surrogate as `\\udNNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    # Imported here, for the rare text that needs it: `re` (with enum) was ~2 ms of
    # every CLI start, which imports this module and nothing else that needs `re`.
    import re

    text = re.sub(_NOT_A_BYTE, lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_NOT_A_BYTE = "[\ud800-\udc7f\udd00-\udfff]"  # surrogateescape: DC80-DCFF (re caches it)


class ErrorReply(_Event):
    __slots__ = ("code", "id", "message")

    def __init__(self, id: int | None, code: str, message: str) -> None:
        self.id = id
        self.code = code
        self.message = sendable_text(message)

    @classmethod
    def from_exception(cls, request_id: int | None, exc: BerthError) -> ErrorReply:
        return cls(request_id, exc.code, exc.message)

    def to_exception(self) -> BerthError:
        return error_from_wire(self.code, self.message)


class StreamItem(_Event):
    __slots__ = ("id", "item")

    def __init__(self, id: int, item: Any) -> None:
        self.id = id
        self.item = item


class StreamEnd(_Event):
    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id


class Cancel(_Event):
    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id


class ConnectionClosed(_Event):
    """The peer closed its side cleanly, at a frame boundary."""

    __slots__ = ()


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

if TYPE_CHECKING:
    Event = Hello | Welcome | Request | Response | ErrorReply | StreamItem | StreamEnd | Cancel
    ReceivedEvent = Event | ConnectionClosed | NeedData


_msgpack: Any = None  # the C `msgpack` package, loaded on first use: the CLI never loads it


def _load_msgpack() -> Any:
    global _msgpack
    import msgpack

    _msgpack = msgpack
    return msgpack


def encode(obj: Any) -> bytes:
    """msgpack-encode a body (no frame header) with the C `msgpack` package."""
    return (_msgpack or _load_msgpack()).packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes) -> Any:
    """Decode one msgpack document. msgpack bounds every container length by len(data) and
    refuses deep nesting (StackError), so a small frame cannot make us allocate much."""
    return (_msgpack or _load_msgpack()).unpackb(
        data, raw=False, strict_map_key=True, use_list=True
    )


class Codec:
    """How a frame's body becomes bytes and back. Both read and write the same format;
    they differ in what they cost to load and to run. `load`, if any, readies the codec
    when a connection is made, not in the middle of its first frame."""

    __slots__ = ("decode", "encode", "load")

    def __init__(
        self,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        load: Callable[[], object] | None = None,
    ) -> None:
        self.encode = encode
        self.decode = decode
        self.load = load


# Frames of this size or more the CLI decodes with the C package after all: pure Python reads
# structured data at ~4 MB/s (100 containers with their specs: 19 ms against msgpack's 2),
# so past ~16 KiB loading msgpack (~5 ms) costs less than not loading it.
LEAN_DECODE_LIMIT: Final = 16 * 1024


def _lean_decode(data: bytes) -> Any:
    return packing.unpack(data) if len(data) < LEAN_DECODE_LIMIT else decode(data)


# berthd, the shim and the zygote: the C package, loaded once, fast on large frames.
MSGPACK: Final = Codec(encode, decode, load=lambda: _msgpack or _load_msgpack())
# The CLI: small frames need nothing loaded beyond one small module (packing.py says why).
LEAN: Final = Codec(packing.pack, _lean_decode)


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether maps and lists nest deeper than `limit` in `value` (iterative: a check of
    deep input must not itself recurse)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


# --- the connection -----------------------------------------------------------------------


class _State:
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class Connection:
    """Protocol state for one end of one connection. See the module docstring."""

    def __init__(
        self,
        role: str,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        peer_name: str = "",
        codec: Codec = MSGPACK,
    ) -> None:
        if max_frame_size < 64:
            raise ValueError("max_frame_size too small")
        if codec.load is not None:
            codec.load()
        self.role = role
        self._encode = codec.encode
        self._decode = codec.decode
        self.max_frame_size = max_frame_size
        self.versions = tuple(sorted(versions))
        self.peer_name = peer_name
        self.version: int | None = None
        self.remote_peer: str = ""
        self._state = _State.HANDSHAKE
        self._hello_sent = False
        self._buffer = bytearray()
        self._discard = 0  # bytes of an oversize frame still to drop
        self._eof = False
        self._next_id = 1
        # Requests awaiting their final frame: client = sent by us; server = received.
        self._open: set[int] = set()

    # -- introspection

    @property
    def open_requests(self) -> frozenset[int]:
        return frozenset(self._open)

    def next_request_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    # -- outgoing

    def send(self, event: Event) -> bytes:
        """Validate `event` against the rules and return the bytes to write. State changes
        only once the frame is known to be sendable: a refused send changes nothing."""
        if self._state in (_State.ERROR, _State.CLOSED):
            raise ConnectionEnded(f"cannot send on a {self._state} connection")
        prepare = self._SENDERS.get(type(event))
        if prepare is None:  # pragma: no cover - exhaustive over Event
            raise LocalProtocolError(f"unknown event {event!r}")
        body, commit = prepare(self, event)
        try:
            data = self._encode(body)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {type(event).__name__}: {exc}") from exc
        if len(data) > self.max_frame_size:
            raise LocalProtocolError(
                f"{type(event).__name__} of {len(data)} bytes exceeds the frame limit "
                f"{self.max_frame_size}"
            )
        if commit is not None:
            commit()
        return frame(data)

    # Each sender checks the rules for one event type and returns the body to encode and
    # the state change to apply once it is known to be sendable (None: no change).

    def _send_hello(self, event: Hello) -> _Prepared:
        if self.role != Role.CLIENT or self._hello_sent:
            raise LocalProtocolError("only a client sends HELLO, once")

        def commit() -> None:
            self._hello_sent = True

        return [_HELLO, list(event.versions), event.peer or self.peer_name], commit

    def _send_welcome(self, event: Welcome) -> _Prepared:
        if self.role != Role.SERVER or self._state != _State.HANDSHAKE:
            raise LocalProtocolError("WELCOME is the server's answer to HELLO")

        def commit() -> None:
            self._state = _State.OPEN
            self.version = event.version

        return [_WELCOME, event.version, event.peer or self.peer_name], commit

    def _send_request(self, event: Request) -> _Prepared:
        if self.role != Role.CLIENT:
            raise LocalProtocolError("a server does not send requests")
        if self._state != _State.OPEN:
            raise LocalProtocolError("no request before WELCOME")
        if event.id in self._open:
            raise LocalProtocolError(f"request id {event.id} is still open")
        return [_REQUEST, event.id, event.method, event.params, event.meta], lambda: self._open.add(
            event.id
        )

    def _send_cancel(self, event: Cancel) -> _Prepared:
        if self.role != Role.CLIENT or event.id not in self._open:
            raise LocalProtocolError("CANCEL is for a request this client has open")
        return [_CANCEL, event.id], None

    def _check_answer(self, request_id: int | None, may_lack_id: bool) -> None:
        if self.role != Role.SERVER:
            raise LocalProtocolError("a client does not answer requests")
        if request_id is None:
            if not may_lack_id:
                raise LocalProtocolError("only ERROR may carry no request id")
        elif request_id not in self._open:
            raise LocalProtocolError(f"request id {request_id} is not open")

    def _closing(self, request_id: int | None) -> Callable[[], None] | None:
        """The state change of a final frame: its request is no longer open."""
        return None if request_id is None else lambda: self._open.discard(request_id)

    def _send_item(self, event: StreamItem) -> _Prepared:
        self._check_answer(event.id, may_lack_id=False)
        return [_ITEM, event.id, event.item], None

    def _send_response(self, event: Response) -> _Prepared:
        self._check_answer(event.id, may_lack_id=False)
        return [_RESPONSE, event.id, event.result], self._closing(event.id)

    def _send_error(self, event: ErrorReply) -> _Prepared:
        self._check_answer(event.id, may_lack_id=True)
        return [_ERROR, event.id, event.code, event.message], self._closing(event.id)

    def _send_end(self, event: StreamEnd) -> _Prepared:
        self._check_answer(event.id, may_lack_id=False)
        return [_END, event.id], self._closing(event.id)

    _SENDERS: Final[dict[type, Callable[[Connection, Any], _Prepared]]] = {
        Hello: _send_hello,
        Welcome: _send_welcome,
        Request: _send_request,
        Cancel: _send_cancel,
        StreamItem: _send_item,
        Response: _send_response,
        ErrorReply: _send_error,
        StreamEnd: _send_end,
    }

    # -- incoming

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the peer; b"" means the peer closed its side."""
        if self._state == _State.ERROR:
            raise LocalProtocolError("connection is in an error state")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data after EOF")
        if self._discard:
            drop = min(self._discard, len(data))
            self._discard -= drop
            data = data[drop:]
            if not data:
                return
        if len(self._buffer) + len(data) > self.max_frame_size + HEADER.size + FEED_SLACK:
            raise LocalProtocolError("receive buffer full: drain next_event() before feeding")
        self._buffer += data

    def next_event(self) -> ReceivedEvent:
        """The next complete event, NEED_DATA, or ConnectionClosed after a clean EOF.

        Raises RemoteProtocolError for a bad frame (see the class for `fatal`)."""
        if self._state == _State.ERROR:
            raise LocalProtocolError("connection is in an error state")
        buf = self._buffer
        if len(buf) < HEADER.size:
            return self._at_boundary_eof()
        (length,) = HEADER.unpack_from(buf)
        if length == 0:
            del buf[: HEADER.size]
            raise RemoteProtocolError("empty frame")
        if length > self.max_frame_size:
            available = len(buf) - HEADER.size
            drop = min(available, length)
            del buf[: HEADER.size + drop]
            self._discard = length - drop
            raise RemoteProtocolError(
                f"frame of {length} bytes exceeds the limit of {self.max_frame_size}"
            )
        if len(buf) < HEADER.size + length:
            if self._eof:
                return self._fail("connection closed in the middle of a frame")
            return NEED_DATA
        body = bytes(buf[HEADER.size : HEADER.size + length])
        del buf[: HEADER.size + length]
        try:
            try:
                message = self._decode(body)
            except Exception as exc:  # msgpack raises many types: ExtraData, StackError, ...
                raise RemoteProtocolError(
                    f"frame is not valid msgpack: {type(exc).__name__}"
                ) from None
            return self._interpret(message)
        except RemoteProtocolError as exc:
            if self._state == _State.HANDSHAKE:  # nothing is trusted before the handshake
                self._state = _State.ERROR
                raise RemoteProtocolError(str(exc), fatal=True) from None
            raise

    def _at_boundary_eof(self) -> ReceivedEvent:
        if not self._eof:
            return NEED_DATA
        if self._buffer or self._discard:
            return self._fail("connection closed in the middle of a frame")
        self._state = _State.CLOSED
        return ConnectionClosed()

    def _fail(self, message: str) -> ReceivedEvent:
        self._state = _State.ERROR
        raise RemoteProtocolError(message, fatal=True)

    def _interpret(self, msg: Any) -> Event:
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
            raise RemoteProtocolError("a message must be a list starting with its type")
        kind = msg[0]
        if self.role == Role.SERVER:
            return self._interpret_at_server(kind, msg)
        return self._interpret_at_client(kind, msg)

    def _interpret_at_server(self, kind: int, msg: list[Any]) -> Event:
        if self._state == _State.HANDSHAKE:
            return self._hello(kind, msg)
        if kind == _REQUEST:
            return self._request(msg)
        if kind == _CANCEL:
            if len(msg) != 2 or not _valid_id(msg[1]):
                raise RemoteProtocolError("malformed CANCEL")
            return Cancel(msg[1])
        if kind == _HELLO:
            raise RemoteProtocolError("HELLO sent twice")
        raise RemoteProtocolError(f"a client may not send message type {kind}")

    def _hello(self, kind: int, msg: list[Any]) -> Hello:
        """The client's first frame (rule 1); anything wrong with it is fatal."""
        if kind != _HELLO or len(msg) != 3:
            self._state = _State.ERROR
            raise RemoteProtocolError("the first frame must be HELLO", fatal=True)
        versions, peer = msg[1], msg[2]
        if (
            not isinstance(versions, list)
            or not versions
            or len(versions) > 64
            or not all(isinstance(v, int) for v in versions)
            or not isinstance(peer, str)
        ):
            self._state = _State.ERROR
            raise RemoteProtocolError("malformed HELLO", fatal=True)
        if not set(versions) & set(self.versions):
            self._state = _State.ERROR
            raise RemoteProtocolError(
                f"no common protocol version (peer {sorted(versions)}, ours {list(self.versions)})",
                fatal=True,
            )
        self.remote_peer = peer[:256]
        return Hello(tuple(versions), self.remote_peer)

    def _request(self, msg: list[Any]) -> Request:
        """A REQUEST; a malformed one that carries an id is opened anyway, so that the
        ERROR answering it can close it (rule 2)."""
        rid = msg[1] if len(msg) > 1 and _valid_id(msg[1]) else None
        if rid is not None and rid in self._open:
            raise RemoteProtocolError(f"request id {rid} is already open")
        problem = ""
        if len(msg) != 5 or rid is None:
            problem = "malformed REQUEST"
        elif not isinstance(msg[2], str) or not 0 < len(msg[2]) <= MAX_METHOD_LEN:
            problem = "REQUEST method must be a short string"
        elif not isinstance(msg[3], dict) or not isinstance(msg[4], dict):
            problem = "REQUEST params and meta must be maps"
        elif nesting_exceeds(msg[3], MAX_NESTING) or nesting_exceeds(msg[4], MAX_NESTING):
            problem = f"REQUEST params nest deeper than {MAX_NESTING} levels"
        if rid is not None:
            self._open.add(rid)
        if problem:
            raise RemoteProtocolError(problem, request_id=rid)
        return Request(rid, msg[2], msg[3], msg[4])  # type: ignore[arg-type]

    def _interpret_at_client(self, kind: int, msg: list[Any]) -> Event:
        if self._state == _State.HANDSHAKE:
            if kind == _ERROR and len(msg) == 4:
                self._state = _State.ERROR
                code = msg[2] if isinstance(msg[2], str) else None
                raise RemoteProtocolError(
                    f"handshake refused: {msg[3]!s:.200}", fatal=True, code=code
                )
            if kind != _WELCOME or len(msg) != 3 or not self._hello_sent:
                self._state = _State.ERROR
                raise RemoteProtocolError("expected WELCOME", fatal=True)
            version, peer = msg[1], msg[2]
            if version not in self.versions or not isinstance(peer, str):
                self._state = _State.ERROR
                raise RemoteProtocolError(
                    f"server chose unsupported version {version!r}", fatal=True
                )
            self.version = version
            self.remote_peer = peer[:256]
            self._state = _State.OPEN
            return Welcome(version, self.remote_peer)
        if kind == _ERROR:
            if len(msg) != 4 or not isinstance(msg[2], str) or not isinstance(msg[3], str):
                raise RemoteProtocolError("malformed ERROR")
            rid = msg[1]
            if rid is not None:
                self._close_id(rid)
            return ErrorReply(rid, msg[2], msg[3])
        if kind in (_RESPONSE, _ITEM):
            if len(msg) != 3 or not _valid_id(msg[1]):
                raise RemoteProtocolError("malformed RESPONSE/ITEM")
            rid = msg[1]
            if kind == _RESPONSE:
                self._close_id(rid)
                return Response(rid, msg[2])
            if rid not in self._open:
                raise RemoteProtocolError(f"ITEM for request {rid!r} that is not open")
            return StreamItem(rid, msg[2])
        if kind == _END:
            if len(msg) != 2 or not _valid_id(msg[1]):
                raise RemoteProtocolError("malformed END")
            self._close_id(msg[1])
            return StreamEnd(msg[1])
        raise RemoteProtocolError(f"a server may not send message type {kind}")

    def _close_id(self, rid: Any) -> None:
        if not _valid_id(rid) or rid not in self._open:
            raise RemoteProtocolError(f"final frame for request {rid!r} that is not open")
        self._open.discard(rid)

    def refusal(self, message: str, code: str = "failed_precondition") -> bytes:
        """Bytes of a connection-level ERROR, sendable even after a fatal handshake error."""
        return frame(self._encode([_ERROR, None, code, message[:1024]]))

    def server_handshake(self, hello: Hello) -> Welcome:
        """The WELCOME to send for a received HELLO: the highest common version."""
        version = max(set(hello.versions) & set(self.versions))
        return Welcome(version, self.peer_name)


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID
