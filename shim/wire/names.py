"""Validation of every name that becomes part of a path (IDs, namespaces, exec IDs).

containerd's rule: `[A-Za-z0-9][A-Za-z0-9_.-]{0,75}`. It excludes "/", ".." as a whole
name (the first character cannot be "."), and NUL, so a validated name joined under a
directory always stays inside it. Check before any path is built, never after.
"""

from __future__ import annotations

import re

from berth.shim.wire.errors import InvalidArgument

_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,75}")

# containerd's own identifiers (its pkg/identifiers: namespaces, containers, exec IDs, event
# topics' components): alphanumeric runs joined by single separators, at most 76
# characters. Narrower than _PATTERN ("a..b" and "a-" are refused), which still reads
# names made before berth applied it. One rule for berthd's metadata and events, and for
# berth-grpc.
IDENTIFIER_MAX = 76
IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def is_identifier(name: str) -> bool:
    """Whether `name` is one of containerd's identifiers."""
    return len(name) <= IDENTIFIER_MAX and IDENTIFIER.fullmatch(name) is not None


def validate(name: object, what: str = "identifier") -> str:
    """Return `name` if it is a valid identifier, else raise InvalidArgument."""
    if not isinstance(name, str):
        raise InvalidArgument(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidArgument(f"{what} must not be empty")
    if _PATTERN.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid {what} {name[:100]!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,75}}"
        )
    return name


def is_valid(name: object) -> bool:
    return isinstance(name, str) and _PATTERN.fullmatch(name) is not None
