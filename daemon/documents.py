"""JSON documents that come from outside berth (image manifests and configs, archives,
gRPC Any payloads): parsed with their size and nesting bounded, every failure a clear
InvalidArgument. Pure, trio-free.

json.loads recurses in C: 100,000 nested brackets raise RecursionError (not ValueError),
which callers that caught ValueError turned into internal errors, and a GC that parsed
such a blob stopped on it.

JSON may escape half a UTF-16 pair (`"\\ud800"`): json.loads keeps it as a lone surrogate,
a str that no UTF-8 encoder takes (msgpack, SQLite, protobuf, a log line), so an image
whose config held one was imported and then failed every call that answered with it.
Go's encoding/json, which containerd and every image tool use, reads it as U+FFFD, and
invalid UTF-8 in a string too; so does this module.
"""

from __future__ import annotations

import json
import re
from typing import Any

from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.protocol import MAX_NESTING, nesting_exceeds


def load_json(data: bytes | str, what: str, *, max_size: int) -> Any:
    """Parse `data`; InvalidArgument if it is larger than `max_size`, not JSON, or nested
    deeper than the protocol allows a request to nest."""
    if len(data) > max_size:
        raise InvalidArgument(f"{what} is larger than {max_size} bytes")
    try:
        try:
            doc = json.loads(data)
        except UnicodeDecodeError:
            # Invalid UTF-8: Go reads each bad byte of a string as U+FFFD (containerd takes
            # such an image: a label in Latin-1, say), and so does this.
            assert isinstance(data, bytes)
            doc = json.loads(data.decode("utf-8", "replace"))
    except RecursionError:
        raise InvalidArgument(f"{what} nests deeper than {MAX_NESTING} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if nesting_exceeds(doc, MAX_NESTING):
        raise InvalidArgument(f"{what} nests deeper than {MAX_NESTING} levels")
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if _SURROGATE_ESCAPE.search(raw) or (isinstance(data, str) and b"\xed" in raw):
        doc = _without_surrogates(doc)  # a str may hold one as it is (ED A0 80...)
    return doc


# Only an escape makes a surrogate: a UTF-8 decoder refuses encoded ones (ED A0 80...).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(value: Any) -> Any:
    """`value` with every lone surrogate of its strings (keys too) made U+FFFD, as Go's
    encoding/json reads them (pairs were already joined by json.loads)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    return value


def load_json_object(data: bytes | str, what: str, *, max_size: int) -> dict[str, Any]:
    doc = load_json(data, what, max_size=max_size)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return doc
