"""berth-grpc at the wire: containerd's encodings, error codes and event stream, checked
with a plain grpcio client (the dockerd and ctr tests use the real clients)."""

from __future__ import annotations

import collections
import json
import os
import queue
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.daemon.grpc import convert as capi
from berth.daemon.oci import default_spec
from tests.support.clients import frontend_pids, grpc_address, grpc_command
from tests.support.helpers import is_gone, stop_child, wait_until
from tests.support.wire import C, T, Wire, container_message, served_wire

pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with served_wire() as w:
        yield w


def test_health_and_version(wire: Wire) -> None:
    from grpc_health.v1 import health_pb2

    reply = wire.unary(
        "/grpc.health.v1.Health/Check",
        health_pb2.HealthCheckRequest(),
        health_pb2.HealthCheckResponse,
        namespace=None,
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    version = wire.unary(
        "/containerd.services.version.v1.Version/Version",
        wire.t.Empty(),
        wire.t.version.VersionResponse,
        namespace=None,
    )
    assert version.version.startswith("1.6.")


def test_errors_keep_their_codes(wire: Wire) -> None:
    t = wire.t
    get = t.containers.GetContainerRequest(id="nosuch")
    assert wire.code(C + "Get", get, t.containers.GetContainerResponse) == (
        grpc.StatusCode.NOT_FOUND
    )
    # no namespace header: containerd's FailedPrecondition
    listing = t.containers.ListContainersRequest()
    assert (
        wire.code(C + "List", listing, t.containers.ListContainersResponse, namespace=None)
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    # a spec that is not JSON, and a spec of the wrong type: InvalidArgument, nothing made
    bad_json = t.Any(type_url=capi.SPEC_TYPE, value=b"{not json")
    create = t.containers.CreateContainerRequest(
        container=container_message(wire, "bad1", ["true"], bad_json)
    )
    assert wire.code(C + "Create", create, t.containers.CreateContainerResponse) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    wrong = t.Any(type_url="types.containerd.io/something/Else", value=b"{}")
    create = t.containers.CreateContainerRequest(
        container=container_message(wire, "bad2", ["true"], wrong)
    )
    assert wire.code(C + "Create", create, t.containers.CreateContainerResponse) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # nested 100,000 deep (json.loads raised RecursionError: UNKNOWN), or 65 deep
    for depth in (100_000, 65):
        deep = t.Any(type_url=capi.SPEC_TYPE, value=b'{"a":' * depth + b"1" + b"}" * depth)
        create = t.containers.CreateContainerRequest(
            container=container_message(wire, f"deep{depth}", ["true"], deep)
        )
        assert wire.code(C + "Create", create, t.containers.CreateContainerResponse) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert not wire.unary(C + "List", listing, t.containers.ListContainersResponse).containers
    # twice the same id: AlreadyExists
    good = t.containers.CreateContainerRequest(container=container_message(wire, "dup", ["true"]))
    wire.unary(C + "Create", good, t.containers.CreateContainerResponse)
    assert wire.code(C + "Create", good, t.containers.CreateContainerResponse) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    wire.unary(C + "Delete", t.containers.DeleteContainerRequest(id="dup"), t.Empty)
    # what berth does not do: Unimplemented, not a silent success
    checkpoint = t.tasks.CheckpointTaskRequest(container_id="dup")
    assert wire.code(T + "Checkpoint", checkpoint, t.tasks.CheckpointTaskResponse) == (
        grpc.StatusCode.UNIMPLEMENTED
    )


def test_container_round_trip_keeps_encodings(wire: Wire) -> None:
    t = wire.t
    options = t.runc.Options(binary_name="runc", root="/tmp/unused-root")
    container = container_message(wire, "rt", ["true"])
    container.labels["com.example/role"] = "web"
    container.runtime.options.CopyFrom(
        t.Any(type_url=capi.RUNC_OPTIONS_TYPE, value=options.SerializeToString())
    )
    wire.unary(
        C + "Create",
        t.containers.CreateContainerRequest(container=container),
        t.containers.CreateContainerResponse,
    )
    got = wire.unary(
        C + "Get", t.containers.GetContainerRequest(id="rt"), t.containers.GetContainerResponse
    ).container
    assert got.runtime.name == "io.containerd.runc.v2"
    assert got.runtime.options.type_url == capi.RUNC_OPTIONS_TYPE
    assert got.runtime.options.value == options.SerializeToString()
    assert got.spec.type_url == capi.SPEC_TYPE
    assert json.loads(got.spec.value)["process"]["args"] == ["true"]
    assert dict(got.labels) == {"com.example/role": "web"}
    assert got.created_at.seconds > 1_700_000_000
    # label update by field mask: one label set, the others kept
    update = t.containers.Container(id="rt")
    update.labels["extra"] = "1"
    request = t.containers.UpdateContainerRequest(container=update)
    request.update_mask.paths.append("labels.extra")
    updated = wire.unary(C + "Update", request, t.containers.UpdateContainerResponse).container
    assert dict(updated.labels) == {"com.example/role": "web", "extra": "1"}
    # filters as containerd parses them, quoted label keys included
    listing = t.containers.ListContainersRequest(filters=['labels."com.example/role"==web'])
    found = wire.unary(C + "List", listing, t.containers.ListContainersResponse).containers
    assert [c.id for c in found] == ["rt"]
    wire.unary(C + "Delete", t.containers.DeleteContainerRequest(id="rt"), t.Empty)


def test_task_lifecycle_with_events(wire: Wire) -> None:
    t = wire.t
    events: queue.Queue[Any] = queue.Queue()
    stream = wire.subscribe([f"namespace=={wire.namespace},topic~=|^/tasks/|"])

    def pump() -> None:
        try:
            for envelope in stream:
                events.put(envelope)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        container = container_message(wire, "ev", ["sh", "-c", "sleep 1000"])
        wire.unary(
            C + "Create",
            t.containers.CreateContainerRequest(container=container),
            t.containers.CreateContainerResponse,
        )
        created = wire.unary(
            T + "Create", t.tasks.CreateTaskRequest(container_id="ev"), t.tasks.CreateTaskResponse
        )
        assert created.pid > 0
        wire.unary(T + "Start", t.tasks.StartRequest(container_id="ev"), t.tasks.StartResponse)
        process = wire.unary(
            T + "Get", t.tasks.GetRequest(container_id="ev"), t.tasks.GetResponse
        ).process
        assert process.status == 2  # RUNNING
        assert process.exited_at.seconds == capi.ZERO_TIME_SECONDS  # Go's zero time
        wire.unary(T + "Kill", t.tasks.KillRequest(container_id="ev", signal=9), t.Empty)
        waited = wire.unary(
            T + "Wait", t.tasks.WaitRequest(container_id="ev"), t.tasks.WaitResponse
        )
        assert waited.exit_status == 137 and waited.exited_at.seconds > 0

        def exit_event() -> Any:
            while True:
                try:
                    envelope = events.get(timeout=0.1)
                except queue.Empty:
                    return None
                if envelope.topic == "/tasks/exit":
                    return envelope

        envelope = wait_until(exit_event, timeout=15, what="a /tasks/exit envelope")
        assert envelope.namespace == wire.namespace
        assert envelope.event.type_url == "containerd.events.TaskExit"
        exit_msg = wire.t.event_types["containerd.events.TaskExit"].FromString(envelope.event.value)
        assert (exit_msg.container_id, exit_msg.id, exit_msg.exit_status) == ("ev", "ev", 137)

        deleted = wire.unary(
            T + "Delete", t.tasks.DeleteTaskRequest(container_id="ev"), t.tasks.DeleteResponse
        )
        assert deleted.exit_status == 137 and deleted.pid == created.pid
        assert (
            wire.code(T + "Get", t.tasks.GetRequest(container_id="ev"), t.tasks.GetResponse)
            == grpc.StatusCode.NOT_FOUND
        )
        wire.unary(C + "Delete", t.containers.DeleteContainerRequest(id="ev"), t.Empty)
    finally:
        stream.cancel()
        reader.join(10)


def test_content_write_read_update(wire: Wire) -> None:
    import hashlib

    t = wire.t
    data = b"berth content " * 500_000  # 7 MB: 1 MiB writes, then one larger than a frame
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    write = wire.channel.stream_stream(
        "/containerd.services.content.v1.Content/Write",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.content.WriteContentResponse.FromString,
    )

    def requests() -> Iterator[Any]:
        yield t.content.WriteContentRequest(
            action=0, ref="test-ref", total=len(data), expected=digest
        )
        for offset in range(0, 2 << 20, 1 << 20):
            yield t.content.WriteContentRequest(
                action=1, offset=offset, data=data[offset : offset + (1 << 20)]
            )
        # the rest in one message (5 MB): more than one berthd frame holds
        yield t.content.WriteContentRequest(action=1, offset=2 << 20, data=data[2 << 20 :])
        commit = t.content.WriteContentRequest(
            action=2, total=len(data), expected=digest, offset=len(data)
        )
        commit.labels["a"] = "1"
        yield commit

    replies = list(write(requests(), metadata=wire.meta(), timeout=60))
    assert replies[-1].digest == digest and replies[-1].offset == len(data)

    # the same digest again: AlreadyExists at the first message, as containerd answers
    with pytest.raises(grpc.RpcError) as info:
        list(
            write(
                iter(
                    [
                        t.content.WriteContentRequest(
                            action=0, ref="again", total=len(data), expected=digest
                        )
                    ]
                ),
                metadata=wire.meta(),
                timeout=60,
            )
        )
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

    read = wire.channel.unary_stream(
        "/containerd.services.content.v1.Content/Read",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.content.ReadContentResponse.FromString,
    )
    chunks = list(read(t.content.ReadContentRequest(digest=digest), metadata=wire.meta()))
    assert b"".join(c.data for c in chunks) == data
    tail = list(
        read(t.content.ReadContentRequest(digest=digest, offset=10, size=5), metadata=wire.meta())
    )
    assert b"".join(c.data for c in tail) == data[10:15]

    def read_range(offset: int, size: int = 0) -> bytes:
        request = t.content.ReadContentRequest(digest=digest, offset=offset, size=size)
        return b"".join(c.data for c in read(request, metadata=wire.meta()))

    mib = 1 << 20
    assert read_range(mib - 3, 2 * mib + 6) == data[mib - 3 : 3 * mib + 3]  # across pieces
    assert read_range(2 * mib, 2 * mib) == data[2 * mib : 4 * mib]  # whole pieces
    assert read_range(len(data) - 7) == data[-7:]
    assert read_range(len(data)) == b""  # at the end: nothing, as containerd
    assert read_range(-5, 4) == data[:4]  # containerd reads a negative offset from 0
    with pytest.raises(grpc.RpcError) as past:
        read_range(len(data) + 1)
    assert past.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"read past object length {len(data)} bytes" in (past.value.details() or "")

    update = t.content.UpdateRequest(info=t.content.Info(digest=digest, labels={"b": "2"}))
    update.update_mask.paths.append("labels.b")
    info = wire.unary(
        "/containerd.services.content.v1.Content/Update", update, t.content.UpdateResponse
    ).info
    assert dict(info.labels) == {"a": "1", "b": "2"} and info.size == len(data)
    wire.unary(
        "/containerd.services.content.v1.Content/Delete",
        t.content.DeleteContentRequest(digest=digest),
        t.Empty,
    )
    assert (
        wire.code(
            "/containerd.services.content.v1.Content/Info",
            t.content.InfoRequest(digest=digest),
            t.content.InfoResponse,
        )
        == grpc.StatusCode.NOT_FOUND
    )


def test_lists_larger_than_a_frame_arrive_whole(wire: Wire) -> None:
    """60 containers of ~80 KiB each (~5 MB): more than one 4 MiB reply frame. berthd pages
    the list for clients that ask; the CLI and berth-grpc (Containers/List and ListStream)
    ask, so each returns all 60, once each."""
    d, ns = wire.daemon, "bigns"
    ids = [f"big-{i:02d}" for i in range(60)]
    with d.client(ns) as c:
        for cid in ids:
            spec = default_spec(cid, ns, ["true"], root="")
            spec["annotations"] = {"filler": "x" * (80 << 10)}
            c.call("containers.create", {"id": cid, "spec": spec})
        try:
            first = c.call("containers.list", {"page": {}})
            assert first["next"] and 0 < len(first["containers"]) < 60
            rest = c.call("containers.list", {"page": {"after": first["next"]}})
            paged = [x["id"] for x in first["containers"] + rest["containers"]]
            assert rest["next"] is None and paged == ids  # key order, none twice
            r = d.cli("containers", "ls", "--format", "json", namespace=ns)
            assert r.returncode == 0, r.stderr
            assert sorted(x["id"] for x in json.loads(r.stdout)) == ids
            # A client that accepts 16 MiB replies, as ctr does (grpcio's default is 4 MiB).
            channel = grpc.insecure_channel(
                f"unix:{grpc_address(d)}", options=[("grpc.max_receive_message_length", 16 << 20)]
            )
            list_all = channel.unary_unary(
                C + "List",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=wire.t.containers.ListContainersResponse.FromString,
            )
            got = list_all(
                wire.t.containers.ListContainersRequest(), metadata=wire.meta(ns), timeout=60
            )
            channel.close()
            assert sorted(x.id for x in got.containers) == ids
            stream = wire.channel.unary_stream(
                C + "ListStream",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=wire.t.containers.ListContainerMessage.FromString,
            )
            streamed = stream(
                wire.t.containers.ListContainersRequest(), metadata=wire.meta(ns), timeout=60
            )
            assert sorted(m.container.id for m in streamed) == ids
        finally:
            for cid in ids:
                c.call("containers.delete", {"id": cid})


def test_subscriptions_cancelled_at_once_leave_nothing_behind(wire: Wire) -> None:
    """Subscriptions cancelled a few milliseconds after they open (a grpc-go client's
    short deadlines, ctr events ^C): each one's berthd stream is closed, and berth-grpc's
    and berthd's descriptors come back to where they were. On 3.11 asyncio.wait_for
    returned a result that came in the same turn as a cancellation, and lost the
    cancellation: a review's stress run left 19 of 600 such calls running for good."""
    (front,) = frontend_pids(wire.daemon)
    wire.unary(
        C + "List",
        wire.t.containers.ListContainersRequest(),
        wire.t.containers.ListContainersResponse,
    )

    def descriptors() -> tuple[int, int]:
        return (
            len(os.listdir(f"/proc/{front}/fd")),
            len(os.listdir(f"/proc/{wire.daemon.pid}/fd")),
        )

    before = descriptors()
    rng = random.Random(7)
    for _ in range(300):
        stream = wire.subscribe([])
        time.sleep(rng.random() * 0.01)
        stream.cancel()
    wait_until(
        lambda: all(now <= then for now, then in zip(descriptors(), before, strict=True)),
        timeout=30,
        what=f"descriptors back to {before}",
    )


def test_subscriptions_resume_across_a_berth_grpc_replacement(wire: Wire) -> None:
    """A subscriber that subscribes again a moment after its stream ends UNAVAILABLE (as
    dockerd does) sees every exit exactly once while a new berth-grpc replaces the running one,
    with exits published all through the switch."""
    t, daemon = wire.t, wire.daemon
    TaskExit = t.event_types["containerd.events.TaskExit"]
    exits: collections.Counter[str] = collections.Counter()
    ends: list[str] = []
    done = threading.Event()
    subscribed = threading.Event()

    def follow() -> None:
        while not done.is_set():
            stream = wire.subscribe(['topic=="/tasks/exit"'])
            subscribed.set()
            try:
                for envelope in stream:
                    exits[TaskExit.FromString(envelope.event.value).container_id] += 1
            except grpc.RpcError as exc:
                ends.append(exc.code().name)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return
                time.sleep(0.3)  # dockerd waits for containerd to serve again, then subscribes

    names = [f"sw{i}" for i in range(20)]
    for name in names:
        assert daemon.cli("run", "--busybox", "-d", name, "sleep", "1000").returncode == 0
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    subscribed.wait(10)
    time.sleep(0.5)
    (old,) = frontend_pids(daemon)
    log_path = os.path.join(daemon.dir, "berth-grpc-new.log")
    with open(log_path, "wb") as log:
        new = subprocess.Popen(
            [*grpc_command(daemon)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # the exits straddle the switch: from the new front end's start to after the old
        # one has gone
        wait_until(lambda: "replacing berth-grpc" in Path(log_path).read_text(), timeout=30)
        with daemon.client() as client:
            for name in names:
                client.call("tasks.kill", {"container_id": name, "signal": 9})
                time.sleep(0.01)
        wait_until(lambda: is_gone(old), timeout=30, what="the old berth-grpc to stop")
        try:
            wait_until(lambda: sum(exits.values()) >= len(names), timeout=30)
        except AssertionError:
            raise AssertionError(f"exits seen: {dict(exits)}, streams ended: {ends}") from None
        time.sleep(0.5)
        assert {name: exits[name] for name in names} == dict.fromkeys(names, 1), ends
        assert "UNAVAILABLE" in ends  # the old stream ended so that it could resume
        assert "resumes where the previous berth-grpc left it" in Path(log_path).read_text()
    finally:
        done.set()
        stop_child(new)
        for name in names:
            daemon.cli("tasks", "rm", "-f", name)
            daemon.cli("containers", "rm", name)
