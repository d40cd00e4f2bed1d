"""A blocking client for berth's protocol: for the CLI, tests and scripts (no trio).

Works against berthd's socket and against a shim's socket alike.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from berth.shim.errors import BerthError, Unavailable
from berth.shim.protocol import (
    DEFAULT_MAX_FRAME,
    Cancel,
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    NeedData,
    Request,
    Response,
    Role,
    StreamEnd,
    StreamItem,
    Welcome,
)
from berth.shim.unixsock import connect_unix

if TYPE_CHECKING:
    from berth.shim.protocol import ReceivedEvent


class Client:
    def __init__(
        self,
        path: str,
        *,
        namespace: str | None = None,
        timeout: float | None = None,
        peer_name: str = "berth-client",
        max_frame_size: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.path = path
        self.namespace = namespace
        try:
            self._sock = connect_unix(path, timeout=5.0)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"cannot connect to {path}: {exc.strerror}") from None
        except OSError as exc:
            raise Unavailable(f"cannot connect to {path}: {exc}") from None
        self._sock.settimeout(timeout)
        self._conn = Connection(Role.CLIENT, peer_name=peer_name, max_frame_size=max_frame_size)
        self._send(Hello())
        event = self._next()
        if not isinstance(event, Welcome):
            raise Unavailable(f"unexpected handshake answer {event!r}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, event: Any) -> None:
        try:
            self._sock.sendall(self._conn.send(event))
        except OSError as exc:
            raise Unavailable(f"connection to {self.path} lost: {exc}") from None

    def _next(self) -> ReceivedEvent:
        while True:
            event = self._conn.next_event()
            if not isinstance(event, NeedData):
                if isinstance(event, ConnectionClosed):
                    raise Unavailable(f"{self.path} closed the connection")
                return event
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:
                raise Unavailable(f"connection to {self.path} lost: {exc}") from None
            self._conn.receive_data(data)

    def _meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        out = dict(meta or {})
        if self.namespace is not None:
            out.setdefault("namespace", self.namespace)
        return out

    def call(self, method: str, params: dict[str, Any] | None = None, **meta: Any) -> Any:
        rid = self._conn.next_request_id()
        self._send(Request(rid, method, params or {}, self._meta(meta)))
        while True:
            event = self._next()
            if isinstance(event, Response) and event.id == rid:
                return event.result
            if isinstance(event, ErrorReply) and event.id in (rid, None):
                raise event.to_exception()

    def stream(
        self, method: str, params: dict[str, Any] | None = None, **meta: Any
    ) -> Iterator[Any]:
        """Yield a server stream's items; closing the generator cancels the stream."""
        rid = self._conn.next_request_id()
        self._send(Request(rid, method, params or {}, self._meta(meta)))
        finished = False
        try:
            while True:
                event = self._next()
                if isinstance(event, StreamItem) and event.id == rid:
                    yield event.item
                elif isinstance(event, StreamEnd) and event.id == rid:
                    finished = True
                    return
                elif isinstance(event, ErrorReply) and event.id in (rid, None):
                    finished = True
                    raise event.to_exception()
                elif isinstance(event, Response) and event.id == rid:
                    finished = True
                    return
        finally:
            if not finished and rid in self._conn.open_requests:
                try:
                    self._send(Cancel(rid))
                except BerthError:
                    pass


def raw_socket(path: str) -> socket.socket:
    """A connected socket without a handshake (for tests of bad input)."""
    return connect_unix(path, timeout=5.0)
