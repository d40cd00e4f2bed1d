"""What a served call is, whatever carries it (gRPC over HTTP/2, or ttrpc): gRPC's status
codes, the method table entry (`Route`), and the context a handler is given (`Context`:
its caller's metadata, and `abort`).

The handlers are written against this small surface, so both transports answer alike and
neither needs grpcio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NoReturn


class StatusCode(enum.IntEnum):
    """gRPC's status codes (grpc/doc/statuscodes.md), as sent in `grpc-status`."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Aborted(Exception):
    """A call ends with this status (raised by `Context.abort`)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    """What a handler uses of its call: the caller's metadata, and a way to end the call
    with a status (the two methods of grpcio's servicer context the services use)."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata

    async def abort(self, code: StatusCode, details: str = "") -> NoReturn:
        raise Aborted(code, details)


@dataclass(frozen=True)
class Route:
    """One method: its request message, its handler, and which sides stream.

    A handler is called as grpcio calls one: `(request, context)`, where request is the
    decoded message, or an async iterator of them when the client streams; it returns an
    awaitable of the response, or an async iterator of responses when the server streams.
    """

    request_cls: Any
    handler: Any
    client_streaming: bool = False
    server_streaming: bool = False

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming
