"""JSON documents that come from outside berth (image manifests and configs, archives,
gRPC Any payloads): parsed with their size and nesting bounded, every failure a clear
InvalidArgument. Pure, trio-free.

json.loads recurses in C: 100,000 nested brackets raise RecursionError (not ValueError),
which callers that caught ValueError turned into internal errors, and a GC that parsed
such a blob stopped on it.
"""

from __future__ import annotations

import json
from typing import Any

from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.protocol import MAX_NESTING, nesting_exceeds


def load_json(data: bytes | str, what: str, *, max_size: int) -> Any:
    """Parse `data`; InvalidArgument if it is larger than `max_size`, not JSON, or nested
    deeper than the protocol allows a request to nest."""
    if len(data) > max_size:
        raise InvalidArgument(f"{what} is larger than {max_size} bytes")
    try:
        doc = json.loads(data)
    except RecursionError:
        raise InvalidArgument(f"{what} nests deeper than {MAX_NESTING} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if nesting_exceeds(doc, MAX_NESTING):
        raise InvalidArgument(f"{what} nests deeper than {MAX_NESTING} levels")
    return doc


def load_json_object(data: bytes | str, what: str, *, max_size: int) -> dict[str, Any]:
    doc = load_json(data, what, max_size=max_size)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return doc
