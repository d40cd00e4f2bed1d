"""The sans-IO wire protocol: framing, rules, bounds, and hostile bytes."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.shim.wire.errors import NotFound, error_from_wire
from berth.shim.wire.protocol import (
    HEADER,
    NEED_DATA,
    Cancel,
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    StreamEnd,
    StreamItem,
    Welcome,
)


def pair(max_frame: int = 4096) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, max_frame_size=max_frame, peer_name="c")
    server = Connection(Role.SERVER, max_frame_size=max_frame, peer_name="s")
    server.receive_data(client.send(Hello()))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    client.receive_data(server.send(server.server_handshake(hello)))
    welcome = client.next_event()
    assert isinstance(welcome, Welcome) and welcome.version == 1
    return client, server


def raw_frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def test_request_response_round_trip() -> None:
    client, server = pair()
    server.receive_data(client.send(Request(1, "tasks.get", {"id": "c1"}, {"namespace": "ns"})))
    req = server.next_event()
    assert req == Request(1, "tasks.get", {"id": "c1"}, {"namespace": "ns"})
    assert server.next_event() is NEED_DATA
    client.receive_data(server.send(Response(1, {"pid": 42})))
    assert client.next_event() == Response(1, {"pid": 42})
    assert client.open_requests == frozenset()


def test_stream_items_then_end_and_cancel() -> None:
    client, server = pair()
    server.receive_data(client.send(Request(7, "events", {}, {})))
    assert isinstance(server.next_event(), Request)
    data = server.send(StreamItem(7, {"n": 1})) + server.send(StreamItem(7, {"n": 2}))
    client.receive_data(data)
    assert client.next_event() == StreamItem(7, {"n": 1})
    assert client.next_event() == StreamItem(7, {"n": 2})
    server.receive_data(client.send(Cancel(7)))
    assert server.next_event() == Cancel(7)
    client.receive_data(server.send(StreamEnd(7)))
    assert client.next_event() == StreamEnd(7)
    with pytest.raises(LocalProtocolError):
        client.send(Cancel(7))  # no longer open


def test_typed_errors_cross_the_wire() -> None:
    client, server = pair()
    server.receive_data(client.send(Request(3, "x", {}, {})))
    server.next_event()
    client.receive_data(server.send(ErrorReply.from_exception(3, NotFound("no such task"))))
    reply = client.next_event()
    assert isinstance(reply, ErrorReply)
    exc = reply.to_exception()
    assert isinstance(exc, NotFound) and str(exc) == "no such task"
    assert type(error_from_wire("bogus", "m")).__name__ == "Internal"


def test_an_error_naming_undecodable_bytes_still_crosses_the_wire() -> None:
    """A path read from a tar or a directory keeps undecodable bytes as lone surrogates;
    an error naming one could not be encoded and ended the connection. It crosses now,
    the bytes shown as \\xNN (another lone surrogate as \\udNNN)."""
    client, server = pair()
    server.receive_data(client.send(Request(4, "x", {}, {})))
    server.next_event()
    message = "cannot apply 'caf\udce9' (\ud800)"
    client.receive_data(server.send(ErrorReply.from_exception(4, NotFound(message))))
    reply = client.next_event()
    assert isinstance(reply, ErrorReply)
    assert reply.message == "cannot apply 'caf\\xe9' (\\ud800)"


def test_frames_split_at_every_byte() -> None:
    client, server = pair()
    data = client.send(Request(1, "m", {"blob": b"x" * 300}, {}))
    for i in range(len(data) - 1):
        server.receive_data(data[i : i + 1])
        assert server.next_event() is NEED_DATA
    server.receive_data(data[-1:])
    assert isinstance(server.next_event(), Request)


def test_oversize_frame_is_skipped_and_the_connection_survives() -> None:
    client, server = pair(max_frame=1024)
    huge = HEADER.pack(10_000_000) + b"\0" * 5000
    server.receive_data(huge)
    with pytest.raises(RemoteProtocolError) as err:
        server.next_event()
    assert not err.value.fatal and "exceeds" in str(err.value)
    # The rest of the oversize frame is dropped as it arrives, never buffered.
    remaining = 10_000_000 - 5000
    chunk = b"\0" * 65536
    while remaining > 0:
        n = min(remaining, len(chunk))
        server.receive_data(chunk[:n])
        remaining -= n
        assert server.next_event() is NEED_DATA
        assert len(server._buffer) == 0
    server.receive_data(client.send(Request(5, "ok", {}, {})))
    assert server.next_event() == Request(5, "ok", {}, {})


def test_sender_refuses_oversize_frames() -> None:
    client, _ = pair(max_frame=1024)
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, "m", {"blob": b"x" * 2000}, {}))


@pytest.mark.parametrize(
    "frame,request_id",
    [
        (raw_frame("not a list"), None),
        (raw_frame([]), None),
        (raw_frame([2, 9, "m", "params-not-a-map", {}]), 9),
        (raw_frame([2, 9, 123, {}, {}]), 9),
        (raw_frame([2, -1, "m", {}, {}]), None),
        (raw_frame([2, 9, "m" * 200, {}, {}]), 9),
        (raw_frame([99, 1]), None),
        (raw_frame([3, 1, "a client may not send RESPONSE"]), None),
        (HEADER.pack(3) + b"\xc1\xc1\xc1", None),  # 0xc1 is never valid msgpack
        (HEADER.pack(0), None),
        (raw_frame([[[[[[[[[[]]]]]]]]]]), None),
    ],
)
def test_malformed_frames_are_typed_recoverable_errors(
    frame: bytes, request_id: int | None
) -> None:
    client, server = pair()
    server.receive_data(frame)
    with pytest.raises(RemoteProtocolError) as err:
        server.next_event()
    assert not err.value.fatal
    assert err.value.request_id == request_id
    server.receive_data(client.send(Request(1, "after", {}, {})))
    assert server.next_event() == Request(1, "after", {}, {})


def test_deep_nesting_is_refused() -> None:
    _, server = pair(max_frame=1 << 20)
    body = b"\x91" * 100_000 + b"\xc0"
    server.receive_data(HEADER.pack(len(body)) + body)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@pytest.mark.parametrize("depth", [65, 1000])
def test_request_params_nested_too_deep_are_answered_and_the_connection_survives(
    depth: int,
) -> None:
    """msgpack decodes ~1,000 levels; handlers that walk or JSON-encode params must never
    see more than MAX_NESTING (a 1,000-deep spec was a RecursionError, `internal`)."""
    _, server = pair(max_frame=1 << 20)
    params: dict[str, object] = {}
    node = params
    for _ in range(depth - 1):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    server.receive_data(raw_frame([2, 7, "containers.create", params, {}]))
    with pytest.raises(RemoteProtocolError, match="nest deeper") as err:
        server.next_event()
    assert (err.value.fatal, err.value.request_id) == (False, 7)
    ok = {"spec": {"linux": {"resources": {"devices": [{"allow": False}]}}}}
    server.receive_data(raw_frame([2, 8, "containers.create", ok, {}]))
    assert server.next_event() == Request(8, "containers.create", ok, {})


def test_handshake_rules() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(raw_frame([2, 1, "m", {}, {}]))
    with pytest.raises(RemoteProtocolError) as err:
        server.next_event()
    assert err.value.fatal
    server = Connection(Role.SERVER)
    server.receive_data(raw_frame([0, [7, 8], "future-client"]))
    with pytest.raises(RemoteProtocolError, match="no common protocol version") as err:
        server.next_event()
    assert err.value.fatal
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(Request(1, "m", {}, {}))  # before WELCOME


def test_newer_peer_negotiates_down_to_a_common_version() -> None:
    server = Connection(Role.SERVER, versions=(1,))
    client = Connection(Role.CLIENT, versions=(1, 2, 3))
    server.receive_data(client.send(Hello(versions=(1, 2, 3))))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    client.receive_data(server.send(server.server_handshake(hello)))
    assert client.next_event() == Welcome(1, "")


def test_clean_and_unclean_eof() -> None:
    _client, server = pair()
    server.receive_data(b"")
    assert isinstance(server.next_event(), ConnectionClosed)
    client2, server2 = pair()
    data = client2.send(Request(1, "m", {}, {}))
    server2.receive_data(data[:5])
    server2.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as err:
        server2.next_event()
    assert err.value.fatal


def test_feeding_without_draining_is_bounded() -> None:
    _, server = pair(max_frame=1024)
    with pytest.raises(LocalProtocolError):
        for _ in range(100):
            server.receive_data(b"\0\0\0\x10" + b"x" * 16 * 1024)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_arbitrary_bytes_never_escape_as_anything_but_protocol_errors(chunks: list[bytes]) -> None:
    _, server = pair(max_frame=512)
    for chunk in chunks:
        try:
            server.receive_data(chunk)
        except LocalProtocolError:
            return
        for _ in range(50):
            try:
                event = server.next_event()
            except RemoteProtocolError as exc:
                if exc.fatal:
                    return
                continue
            except LocalProtocolError:
                return
            if event is NEED_DATA:
                break
        assert len(server._buffer) <= 512 + 4 + 256 * 1024


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=20)
        | st.binary(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_any_msgpack_value_round_trips_as_params(value: object) -> None:
    client, server = pair(max_frame=1 << 20)
    server.receive_data(client.send(Request(1, "m", {"v": value}, {})))
    event = server.next_event()
    assert isinstance(event, Request) and event.params == {"v": value}


def test_protocol_error_hierarchy() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert struct.calcsize(">I") == HEADER.size


def test_any_bad_frame_before_the_handshake_is_fatal() -> None:
    for frame in (
        raw_frame(["not", "hello"]),
        HEADER.pack(2) + b"\xc1\xc1",
        raw_frame([2, 1, "m", {}, {}]),
    ):
        server = Connection(Role.SERVER)
        server.receive_data(frame)
        with pytest.raises(RemoteProtocolError) as err:
            server.next_event()
        assert err.value.fatal


def _dropping_server(path: str, answered: list[str]) -> threading.Thread:
    """A peer that welcomes each client, reads its request, then closes without answering
    (what an old release's daemon does with accepted connections as it stops)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)

    def serve() -> None:
        with listener:
            for _ in range(2):
                sock, _ = listener.accept()
                with sock:
                    server = Connection(Role.SERVER)
                    while True:
                        server.receive_data(sock.recv(65536))
                        event = server.next_event()
                        if isinstance(event, Hello):
                            sock.sendall(server.send(server.server_handshake(event)))
                        elif isinstance(event, Request):
                            answered.append(event.method)
                            break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_dropped_call_is_repeatable_only_if_it_changes_nothing(tmp_path: Path) -> None:
    from berth.shim.wire.client import Client
    from berth.shim.wire.errors import Reconnect, Unavailable

    path = str(tmp_path / "peer.sock")
    seen: list[str] = []
    thread = _dropping_server(path, seen)
    with Client(path, timeout=5) as client, pytest.raises(Reconnect):
        client.call("tasks.list", {})  # the CLI repeats it on a new connection
    with Client(path, timeout=5) as client, pytest.raises(Unavailable) as lost:
        client.call("tasks.kill", {"container_id": "x", "signal": 9})
    assert not isinstance(lost.value, Reconnect)  # it may have been carried out
    thread.join(5)
    assert seen == ["tasks.list", "tasks.kill"]


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200))
def test_packed_pids_round_trip(pids: list[int]) -> None:
    from berth.shim.wire.status import pack_pids, unpack_pids

    packed = pack_pids(pids)
    assert len(packed) == 4 * len(pids)
    assert unpack_pids(packed) == pids


def test_packed_pids_refuse_what_is_not_a_pid_list() -> None:
    from berth.shim.wire.status import pack_pids, unpack_pids

    assert pack_pids([1, 2]) == b"\x01\x00\x00\x00\x02\x00\x00\x00"  # little-endian
    with pytest.raises(ValueError, match="7 bytes"):
        unpack_pids(b"\x00" * 7)
    with pytest.raises(OverflowError):
        pack_pids([2**32])


def test_a_shim_reply_of_250_000_processes_fits_its_frame() -> None:
    """`tasks ps` of a container with ~60,000 processes or more overflowed the shim's
    1 MiB frame (a map per process); packed, 250,000 fit (Linux's pid_max is at most
    2**22)."""
    from berth.shim.api import MAX_FRAME
    from berth.shim.wire.protocol import encode
    from berth.shim.wire.status import pack_pids

    pids = list(range(4_000_000, 4_250_000))
    packed = encode({"pids": pack_pids(pids), "execs": {f"exec-{i}": i for i in range(100)}})
    assert len(packed) < MAX_FRAME
    legacy = encode({"processes": [{"pid": pid, "exec_id": ""} for pid in pids[:62_000]]})
    assert len(legacy) > MAX_FRAME
