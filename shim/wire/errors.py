"""Typed errors shared by every berth component and mapped across the wire.

Modelled on containerd's errdefs: a small closed set of codes that a client can act on
(retry on `unavailable`, create on `not_found`, ...). Anything unexpected is `internal`.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:  # `typing` costs every CLI start ~9 ms: annotations only
    from typing import ClassVar


class BerthError(Exception):
    """Base of all errors that cross an API boundary. `code` is the wire name."""

    code: ClassVar[str] = "unknown"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")

    def __str__(self) -> str:
        return self.message


class NotFound(BerthError):
    code = "not_found"


class AlreadyExists(BerthError):
    code = "already_exists"


class InvalidArgument(BerthError):
    code = "invalid_argument"


class FailedPrecondition(BerthError):
    code = "failed_precondition"


def runtime_failure_message(runtime: str, command: str, code: int, reason: str) -> str:
    """How a shim words a runtime command that ran and failed; `runtime_failure_parts`
    reads it back (berth-grpc words it as containerd does). One format, kept here."""
    return f"{runtime} {command} failed (exit {code}): {reason}"


def runtime_failure_parts(message: str) -> tuple[str, str] | None:
    """(command, the runtime's reason) of a `runtime_failure_message`, else None."""
    head, sep, reason = message.partition(" failed (exit ")
    runtime, _, command = head.rpartition(" ")
    code, colon, reason = reason.partition("): ")
    if not (sep and colon and runtime and command) or not code.lstrip("-").isdigit():
        return None
    return command, reason


class Unavailable(BerthError):
    code = "unavailable"


class Reconnect(Unavailable):
    """The daemon is handing over to its successor (an upgrade, a takeover): the request was
    not carried out, or a long call (a wait, a stream) was ended; connect again and repeat
    it. On the wire it is `unavailable` with a "reconnect: " message, so that clients that
    predate it still treat it as what it is: a reason to reconnect and retry."""

    PREFIX: ClassVar[str] = "reconnect: "

    def __init__(self, message: str = "") -> None:
        text = message if message.startswith(self.PREFIX) else self.PREFIX + message
        super().__init__(text)


class Internal(BerthError):
    code = "internal"


class Unimplemented(BerthError):
    code = "unimplemented"


class Canceled(BerthError):
    code = "canceled"


class DeadlineExceeded(BerthError):
    code = "deadline_exceeded"


class PermissionDenied(BerthError):
    code = "permission_denied"


ERROR_TYPES: dict[str, type[BerthError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Unavailable,
        Internal,
        Unimplemented,
        Canceled,
        DeadlineExceeded,
        PermissionDenied,
    )
}


def error_from_wire(code: str, message: str) -> BerthError:
    """Rebuild the typed error a peer sent; unknown codes become `Internal` (never dropped)."""
    cls = ERROR_TYPES.get(code)
    if cls is None:
        return Internal(f"{code}: {message}")
    if cls is Unavailable and message.startswith(Reconnect.PREFIX):
        return Reconnect(message)
    return cls(message)
