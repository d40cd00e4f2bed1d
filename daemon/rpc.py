"""berth's protocol on trio: an async client (daemon -> shim, daemon -> zygote) and the
server side of the daemon's API socket. The protocol logic itself is the sans-IO
`berth.shim.wire.protocol.Connection`; this module only moves its bytes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.daemon.metadata import out_of_space
from berth.shim.wire.errors import (
    BerthError,
    Canceled,
    Internal,
    Reconnect,
    Unavailable,
    Unimplemented,
)
from berth.shim.wire.protocol import (
    DEFAULT_MAX_FRAME,
    Cancel,
    Connection,
    ConnectionClosed,
    ConnectionEnded,
    ErrorReply,
    Hello,
    LocalProtocolError,
    NeedData,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    StreamEnd,
    StreamItem,
    Welcome,
)
from berth.shim.wire.unixsock import short_path

log = logging.getLogger("berthd.rpc")
RECV_SIZE = 256 * 1024


class NoAnswer(Unavailable):
    """The peer is connected but did not answer a call in time: stopped (SIGSTOP), stuck
    in the kernel, or overloaded. Unlike a lost connection, what was asked may still be
    carried out later. On the wire it is `unavailable`, as any timeout was before."""


async def open_unix(path: str) -> trio.SocketStream:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with short_path(path) as addr:
            await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class _Pending:
    __slots__ = ("done", "error", "items", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None
        self.error: BerthError | None = None
        self.items: trio.MemorySendChannel[Any] | None = None


class RpcClient:
    """A multiplexed client connection. `run()` must be running (in some nursery) for
    replies to arrive; when the connection ends, every waiting call gets Unavailable."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer_name: str = "berthd",
        max_frame_size: int = DEFAULT_MAX_FRAME,
        label: str = "",
    ) -> None:
        self._stream = stream
        self._conn = Connection(Role.CLIENT, peer_name=peer_name, max_frame_size=max_frame_size)
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self.closed = trio.Event()
        self.label = label
        self.close_reason = ""

    @classmethod
    async def connect(cls, path: str, **kwargs: Any) -> RpcClient:
        stream = await open_unix(path)
        return cls(stream, label=kwargs.pop("label", path), **kwargs)

    async def handshake(self) -> Welcome:
        """Say HELLO and wait for WELCOME. Call before run(); any failure is Unavailable."""
        await self._write(self._conn.send(Hello()))
        while True:
            try:
                event = self._conn.next_event()
                if isinstance(event, NeedData):
                    data = await self._stream.receive_some(RECV_SIZE)
                    self._conn.receive_data(data)
                    continue
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise Unavailable(f"{self.label}: connection lost: {exc}") from None
            except (RemoteProtocolError, LocalProtocolError) as exc:
                raise Unavailable(f"{self.label}: handshake failed: {exc}") from None
            if isinstance(event, Welcome):
                return event
            raise Unavailable(f"{self.label}: unexpected handshake answer {event!r}")

    async def _write(self, data: bytes) -> None:
        try:
            await send_now(self._stream, self._send_lock, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Unavailable(f"{self.label}: connection lost: {exc}") from None

    async def run(self) -> None:
        """Read replies until the connection ends."""
        try:
            while True:
                try:
                    data = await receive(self._stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.close_reason = str(exc) or "connection reset"
                    return
                self._conn.receive_data(data)
                while True:
                    try:
                        event = self._conn.next_event()
                    except RemoteProtocolError as exc:
                        log.warning("%s: protocol error: %s", self.label, exc)
                        if exc.fatal:
                            self.close_reason = str(exc)
                            return
                        continue
                    if isinstance(event, NeedData):
                        break
                    if isinstance(event, ConnectionClosed):
                        self.close_reason = "closed by peer"
                        return
                    await self._dispatch(event)
        except LocalProtocolError as exc:
            self.close_reason = str(exc)
        finally:
            self.closed.set()
            for pending in self._pending.values():
                pending.error = Unavailable(
                    f"{self.label}: {self.close_reason or 'connection closed'}"
                )
                if pending.items is not None:
                    pending.items.close()
                pending.done.set()
            self._pending.clear()
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _dispatch(self, event: Any) -> None:
        if isinstance(event, ErrorReply) and event.id is None:
            log.warning("%s: connection error from peer: %s", self.label, event.message)
            return
        pending = self._pending.get(event.id)
        if pending is None:
            return
        if isinstance(event, StreamItem):
            if pending.items is not None:
                try:
                    await pending.items.send(event.item)  # backpressure: stop reading
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        del self._pending[event.id]
        if isinstance(event, Response):
            pending.result = event.result
        elif isinstance(event, ErrorReply):
            pending.error = event.to_exception()
        if pending.items is not None:
            pending.items.close()
        pending.done.set()

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float = math.inf,
        **meta: Any,
    ) -> Any:
        if self.closed.is_set():
            raise Unavailable(f"{self.label}: connection closed")
        rid = self._conn.next_request_id()
        pending = _Pending()
        self._pending[rid] = pending
        try:
            await self._write(self._conn.send(Request(rid, method, params or {}, meta)))
            with trio.move_on_after(timeout) as scope:
                await pending.done.wait()
            if scope.cancelled_caught:
                raise NoAnswer(f"{self.label}: {method} timed out after {timeout}s")
        except BaseException:
            self._pending.pop(rid, None)
            raise
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a request whose reply nobody waits for (it is read and dropped). Used for
        acknowledgements, so the event pump never waits on its own connection."""
        if self.closed.is_set():
            raise Unavailable(f"{self.label}: connection closed")
        rid = self._conn.next_request_id()
        self._pending[rid] = _Pending()
        await self._write(self._conn.send(Request(rid, method, params or {}, {})))

    async def stream(
        self, method: str, params: dict[str, Any] | None = None, buffer: int = 256
    ) -> AsyncIterator[Any]:
        """Iterate a server stream. Leaving the loop early cancels the stream."""
        if self.closed.is_set():
            raise Unavailable(f"{self.label}: connection closed")
        rid = self._conn.next_request_id()
        pending = _Pending()
        send, receive = trio.open_memory_channel[Any](buffer)
        pending.items = send
        self._pending[rid] = pending
        await self._write(self._conn.send(Request(rid, method, params or {}, {})))
        try:
            async with receive:
                async for item in receive:
                    yield item
            if pending.error is not None:
                raise pending.error
        finally:
            if rid in self._pending and not self.closed.is_set():
                with trio.CancelScope(shield=True):
                    try:
                        await self._write(self._conn.send(Cancel(rid)))
                    except (Unavailable, LocalProtocolError):
                        pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


def live_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of an open socket stream, which `receive` and `send_now` use
    directly; None for a closed one or any other stream (they then go through the
    stream's own methods, which raise or work as trio's do). Asked at each use, never
    kept: a closed socket's number may already name another file."""
    if isinstance(stream, trio.SocketStream):
        fd = stream.socket.fileno()  # -1 once closed
        return fd if fd >= 0 else None
    return None


async def receive(stream: trio.abc.Stream) -> bytes | bytearray:
    """The next bytes of `stream`, with one trip through trio's scheduler: the wait for
    the socket to be readable. trio's receive_some makes a second one after its read;
    measured, trio's scheduling was most of berthd's CPU for a small call (two trips
    fewer a call: 290-450 -> 180-260 us). Bytes already waiting are read at once, then
    the task yields (shielded: what was read is returned), so a peer that floods the
    socket still shares the loop. Only the one task that reads a stream may call this."""
    fd = live_fd(stream)
    if fd is None:
        return await stream.receive_some(RECV_SIZE)
    await trio.lowlevel.checkpoint_if_cancelled()  # never after a read: no byte is dropped
    try:
        data = os.read(fd, RECV_SIZE)
    except BlockingIOError:
        pass
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data
    while True:
        await trio.lowlevel.wait_readable(fd)
        fd = live_fd(stream)
        if fd is None:  # closed by another task before this one ran again
            return await stream.receive_some(RECV_SIZE)
        try:
            return os.read(fd, RECV_SIZE)
        except BlockingIOError:  # a spurious wakeup: wait again
            continue


async def send_now(stream: trio.abc.Stream, lock: trio.Lock, data: bytes) -> None:
    """Send `data` whole under `lock` (frames never interleave), written at once when
    nothing else is being sent and the socket takes it: no trip through the scheduler
    (trio's send_all yields after writing). What the socket does not take now is sent
    as usual, the lock held throughout. The caller must not loop on it without another
    checkpoint: it is for a call's request (its answer is then awaited) and a call's
    last reply (its task ends). A cancelled caller sends nothing (as send_all)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    fd = live_fd(stream)
    if fd is None or lock.locked():
        async with lock:
            await stream.send_all(data)
        return
    lock.acquire_nowait()  # no checkpoint since the check: this cannot block
    try:
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # EPIPE, ECONNRESET (Python ignores SIGPIPE)
            raise trio.BrokenResourceError(f"peer gone: {exc}") from exc
        if sent < len(data):
            await stream.send_all(memoryview(data)[sent:])
    finally:
        lock.release()


# --- server side ------------------------------------------------------------------------


@dataclass
class CallContext:
    """What a handler knows about the call it serves. `session` lives as long as the
    connection; `on_close` callbacks run when it ends (e.g. to release an ingest lock)."""

    request: Request
    namespace: str
    peer_uid: int
    send_item: Callable[[Any], Awaitable[None]]
    meta: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    on_close: list[Callable[[], None]] = field(default_factory=list)

    @property
    def lease(self) -> str | None:
        value = self.meta.get("lease")
        return value if isinstance(value, str) and value else None


STREAM_DONE = object()  # a handler returns this after streaming its items


async def guarded(what: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run one background job of the daemon so that its failure is logged and contained:
    a broken connection or a confused shim must never take berthd down."""
    try:
        await fn(*args)
    except Exception:  # also ExceptionGroups of Exceptions; never trio.Cancelled
        log.exception("%s failed", what)


Handler = Callable[[CallContext, dict[str, Any]], Awaitable[Any]]
# Told of every API call once answered: (method, "ok" or the error code, seconds). Unknown
# methods are "unknown", so a client cannot grow the metrics' label sets at will.
Observer = Callable[[str, str, float], None]


class Drain:
    """The server side of a handover (an upgrade, a takeover): once it begins, a new
    request is answered Reconnect at once (not carried out), resumable long calls (waits,
    streams) end with Reconnect, every other call in flight finishes (bounded), and then
    every connection is told to go away (a connection-level Reconnect, after the last
    reply on it). The connections stay open, answering Reconnect, until the process exits:
    a request that crossed the goodbye is answered, never lost in a reset. Clients repeat
    on the successor what ended with Reconnect."""

    def __init__(self, resumable: frozenset[str] = frozenset()) -> None:
        self.resumable = resumable
        self.active = False
        self.gone_away = False
        self.connections: set[ServerConnection] = set()

    async def drain(self, timeout: float) -> int:
        """Begin; return once no call is in flight (or `timeout` passed: those left end
        with Reconnect too) and every connection is closed. Returns how many calls were
        ended early."""
        self.active = True
        ended = sum(c.end_resumable() for c in list(self.connections))
        with trio.move_on_after(timeout):
            while any(c.in_flight for c in self.connections):
                await trio.sleep(0.005)
        ended += sum(c.end_all() for c in list(self.connections))
        while any(c.in_flight for c in self.connections):
            await trio.sleep(0.005)  # their cancellation is already under way
        self.gone_away = True
        for connection in list(self.connections):
            await connection.go_away()
        return ended


async def refuse(stream: trio.SocketStream, message: str, code: str) -> None:
    """Refuse a connection with an error the client can show (not a bare close, which a
    client in its handshake takes for a daemon going away, and tries again)."""
    with trio.move_on_after(1.0):  # read its HELLO first: closing on unread data resets
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.receive_some(RECV_SIZE)
            await stream.send_all(Connection(Role.SERVER).refusal(message, code))
    with trio.CancelScope(shield=True):
        await stream.aclose()


RECONNECT_MESSAGE = "berthd is handing over to its successor; connect again"


class ServerConnection:
    """Serves one client connection: requests run concurrently (bounded), each in its own
    cancel scope so CANCEL and a disconnect stop exactly what they should."""

    MAX_IN_FLIGHT = 128

    def __init__(
        self,
        stream: trio.SocketStream,
        handlers: dict[str, Handler],
        namespace_of: Callable[[Request], str],
        peer_uid: int,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        drain: Drain | None = None,
        observe: Observer | None = None,
    ) -> None:
        self._stream = stream
        self._handlers = handlers
        self._namespace_of = namespace_of
        self._peer_uid = peer_uid
        self._conn = Connection(Role.SERVER, max_frame_size=max_frame_size, peer_name="berthd")
        self._send_lock = trio.Lock()
        self._scopes: dict[int, trio.CancelScope] = {}
        self._methods: dict[int, str] = {}  # of the requests in flight
        self._ended: set[int] = set()  # requests a drain ended: their answer is Reconnect
        self._limit = trio.Semaphore(self.MAX_IN_FLIGHT)
        self._session: dict[str, Any] = {}
        self._on_close: list[Callable[[], None]] = []
        self._drain = drain or Drain()
        self._observe = observe

    @property
    def in_flight(self) -> int:
        return len(self._scopes)

    def _end(self, rids: list[int]) -> int:
        for rid in rids:
            self._ended.add(rid)
            self._scopes[rid].cancel()
        return len(rids)

    def end_resumable(self) -> int:
        resumable = self._drain.resumable
        return self._end([r for r, m in self._methods.items() if m in resumable])

    def end_all(self) -> int:
        return self._end([r for r in self._scopes if r not in self._ended])

    async def go_away(self) -> None:
        """Tell the client to take its next calls elsewhere (see Drain); a client still in
        its handshake is told once it is done."""
        if self._conn.version is None:
            return
        try:
            await self._send(ErrorReply(None, "unavailable", Reconnect(RECONNECT_MESSAGE).message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass

    def _encode(self, event: Any) -> bytes:
        try:
            return self._conn.send(event)
        except ConnectionEnded:  # the client left while its call ran: nothing to log
            raise trio.ClosedResourceError("the client closed the connection") from None
        except LocalProtocolError as exc:
            if isinstance(event, (Response, StreamItem)):
                log.error("cannot send reply: %s", exc)
                return self._conn.send(
                    ErrorReply(event.id, "internal", f"reply not sendable: {exc}")
                )
            raise

    async def _send(self, event: Any) -> None:
        data = self._encode(event)
        async with self._send_lock:
            await self._stream.send_all(data)

    async def _reply(self, event: Any) -> None:
        """A call's last frame (see send_now)."""
        await send_now(self._stream, self._send_lock, self._encode(event))

    async def serve(self) -> None:
        self._drain.connections.add(self)
        try:
            async with trio.open_nursery() as nursery:
                # Caught inside the nursery: leaving it, errors arrive wrapped in an
                # ExceptionGroup (trio's strict groups), which a plain except misses.
                try:
                    await self._read_loop(nursery)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._drain.connections.discard(self)
            for cb in self._on_close:
                try:
                    cb()
                except Exception:
                    log.exception("connection close callback failed")
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await receive(self._stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            try:
                self._conn.receive_data(data)
            except LocalProtocolError:
                return
            while True:
                try:
                    event = self._conn.next_event()
                except RemoteProtocolError as exc:
                    if exc.fatal:
                        async with self._send_lock:
                            await self._stream.send_all(
                                self._conn.refusal(str(exc), "invalid_argument")
                            )
                        return
                    await self._send(ErrorReply(exc.request_id, "invalid_argument", str(exc)))
                    continue
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Hello):
                    await self._send(self._conn.server_handshake(event))
                    if self._drain.gone_away:  # it connected after the goodbyes
                        await self.go_away()
                elif isinstance(event, Request):
                    if self._drain.active:  # not carried out: the successor will
                        await self._send(
                            ErrorReply.from_exception(event.id, Reconnect(RECONNECT_MESSAGE))
                        )
                        continue
                    try:
                        self._limit.acquire_nowait()  # no checkpoint when below the bound
                    except trio.WouldBlock:
                        await self._limit.acquire()
                    scope = trio.CancelScope()
                    self._scopes[event.id] = scope
                    self._methods[event.id] = event.method
                    nursery.start_soon(self._handle, event, scope)
                elif isinstance(event, Cancel):
                    running = self._scopes.get(event.id)
                    if running is not None:
                        running.cancel()

    async def _handle(self, req: Request, scope: trio.CancelScope) -> None:
        started = time.perf_counter()
        try:
            reply: Any
            with scope:
                reply = await self._run_handler(req)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s took %.1f ms", req.method, (time.perf_counter() - started) * 1e3)
            if scope.cancelled_caught:
                error: BerthError = Canceled("request canceled")
                if req.id in self._ended:
                    error = Reconnect(RECONNECT_MESSAGE)
                reply = ErrorReply.from_exception(req.id, error)
            if self._observe is not None:
                code = reply.code if isinstance(reply, ErrorReply) else "ok"
                method = req.method if req.method in self._handlers else "unknown"
                self._observe(method, code, time.perf_counter() - started)
            await self._reply(reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except LocalProtocolError as exc:  # e.g. a stream already ended by an unsendable item
            log.warning("%s: reply dropped: %s", req.method, exc)
        finally:
            self._scopes.pop(req.id, None)
            self._methods.pop(req.id, None)
            self._ended.discard(req.id)
            self._limit.release()

    async def _run_handler(self, req: Request) -> Any:
        handler = self._handlers.get(req.method)
        try:
            if handler is None:
                raise Unimplemented(f"unknown method {req.method!r}")

            async def send_item(item: Any) -> None:
                await self._send(StreamItem(req.id, item))

            ctx = CallContext(
                req,
                self._namespace_of(req),
                self._peer_uid,
                send_item,
                req.meta,
                self._session,
                self._on_close,
            )
            result = await handler(ctx, req.params)
        except BerthError as exc:
            return ErrorReply.from_exception(req.id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:
            if out_of_space(exc):
                log.error("%s: out of space: %s", req.method, exc)
                return ErrorReply.from_exception(
                    req.id, Unavailable(f"{req.method}: no space left on device ({exc})")
                )
            log.exception("%s failed", req.method)
            return ErrorReply.from_exception(req.id, Internal(f"{req.method}: {exc}"))
        if result is STREAM_DONE:
            return StreamEnd(req.id)
        return Response(req.id, result)
