"""A ttrpc client for the tests, written from the wire format alone (containerd/ttrpc 1.1:
10-byte header, protobuf Request/Response), independent of berth's server code: the
envelope messages are encoded and decoded by hand here; the method messages are the
containerd stubs' own."""

from __future__ import annotations

import socket
import struct
from typing import Any

HEADER = struct.Struct(">IIBB")


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def encode_request(
    service: str, method: str, payload: bytes, metadata: dict[str, str], timeout_ns: int = 0
) -> bytes:
    out = _field(1, service.encode()) + _field(2, method.encode()) + _field(3, payload)
    if timeout_ns:
        out += _varint(4 << 3 | 0) + _varint(timeout_ns)
    for key, value in metadata.items():
        out += _field(5, _field(1, key.encode()) + _field(2, value.encode()))
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> dict[int, Any]:
    """A flat protobuf message: field number -> last value (varints and byte strings)."""
    out: dict[int, Any] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], pos = _read_varint(data, pos)
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            out[number] = data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    """(status code, status message, payload) of a ttrpc Response."""
    fields = _fields(data)
    status = _fields(fields.get(1, b""))
    return int(status.get(1, 0)), bytes(status.get(2, b"")).decode(), bytes(fields.get(2, b""))


class TtrpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"ttrpc status {code}: {message}")
        self.code, self.message = code, message


class TtrpcClient:
    def __init__(self, path: str, namespace: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.namespace = namespace
        self.next_stream = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, service: str, method: str, request: Any, timeout_ns: int = 0) -> int:
        stream = self.next_stream
        self.next_stream += 2  # a client's streams are odd
        meta = {"containerd-namespace-ttrpc": self.namespace} if self.namespace else {}
        body = encode_request(service, method, request.SerializeToString(), meta, timeout_ns)
        self.sock.sendall(HEADER.pack(len(body), stream, 1, 0) + body)
        return stream

    def receive(self) -> tuple[int, int, str, bytes]:
        """(stream id, status code, message, payload) of the next response."""
        header = self._exactly(HEADER.size)
        length, stream, kind, _ = HEADER.unpack(header)
        assert kind == 2, kind
        code, message, payload = decode_response(self._exactly(length))
        return stream, code, message, payload

    def call(self, service: str, method: str, request: Any, response_cls: Any) -> Any:
        stream = self.send(service, method, request)
        got, code, message, payload = self.receive()
        assert got == stream
        if code:
            raise TtrpcError(code, message)
        return response_cls.FromString(payload)

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("ttrpc server closed the connection")
            data += chunk
        return data
