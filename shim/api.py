"""The shim's API: msgpack-RPC (berth.shim.wire.protocol) over its UNIX socket.

The socket is path-based, mode 0600, in a 0700 directory, and every connection's peer
credentials are checked (uid 0, or the shim's own uid): nothing else on the host, and
nothing in a container sharing the host network namespace, can drive a shim.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from berth.shim import events as shim_events
from berth.shim.loop import Lock, Loop, log
from berth.shim.task import Task
from berth.shim.wire.errors import (
    BerthError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
    Unimplemented,
)
from berth.shim.wire.protocol import (
    PROTOCOL_VERSION,
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
)
from berth.shim.wire.status import pack_pids
from berth.shim.wire.unixsock import peer_credentials

MAX_FRAME = 1024 * 1024
MAX_OUTBUF = 32 * 1024 * 1024
MAX_CONNECTIONS = 64
ACCEPT_RETRY = 0.1  # seconds between accepts while the shim is short of descriptors
# A host short of descriptors or memory (what accept can meet), or of disk space too.
DESCRIPTOR_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
SHORTAGE_ERRNOS = DESCRIPTOR_SHORTAGE | {errno.ENOSPC, errno.EDQUOT}
# Requests served at once per connection; more wait to be read. Refusing them failed calls
# of the daemon, whose one connection carries every client's: 200 concurrent `tasks exec`
# had 22 to 135 refused ("too many requests in flight"), and never ran. A `wait`, in flight
# until its process exits, is not one of them (the connection would stop being read for as
# long, its peer's hang-up unnoticed): up to MAX_WAITS, refused past that.
MAX_IN_FLIGHT = 64
MAX_WAITS = 4096
RECV_SIZE = 64 * 1024

Handler = Callable[["ShimConnection", Request], Awaitable[Any]]


class ShimServer:
    def __init__(
        self, loop: Loop, listener: socket.socket, task: Task, queue: shim_events.EventQueue
    ) -> None:
        self.loop = loop
        self.task = task
        self.queue = queue
        self.started_at = time.time_ns()
        self._listener = listener
        self._connections: set[ShimConnection] = set()
        self._lock = Lock()
        self.shutting_down = False
        self._accept_paused = False  # short of descriptors: the listener is not watched
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)
        self.handlers: dict[str, Handler] = {
            "info": self._info,
            "state": self._state,
            "list": self._list,
            "create": self._create,
            "start": self._start,
            "kill": self._kill,
            "exec": self._exec,
            "resize_pty": self._resize_pty,
            "close_io": self._close_io,
            "pause": self._pause,
            "resume": self._resume,
            "update": self._update,
            "stats": self._stats,
            "pids": self._pids,
            "wait": self._wait,
            "delete": self._delete,
            "shutdown": self._shutdown,
            "events": self._events,
            "ack": self._ack,
        }

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in DESCRIPTOR_SHORTAGE:
                    # The connection stays queued and the listener readable: watched
                    # meanwhile, it spun the loop at 100% CPU, logging each turn. Look
                    # again after a pause (a descriptor may be free by then).
                    if not self._accept_paused:
                        log(f"accept: {exc}; trying again every {ACCEPT_RETRY:g}s")
                    self._accept_paused = True
                    self.loop.remove_reader(self._listener.fileno())
                    self.loop.call_later(ACCEPT_RETRY, self._watch_listener)
                    return
                raise
            self._accept_paused = False
            _, uid, _ = peer_credentials(sock)
            if uid not in (0, os.getuid()) or len(self._connections) >= MAX_CONNECTIONS:
                log(f"refused a connection from uid {uid}")
                sock.close()
                continue
            self._connections.add(ShimConnection(self, sock))

    def _watch_listener(self) -> None:
        if self._listener.fileno() >= 0:  # not closed meanwhile
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def forget(self, conn: ShimConnection) -> None:
        self._connections.discard(conn)

    def close(self) -> None:
        self.loop.forget_fd(self._listener.fileno())
        self._listener.close()
        for conn in list(self._connections):
            conn.close()

    # -- handlers: each returns the result, or raises a BerthError

    async def _info(self, conn: ShimConnection, req: Request) -> Any:
        return {
            "pid": os.getpid(),
            "protocol": PROTOCOL_VERSION,
            "started_at": self.started_at,
            "last_event": self.queue.last_seq,
            **self.task.config.to_params(),
        }

    async def _state(self, conn: ShimConnection, req: Request) -> Any:
        return self.task.state(_exec_id(req))

    async def _list(self, conn: ShimConnection, req: Request) -> Any:
        return self.task.list_processes()

    async def _create(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            return await self.task.create(req.params)

    async def _start(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            return await self.task.start(_exec_id(req))

    async def _kill(self, conn: ShimConnection, req: Request) -> Any:
        signo = req.params.get("signal", 15)
        if not isinstance(signo, int):
            raise InvalidArgument("signal must be an integer")
        async with self._lock:
            await self.task.kill(signo, bool(req.params.get("all", False)), _exec_id(req))
        return {}

    async def _exec(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            return await self.task.exec(req.params)

    async def _resize_pty(self, conn: ShimConnection, req: Request) -> Any:
        width, height = req.params.get("width"), req.params.get("height")
        if not isinstance(width, int) or not isinstance(height, int):
            raise InvalidArgument("width and height must be integers")
        self.task.resize_pty(_exec_id(req), width, height)
        return {}

    async def _close_io(self, conn: ShimConnection, req: Request) -> Any:
        if req.params.get("stdin", True):
            self.task.close_io(_exec_id(req))
        return {}

    async def _pause(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            await self.task.pause()
        return {}

    async def _resume(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            await self.task.resume()
        return {}

    async def _update(self, conn: ShimConnection, req: Request) -> Any:
        resources = req.params.get("resources")
        if not isinstance(resources, dict):
            raise InvalidArgument("resources must be a map (OCI LinuxResources)")
        async with self._lock:
            await self.task.update(resources)
        return {}

    async def _stats(self, conn: ShimConnection, req: Request) -> Any:
        return self.task.stats()

    async def _pids(self, conn: ShimConnection, req: Request) -> Any:
        pids, execs = await self.task.pids()
        if req.params.get("packed"):
            return {"pids": pack_pids(pids), "execs": execs}
        # A daemon from before `packed` (a rollback): a map per process, ~17 bytes each,
        # so that the frame holds ~60,000 of them.
        by_pid = {pid: exec_id for exec_id, pid in execs.items()}
        return {"processes": [{"pid": pid, "exec_id": by_pid.get(pid, "")} for pid in pids]}

    async def _wait(self, conn: ShimConnection, req: Request) -> Any:
        return await self.task.wait(_exec_id(req))

    async def _delete(self, conn: ShimConnection, req: Request) -> Any:
        async with self._lock:
            result = await self.task.delete(_exec_id(req), bool(req.params.get("force", False)))
        # The daemon waits until it has relayed every event up to this one.
        return {**result, "seq": self.queue.last_seq}

    async def _shutdown(self, conn: ShimConnection, req: Request) -> Any:
        # Behind the lock: never stop in the middle of a create or delete.
        async with self._lock:
            now = bool(req.params.get("now", False))
            if not now and self.task.init is not None and not self.task.deleted:
                raise FailedPrecondition("the task has not been deleted")
            self.shutting_down = True
            conn.after_flush(self.loop.stop)
        return {}

    async def _events(self, conn: ShimConnection, req: Request) -> Any:
        conn.subscribe_events(req.id)
        return _STREAMING

    async def _ack(self, conn: ShimConnection, req: Request) -> Any:
        seq = req.params.get("seq")
        if not isinstance(seq, int):
            raise InvalidArgument("seq must be an integer")
        return {"pending": self.queue.ack(seq)}


_STREAMING = object()


def _exec_id(req: Request) -> str | None:
    value = req.params.get("exec_id")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise InvalidArgument("exec_id must be a string")
    return value


class ShimConnection:
    """One client connection: protocol state, an outgoing buffer, in-flight requests."""

    def __init__(self, server: ShimServer, sock: socket.socket) -> None:
        self._server = server
        self._loop = server.loop
        self._sock = sock
        self._fd = sock.fileno()
        sock.setblocking(False)
        self._proto = Connection(Role.SERVER, max_frame_size=MAX_FRAME, peer_name="berth-shim")
        self._out = bytearray()
        self._closed = False
        self._after_flush: list[Callable[[], None]] = []
        self._stream_id: int | None = None
        self._in_flight = 0
        self._waits = 0
        self._reading = True  # False while MAX_IN_FLIGHT requests are served: not read
        self._subscriber: Callable[[shim_events.Event], None] | None = None
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            self._proto.receive_data(data)
            self._process_events()
        except (LocalProtocolError, RemoteProtocolError) as exc:
            log(f"closing a client connection: {exc}")
            self.close()

    def _process_events(self) -> None:
        while not self._closed:
            if self._in_flight >= MAX_IN_FLIGHT:
                # Backpressure, as any server's: what follows stays unread (in the parser
                # and the socket) until a request in flight ends; the peer's writes block.
                if self._reading:
                    self._reading = False
                    self._loop.remove_reader(self._fd)
                return
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as exc:
                if exc.fatal:
                    self._write(self._proto.refusal(str(exc), "invalid_argument"))
                    self.after_flush(self.close)
                    return
                self._send(ErrorReply(exc.request_id, "invalid_argument", str(exc)))
                continue
            if isinstance(event, NeedData):
                return
            if isinstance(event, ConnectionClosed):
                self.close()
                return
            if isinstance(event, Hello):
                self._send(self._proto.server_handshake(event))
            elif isinstance(event, Request):
                if event.method == "wait":
                    if self._waits >= MAX_WAITS:
                        self._send(ErrorReply(event.id, "unavailable", "too many waits in flight"))
                        continue
                    self._waits += 1
                else:
                    self._in_flight += 1
                self._loop.create_task(self._handle(event), name=event.method)
            elif isinstance(event, Cancel) and event.id == self._stream_id:
                self._end_stream()

    async def _handle(self, req: Request) -> None:
        try:
            await self._dispatch(req)
        finally:
            if req.method == "wait":
                self._waits -= 1
            else:
                self._in_flight -= 1
                self._resume_reading()

    def _resume_reading(self) -> None:
        if not self._reading and not self._closed and self._in_flight < MAX_IN_FLIGHT:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
            self._loop.call_soon(self._process_events)  # what the parser holds already

    async def _dispatch(self, req: Request) -> None:
        handler = self._server.handlers.get(req.method)
        try:
            if handler is None:
                raise Unimplemented(f"unknown method {req.method!r}")
            if self._server.shutting_down and req.method != "shutdown":
                raise Unavailable("shim is shutting down")
            result = await handler(self, req)
        except BerthError as exc:
            self._reply(ErrorReply.from_exception(req.id, exc))
            return
        except OSError as exc:
            log(f"{req.method} failed: {exc!r}")
            # Out of disk or descriptors is the host's state, not a fault of the shim: the
            # same call can succeed later (berthd answers tasks.create the same way).
            error = Unavailable if exc.errno in SHORTAGE_ERRNOS else Internal
            self._reply(ErrorReply.from_exception(req.id, error(f"{req.method}: {exc}")))
            return
        except Exception as exc:
            log(f"{req.method} failed: {exc!r}")
            self._reply(ErrorReply.from_exception(req.id, Internal(f"{req.method}: {exc}")))
            return
        if result is not _STREAMING:
            self._reply(Response(req.id, result))

    def _reply(self, event: Response | ErrorReply) -> None:
        if self._closed:
            return
        try:
            self._send(event)
        except LocalProtocolError as exc:  # e.g. a result too big for one frame
            log(f"cannot send reply: {exc}")
            self._send(ErrorReply(event.id, "internal", f"reply not sendable: {exc}"))

    def subscribe_events(self, request_id: int) -> None:
        if self._stream_id is not None:
            self._end_stream()

        def deliver(event: shim_events.Event) -> None:
            if not self._closed and self._stream_id == request_id:
                self._send(StreamItem(request_id, event.to_wire()))

        self._stream_id = request_id
        self._subscriber = deliver
        self._server.queue.subscribe(deliver)

    def _end_stream(self) -> None:
        if self._subscriber is not None:
            self._server.queue.unsubscribe(self._subscriber)
        if self._stream_id is not None and not self._closed:
            self._send(StreamEnd(self._stream_id))
        self._stream_id = None
        self._subscriber = None

    def _send(self, event: Any) -> None:
        if self._closed:
            return
        try:
            data = self._proto.send(event)
        except ConnectionEnded:  # broken or closed, not yet closed here: nothing to send
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._out:
            try:
                n = self._sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return
            data = data[n:]
            if not data:
                self._run_after_flush()
                return
        self._out += data
        if len(self._out) > MAX_OUTBUF:
            log("client does not read its replies; closing the connection")
            self.close()
            return
        self._loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        while self._out:
            try:
                n = self._sock.send(self._out)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            del self._out[:n]
        self._loop.remove_writer(self._fd)
        self._run_after_flush()

    def after_flush(self, cb: Callable[[], None]) -> None:
        self._after_flush.append(cb)
        if not self._out:
            self._loop.call_soon(self._run_after_flush)

    def _run_after_flush(self) -> None:
        if self._out:
            return
        callbacks, self._after_flush = self._after_flush, []
        for cb in callbacks:
            cb()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._subscriber is not None:
            self._server.queue.unsubscribe(self._subscriber)
            self._subscriber = None
        self._loop.forget_fd(self._fd)
        self._sock.close()
        self._server.forget(self)
        callbacks, self._after_flush = self._after_flush, []
        for cb in callbacks:
            cb()
