"""msgpack in pure Python, for the CLI's start-up: the part of the format berth's wire uses.

Why not the `msgpack` package here: importing it is most of what a CLI call costs before
it can speak. Its package imports `datetime` and `collections` (for `Timestamp` and
`ExtType`) and loads a 1.6 MB extension module; measured on 2 vCPUs that is ~4-6 ms of a
~17 ms `berth version`, against ~0.3 ms for this module. berthd and the shim keep the C
`msgpack` (they start once and move large frames); the CLI reads a large frame (a long
listing) with it too, where loading it costs less than pure Python's slower decoding
(protocol.LEAN_DECODE_LIMIT).

What it covers is exactly what berth sends: nil, booleans, integers of int64/uint64,
floats (float64 out; float32 and float64 in), str, bin, arrays and maps. It matches
`msgpack.packb(obj, use_bin_type=True)` byte for byte and
`msgpack.unpackb(data, raw=False, strict_map_key=True)` value for value (a hypothesis test
holds the two together, tests/test_packing.py). Where it differs, it refuses: ext types
(msgpack's Timestamp and ExtType, never on berth's wire) are an error, not a value.

Decoding is iterative (a deep document cannot exhaust Python's stack) and allocates
nothing from a declared length: an array that claims 2^32 items in a 10-byte input fails
at the end of the input, having built only what the input held.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Final

# msgpack's own C unpacker refuses documents nested deeper than this (its StackError).
MAX_DEPTH: Final = 1024

_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_I8, _I16, _I32, _I64 = (struct.Struct(f">{c}") for c in "bhiq")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")


class UnpackError(ValueError):
    """The bytes are not one complete msgpack document of the kinds berth's wire carries."""


# --- packing ------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    """The msgpack encoding of `obj`, as `msgpack.packb(obj, use_bin_type=True)` makes it.

    TypeError for a value msgpack cannot carry, OverflowError for an integer outside
    int64/uint64, ValueError for a value nested more than MAX_DEPTH levels deep (msgpack's
    own packer refuses there too, since 1.1; berthd refuses a request nested over 64, and
    says so: the client must be able to send it). Iterative, so no depth reaches
    Python's recursion limit."""
    out: list[bytes] = []
    put = out.append
    # What is still to be packed, innermost last: an iterator over each open container.
    pending: list[Any] = [iter((obj,))]
    while pending:
        for item in pending[-1]:
            if isinstance(item, (list, tuple)):
                put(_header(len(item), 0x90, b"\xdc", b"\xdd"))
                children: Any = iter(item)
            elif isinstance(item, dict):
                put(_header(len(item), 0x80, b"\xde", b"\xdf"))
                children = _flattened(item)
            else:
                put(_pack_scalar(item))
                continue
            if item:
                if len(pending) > MAX_DEPTH:  # its items would be one level too deep
                    raise ValueError("recursion limit exceeded")
                pending.append(children)
                break  # pack the container's items, then come back to this one's
        else:
            pending.pop()
    return b"".join(out)


def _flattened(mapping: dict[Any, Any]) -> Any:
    for key, value in mapping.items():
        yield key
        yield value


