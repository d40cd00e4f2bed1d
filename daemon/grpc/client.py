"""An asyncio client for berthd's socket, for the gRPC front end (grpc.aio is asyncio).

The same sans-IO `Connection` as every other peer; this module only moves its bytes. One
connection multiplexes unary calls (a reader task routes each reply to its future); a
server stream gets a connection of its own, so that a slow stream consumer applies
backpressure to its stream alone and never to the replies of other calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from berth.shim.wire.client import READ_ONLY_CALLS
from berth.shim.wire.errors import BerthError, InvalidArgument, Reconnect, Unavailable
from berth.shim.wire.protocol import (
    DEFAULT_MAX_FRAME,
    Cancel,
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    NeedData,
    ProtocolError,
    Request,
    Response,
    Role,
    StreamEnd,
    StreamItem,
    Welcome,
)

READ_SIZE = 256 * 1024
STREAM_BUFFER = 64  # items queued per stream before the reader stops reading


class _GoingAway(Exception):
    def __init__(self, error: BerthError) -> None:
        self.error = error


class AsyncClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        path: str,
    ) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, asyncio.Queue[Any]] = {}
        self._closed = asyncio.Event()
        self._failure: BerthError | None = None
        self._pump = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls, path: str, *, peer_name: str = "berth-grpc", timeout: float = 5.0
    ) -> AsyncClient:
        # asyncio.timeout, never wait_for: on 3.11 wait_for returns the result, and loses
        # the cancellation, when both come in one turn of the loop; a cancelled call then
        # went on (a review: cancelled Subscribe calls that never ended, each holding a
        # connection to berthd)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
        except (TimeoutError, OSError) as exc:
            raise Unavailable(f"cannot connect to berthd at {path}: {exc}") from None
        conn = Connection(Role.CLIENT, peer_name=peer_name, max_frame_size=DEFAULT_MAX_FRAME)
        writer.write(conn.send(Hello()))
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, NeedData):
                    async with asyncio.timeout(timeout):
                        data = await reader.read(READ_SIZE)
                    conn.receive_data(data)
                    continue
                if not isinstance(event, Welcome):
                    raise Unavailable(f"unexpected handshake answer from berthd: {event!r}")
                break
        except (TimeoutError, OSError, ProtocolError) as exc:
            writer.close()
            raise Unavailable(f"handshake with berthd failed: {exc}") from None
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, conn, path)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def aclose(self) -> None:
        self._pump.cancel()
        try:
            await self._pump
        except (asyncio.CancelledError, Exception):
            pass
        self._shutdown(Unavailable("client closed"))

    def _shutdown(self, failure: BerthError) -> None:
        if self._failure is None:
            self._failure = failure
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self._failure)
        self._calls.clear()
        for queue in self._streams.values():
            try:
                queue.put_nowait(self._failure)
            except asyncio.QueueFull:  # the consumer finds the closed flag instead
                pass
        self._writer.close()
        self._closed.set()

    async def _read_loop(self) -> None:
        failure: BerthError = Unavailable("berthd closed the connection")
        try:
            while True:
                event = self._conn.next_event()
                if isinstance(event, NeedData):
                    data = await self._reader.read(READ_SIZE)
                    self._conn.receive_data(data)
                    continue
                if isinstance(event, ConnectionClosed):
                    return
                await self._dispatch(event)
        except _GoingAway as going:
            failure = going.error  # nothing pending on it was carried out: repeat it
        except (OSError, ProtocolError) as exc:
            failure = Unavailable(f"connection to berthd lost: {exc}")
        finally:
            self._shutdown(failure)

    async def _dispatch(self, event: Any) -> None:
        rid = getattr(event, "id", None)
        if rid is None:  # a connection-level error: everything on it fails
            if isinstance(event, ErrorReply):
                error = event.to_exception()
                if isinstance(error, Reconnect):  # berthd hands over: go elsewhere
                    raise _GoingAway(error)
                raise ProtocolError(f"berthd refused the connection: {event.message}")
            return
        future = self._calls.pop(rid, None)
        if future is not None:
            if future.done():
                return
            if isinstance(event, Response):
                future.set_result(event.result)
            elif isinstance(event, ErrorReply):
                future.set_exception(event.to_exception())
            return
        queue = self._streams.get(rid)
        if queue is None:
            return  # a reply to a cancelled call
        if isinstance(event, (StreamItem, StreamEnd, Response, ErrorReply)):
            await queue.put(event)  # blocks the reader: backpressure on this connection

    def _send(self, event: Any) -> None:
        if self._failure is not None:
            raise self._failure
        try:
            data = self._conn.send(event)
        except ProtocolError as exc:  # e.g. a request larger than a frame may be
            raise InvalidArgument(f"request refused: {exc}") from None
        self._writer.write(data)

    def _cancel(self, rid: int) -> None:
        """Tell berthd to stop working on `rid`, if it is still open on the wire (never
        for a request whose answer has already been parsed)."""
        if self._failure is not None or rid not in self._conn.open_requests:
            return
        try:
            self._send(Cancel(rid))
        except (BerthError, OSError, ProtocolError):
            pass

    async def call(self, method: str, params: dict[str, Any] | None = None, **meta: Any) -> Any:
        rid = self._conn.next_request_id()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = future
        try:
            self._send(Request(rid, method, params or {}, _clean(meta)))
            await self._writer.drain()
            return await future
        except (OSError, ConnectionError) as exc:
            if method in READ_ONLY_CALLS:  # changes nothing: the backend asks again
                raise Reconnect(f"connection to berthd lost: {exc}") from None
            raise Unavailable(f"connection to berthd lost: {exc}") from None
        except Unavailable as exc:
            if exc is self._failure and method in READ_ONLY_CALLS:
                raise Reconnect(f"{exc} before answering {method}") from None
            raise
        except asyncio.CancelledError:
            if self._calls.pop(rid, None) is not None:
                self._cancel(rid)
            raise
        finally:
            self._calls.pop(rid, None)

    async def stream(
        self, method: str, params: dict[str, Any] | None = None, **meta: Any
    ) -> AsyncIterator[Any]:
        """Items of a server stream; leaving the iteration early cancels it on berthd."""
        rid = self._conn.next_request_id()
        queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_BUFFER)
        self._streams[rid] = queue
        finished = False
        try:
            self._send(Request(rid, method, params or {}, _clean(meta)))
            await self._writer.drain()
            while True:
                if queue.empty() and self._failure is not None:
                    # (the failure marker may not have fit a full queue: items first)
                    finished = True
                    raise self._failure
                event = await queue.get()
                if isinstance(event, BerthError):
                    finished = True
                    raise event
                if isinstance(event, StreamItem):
                    yield event.item
                    continue
                finished = True
                if isinstance(event, ErrorReply):
                    raise event.to_exception()
                return  # StreamEnd, or a plain Response ends it too
        except (OSError, ConnectionError) as exc:
            finished = True
            raise Unavailable(f"connection to berthd lost: {exc}") from None
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._cancel(rid)


def _clean(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if v is not None}
