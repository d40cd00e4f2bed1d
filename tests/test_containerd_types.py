"""Conversions between containerd's messages and berth's objects (no daemon needed)."""

from __future__ import annotations

import json

import pytest

from berth.daemon.grpc import convert as capi
from berth.shim.wire.errors import InvalidArgument


def test_times_zero_is_gos_zero_time() -> None:
    assert capi.timestamp(0).seconds == capi.ZERO_TIME_SECONDS
    ts = capi.timestamp(1_700_000_000_123_456_789)
    assert (ts.seconds, ts.nanos) == (1_700_000_000, 123_456_789)
    assert capi.from_timestamp(ts) == 1_700_000_000_123_456_789
    assert capi.from_timestamp(capi.timestamp(0)) == 0


def test_json_any_accepts_only_its_type() -> None:
    doc = {"process": {"args": ["true"]}}
    value = capi.json_any(capi.SPEC_TYPE, doc)
    assert capi.from_json_any(value, capi.SPEC_TYPE, "spec") == doc
    with pytest.raises(InvalidArgument, match="unsupported type"):
        capi.from_json_any(capi.json_any(capi.PROCESS_TYPE, doc), capi.SPEC_TYPE, "spec")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        capi.from_json_any(
            capi.types().Any(type_url=capi.SPEC_TYPE, value=b"\xff"), capi.SPEC_TYPE, "spec"
        )
    with pytest.raises(InvalidArgument, match="JSON object"):
        capi.from_json_any(capi.json_any(capi.SPEC_TYPE, [1]), capi.SPEC_TYPE, "spec")
    with pytest.raises(InvalidArgument, match="required"):
        capi.from_json_any(capi.types().Any(), capi.SPEC_TYPE, "spec")


def test_runc_options_round_trip_and_honoured_fields() -> None:
    t = capi.types()
    raw = t.runc.Options(binary_name="crun", root="/run/x", systemd_cgroup=True)
    value = t.Any(type_url=capi.RUNC_OPTIONS_TYPE, value=raw.SerializeToString())
    options = capi.runtime_options_from_any(value)
    assert (options["binary_name"], options["root"], options["systemd_cgroup"]) == (
        "crun",
        "/run/x",
        True,
    )
    back = capi.runtime_options_to_any(options)
    assert (back.type_url, back.value) == (value.type_url, value.value)
    relative = t.Any(
        type_url=capi.RUNC_OPTIONS_TYPE, value=t.runc.Options(root="rel").SerializeToString()
    )
    with pytest.raises(InvalidArgument, match="absolute"):
        capi.runtime_options_from_any(relative)
    with pytest.raises(InvalidArgument, match="bad"):
        capi.runtime_options_from_any(t.Any(type_url=capi.RUNC_OPTIONS_TYPE, value=b"\xff\xff"))


def test_label_masks() -> None:
    current = {"a": "1", "b": "2"}
    assert capi.apply_label_mask(current, {"c": "3"}, []) == {"c": "3"}
    assert capi.apply_label_mask(current, {"c": "3"}, ["labels"]) == {"c": "3"}
    assert capi.apply_label_mask(current, {"c": "3"}, ["labels.c"]) == {
        "a": "1",
        "b": "2",
        "c": "3",
    }
    assert capi.apply_label_mask(current, {}, ["labels.a"]) == {"b": "2"}


def test_task_exit_envelope() -> None:
    envelope = capi.envelope_to_message(
        {
            "timestamp": 1_700_000_000_000_000_000,
            "namespace": "moby",
            "topic": "/tasks/exit",
            "event": {
                "container_id": "c1",
                "id": "e1",
                "pid": 42,
                "exit_status": 5,
                "exited_at": 1_700_000_001_000_000_000,
                "unknown_field": 1,
            },
        }
    )
    assert envelope.topic == "/tasks/exit" and envelope.namespace == "moby"
    assert envelope.event.type_url == "containerd.events.TaskExit"
    event = capi.types().event_types["containerd.events.TaskExit"].FromString(envelope.event.value)
    assert (event.container_id, event.id, event.pid, event.exit_status) == ("c1", "e1", 42, 5)
    assert event.exited_at.seconds == 1_700_000_001
    assert capi.envelope_to_message({"topic": "/berth/private", "event": {}}) is None


def test_container_message_round_trip() -> None:
    doc = {
        "id": "c1",
        "labels": {"k": "v"},
        "image": "img",
        "runtime": {"name": "io.containerd.runc.v2", "options": {}},
        "spec": {"process": {"args": ["sh"]}},
        "snapshotter": "overlayfs",
        "snapshot_key": "c1",
        "created_at": 1_700_000_000_000_000_000,
        "updated_at": 0,
    }
    message = capi.container_to_message(doc)
    assert json.loads(message.spec.value) == doc["spec"]
    assert message.updated_at.seconds == capi.ZERO_TIME_SECONDS
    back = capi.container_from_message(message)
    assert {k: back[k] for k in ("id", "labels", "image", "spec", "snapshot_key")} == {
        k: doc[k] for k in ("id", "labels", "image", "spec", "snapshot_key")
    }


def test_metrics_v1_and_v2() -> None:
    t = capi.types()
    stats = {
        "cgroup_version": 1,
        "cpu": {
            "usage_ns": 10,
            "user_ns": 6,
            "system_ns": 4,
            "percpu_ns": [7, 3],
            "throttling": {"nr_periods": 2},
        },
        "memory": {
            "usage": 4096,
            "max_usage": 8192,
            "limit": 1 << 62,
            "failcnt": 0,
            "stat": {"cache": 1, "rss": 2, "pgfault": 3, "bogus": 9},
        },
        "pids": {"current": 2, "limit": 0},
    }
    value = capi.metrics_any(stats)
    assert value.type_url == capi.CGROUPS_V1_METRICS
    m1 = t.cgroups_v1.Metrics.FromString(value.value)
    assert (m1.cpu.usage.total, list(m1.cpu.usage.per_cpu)) == (10, [7, 3])
    assert (m1.memory.usage.usage, m1.memory.rss, m1.memory.pg_fault) == (4096, 2, 3)
    assert m1.pids.current == 2 and m1.cpu.throttling.periods == 2
    stats["cgroup_version"] = 2
    stats["memory"]["stat"] = {"anon": 5, "file": 6}  # type: ignore[index]
    value = capi.metrics_any(stats)
    assert value.type_url == capi.CGROUPS_V2_METRICS
    m2 = t.cgroups_v2.Metrics.FromString(value.value)
    assert (m2.memory.usage, m2.memory.anon, m2.cpu.usage_usec) == (4096, 5, 0)


def test_fill_rejects_wrong_types() -> None:
    t = capi.types()
    with pytest.raises(InvalidArgument, match="pid"):
        capi.fill(t.event_types["containerd.events.TaskExit"](), {"pid": "not a number"})


def test_ttrpc_frames_split_anywhere_and_oversize_is_refused() -> None:
    from berth.daemon.grpc.ttrpc import FrameError, FrameReader, encode_frame

    wire = encode_frame(1, 1, b"first") + encode_frame(3, 1, b"") + encode_frame(5, 2, b"x" * 300)
    for cut in range(len(wire) + 1):
        reader = FrameReader()
        got = []
        for piece in (wire[:cut], wire[cut:]):
            reader.feed(piece)
            got += list(reader.frames())
        assert got == [(1, 1, 0, b"first"), (3, 1, 0, b""), (5, 2, 0, b"x" * 300)]
    reader = FrameReader(max_message=100)
    reader.feed(encode_frame(7, 1, b"y" * 101))
    with pytest.raises(FrameError):
        list(reader.frames())


def test_ttrpc_envelope_matches_the_hand_encoded_one() -> None:
    """The server's declared Request decodes what a client encodes from the wire layout."""
    from berth.daemon.grpc.ttrpc import messages
    from tests.support.ttrpc import decode_response, encode_request

    raw = encode_request("svc.S", "M", b"\x01\x02", {"containerd-namespace-ttrpc": "ns"}, 5)
    request = messages().Request.FromString(raw)
    assert (request.service, request.method, request.payload, request.timeout_nano) == (
        "svc.S",
        "M",
        b"\x01\x02",
        5,
    )
    assert [(kv.key, kv.value) for kv in request.metadata] == [("containerd-namespace-ttrpc", "ns")]
    m = messages()
    response = m.Response(status=m.Status(code=5, message="gone"), payload=b"p")
    assert decode_response(response.SerializeToString()) == (5, "gone", b"p")


def test_a_schema1_digest_pins_what_is_parsed_not_bytes_after_the_payload() -> None:
    """Bytes appended after a signed schema 1 payload (a duplicate `fsLayers` key, which
    JSON parsers keep the last of) change neither the digest nor what is converted."""
    import hashlib

    from berth.daemon.storage import schema1
    from tests.support.images import schema1_image

    data, _, digest = schema1_image([(b"\0" * 1024, {})], signed=True)
    assert schema1.canonical_digest(data) == digest
    genuine = [step.blob_sum for step in schema1.parse(data)]
    evil_blob = "sha256:" + hashlib.sha256(b"evil").hexdigest()
    evil_v1 = json.dumps({"id": "e" * 64})
    tail_start = data.rstrip().rfind(b"}")
    hostile = (
        data[:tail_start].rstrip()
        + f', "fsLayers": [{{"blobSum": "{evil_blob}"}}],'.encode()
        + f' "history": [{{"v1Compatibility": {json.dumps(evil_v1)}}}]'.encode()
        + data[tail_start:]
    )
    assert json.loads(hostile)["fsLayers"] == [{"blobSum": evil_blob}]  # what a parser sees
    assert schema1.canonical_digest(hostile) == digest  # the same pinned digest...
    assert [step.blob_sum for step in schema1.parse(hostile)] == genuine  # ...the same image


def test_the_first_of_repeated_namespace_and_lease_headers_wins() -> None:
    """containerd's Go client nests contexts (namespaces.WithNamespace on a context that
    has one) by sending the newest value first and the older after it; containerd reads
    the first. Read as a dict, the last would win: the call would go to the outer
    namespace (a container created, a namespace deleted, in the wrong one)."""
    from berth.daemon.grpc.calls import Context
    from berth.daemon.grpc.services.base import LEASE_HEADER, NAMESPACE_HEADER, Call

    call = Call(
        Context(
            [
                (NAMESPACE_HEADER, "inner"),
                ("user-agent", "grpc-go"),
                (NAMESPACE_HEADER, "outer"),
                (LEASE_HEADER, "newest"),
                (LEASE_HEADER, "oldest"),
            ]
        )
    )
    assert (call.namespace, call.lease) == ("inner", "newest")
    assert Call(Context([(NAMESPACE_HEADER, "only")])).namespace == "only"
    assert Call(Context([])).namespace is None