def _pack_scalar(obj: Any) -> bytes:
    if obj is None:
        return b"\xc0"
    if obj is True:
        return b"\xc3"
    if obj is False:
        return b"\xc2"
    if isinstance(obj, int):
        return _pack_int(obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        if len(data) < 32:
            return bytes((0xA0 | len(data),)) + data
        return _length_prefixed(data, b"\xd9", b"\xda", b"\xdb", "str")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _length_prefixed(bytes(obj), b"\xc4", b"\xc5", b"\xc6", "bytes object")
    if isinstance(obj, float):
        return b"\xcb" + _F64.pack(obj)
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def _length_prefixed(data: bytes, u8: bytes, u16: bytes, u32: bytes, what: str) -> bytes:
    """str 8/16/32 or bin 8/16/32: the smallest length field that holds len(data)."""
    n = len(data)
    if n < 0x100:
        return u8 + _U8.pack(n) + data
    if n < 0x10000:
        return u16 + _U16.pack(n) + data
    if n < 0x100000000:
        return u32 + _U32.pack(n) + data
    raise ValueError(f"{what} is too large")


def _pack_int(n: int) -> bytes:
    if n >= 0:
        if n < 0x80:
            return bytes((n,))
        if n < 0x100:
            return b"\xcc" + _U8.pack(n)
        if n < 0x10000:
            return b"\xcd" + _U16.pack(n)
        if n < 0x100000000:
            return b"\xce" + _U32.pack(n)
        if n < 0x10000000000000000:
            return b"\xcf" + _U64.pack(n)
    else:
        if n >= -32:
            return bytes((n & 0xFF,))
        if n >= -0x80:
            return b"\xd0" + _I8.pack(n)
        if n >= -0x8000:
            return b"\xd1" + _I16.pack(n)
        if n >= -0x80000000:
            return b"\xd2" + _I32.pack(n)
        if n >= -0x8000000000000000:
            return b"\xd3" + _I64.pack(n)
    raise OverflowError("Integer value out of range")


def _header(n: int, fix: int, short: bytes, long: bytes) -> bytes:
    if n < 16:
        return bytes((fix | n,))
    if n < 0x10000:
        return short + _U16.pack(n)
    if n < 0x100000000:
        return long + _U32.pack(n)
    raise ValueError("container is too large")


# --- unpacking ----------------------------------------------------------------------------

# Fixed-size scalars by first byte: (struct, size).
_SCALARS: Final = {
    0xCA: _F32,
    0xCB: _F64,
    0xCC: _U8,
    0xCD: _U16,
    0xCE: _U32,
    0xCF: _U64,
    0xD0: _I8,
    0xD1: _I16,
    0xD2: _I32,
    0xD3: _I64,
}
# Length-prefixed kinds by first byte: (struct of the length, kind).
_SIZED: Final = {
    0xD9: (_U8, "str"),
    0xDA: (_U16, "str"),
    0xDB: (_U32, "str"),
    0xC4: (_U8, "bin"),
    0xC5: (_U16, "bin"),
    0xC6: (_U32, "bin"),
    0xDC: (_U16, "array"),
    0xDD: (_U32, "array"),
    0xDE: (_U16, "map"),
    0xDF: (_U32, "map"),
}
_EXT: Final = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
_NO_VALUE: Final = object()


def unpack(data: bytes) -> Any:
    """The one document in `data`, as `msgpack.unpackb(data, raw=False,
    strict_map_key=True)` reads it. UnpackError if `data` is incomplete, holds more than one
    document, nests deeper than MAX_DEPTH, uses an ext type or a map key that is not str or
    bytes; UnicodeDecodeError for a str that is not UTF-8."""
    end = len(data)
    pos = 0
    # Open containers: [list_or_dict, items still to read, pending key or _NO_VALUE].
    stack: list[list[Any]] = []
    while True:
        value, count, is_map, pos = _item(data, pos, end)
        if count >= 0:
            if stack and stack[-1][2] is _NO_VALUE and isinstance(stack[-1][0], dict):
                raise UnpackError("a map key must be str or bytes")
            if len(stack) >= MAX_DEPTH:
                raise UnpackError("nested too deeply")
            if count:
                stack.append([{} if is_map else [], count * 2 if is_map else count, _NO_VALUE])
                continue
            value = {} if is_map else []
        # Attach `value` to the innermost open container; close every container it fills.
        while True:
            if not stack:
                if pos != end:
                    raise UnpackError("extra data after the document")
                return value
            top = stack[-1]
            container = top[0]
            if isinstance(container, list):
                container.append(value)
            elif top[2] is _NO_VALUE:
                if not isinstance(value, (str, bytes)):
                    raise UnpackError("a map key must be str or bytes")
                top[2] = value
            else:
                container[top[2]] = value
                top[2] = _NO_VALUE
            top[1] -= 1
            if top[1]:
                break
            stack.pop()
            value = container


def _item(data: bytes, pos: int, end: int) -> tuple[Any, int, bool, int]:  # noqa: C901
    """The item that starts at `pos`: (value, count, is_map, where the next item starts).
    count >= 0: a container of that many items (pairs, for a map) begins, and value is
    None. One branch per first byte, in the order msgpack's table lists them."""
    if pos >= end:
        raise UnpackError("incomplete input")
    first = data[pos]
    pos += 1
    if first < 0x80:
        return first, -1, False, pos
    if first >= 0xE0:
        return first - 0x100, -1, False, pos
    if first < 0x90:
        return None, first & 0x0F, True, pos
    if first < 0xA0:
        return None, first & 0x0F, False, pos
    if first < 0xC0:
        n = first & 0x1F
        if pos + n > end:
            raise UnpackError("incomplete input")
        return data[pos : pos + n].decode("utf-8"), -1, False, pos + n
    if first == 0xC0:
        return None, -1, False, pos
    if first == 0xC2:
        return False, -1, False, pos
    if first == 0xC3:
        return True, -1, False, pos
    fmt = _SCALARS.get(first)
    if fmt is not None:
        if pos + fmt.size > end:
            raise UnpackError("incomplete input")
        return fmt.unpack_from(data, pos)[0], -1, False, pos + fmt.size
    sized = _SIZED.get(first)
    if sized is not None:
        fmt, kind = sized
        if pos + fmt.size > end:
            raise UnpackError("incomplete input")
        n = fmt.unpack_from(data, pos)[0]
        pos += fmt.size
        if kind == "array":
            return None, n, False, pos
        if kind == "map":
            return None, n, True, pos
        if pos + n > end:
            raise UnpackError("incomplete input")
        chunk = data[pos : pos + n]
        return (chunk.decode("utf-8") if kind == "str" else bytes(chunk)), -1, False, pos + n
    if first in _EXT:
        raise UnpackError("ext types are not part of berth's wire")
    raise UnpackError(f"invalid first byte 0x{first:02x}")  # 0xC1: never used
