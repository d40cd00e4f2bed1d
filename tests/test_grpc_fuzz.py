"""Fuzzing berth-grpc's containerd API from the protobuf descriptors it serves.

Every method berth-grpc binds (services.descriptors()) is called with grpcio's generic
client, as its descriptor says (unary or streaming either side), with request messages
generated from the method's own message descriptor: each field set or not; integers at
the edges of their type (int32/int64/uint32/uint64 min and max, 0, -1); doubles inf, nan,
-0.0, 1e300; strings hostile and well-formed (containerd identifiers, `sha256:` digests,
the names of the objects seeded below); bytes; repeated and map fields (labels, with
`containerd.io/gc.expire` at far dates and `containerd.io/gc.ref.*`); enum numbers no enum
has; nested messages; `google.protobuf.Any` with real and bogus type URLs and garbage
values; Timestamps with seconds at int64's edges and nanos out of range; FieldMasks
naming odd paths; and the `containerd-namespace` header well-formed and hostile.

One namespace is seeded with one of each object (a content blob, an image, a lease, a
committed and an active snapshot, a container without a task) and requests name them
often, so they reach the code behind validation; what a request deletes is made again.

Every call must end with a result or a typed status, never UNKNOWN, INTERNAL or DATA_LOSS
(an unhandled bug), within a per-call deadline (a hang is a bug); after each example both
berthd and berth-grpc answer Version, berth-grpc still the same process; at the end both
stay within a memory bound.

Left out, because they would reach outside the daemon's temp root:
- Tasks/Create, Tasks/Start and Tasks/Exec run runc (processes, mounts, cgroups). With no
  task ever created, every other Tasks method is safe and reaches berthd's task code.
- Diff/Apply mounts what it is given and unpacks a layer onto it; Diff/Diff reads the
  mounts it is given (a bind mount names any host path).
- Containerd's Images service has no import or export (ctr does those client-side with
  the Content service, fuzzed here), so no Images method is left out.
Events/Subscribe streams until its caller leaves: it is called with a short deadline,
which it may reach (DEADLINE_EXCEEDED) without that being a hang.

Example counts are bounded for CI; set BERTH_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services import descriptors
from berth.daemon.oci import default_spec
from berth.shim.wire.errors import BerthError
from tests.support.clients import frontend_pids, grpc_address, grpc_daemon
from tests.support.edges import HOSTILE, LABEL_KEYS, TIMES
from tests.support.helpers import Daemon

pytestmark = pytest.mark.container

EXAMPLES = int(os.environ.get("BERTH_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
CALL_TIMEOUT = 10.0  # a call that takes longer hangs: a bug
SUBSCRIBE_TIMEOUT = 0.5  # Events/Subscribe streams until its caller leaves
ANSWERS: collections.Counter[tuple[str, str]] = collections.Counter()  # for a long run's log
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}

EXCLUDED = {
    "containerd.services.tasks.v1.Tasks": {"Create", "Start", "Exec"},
    "containerd.services.diff.v1.Diff": {"Apply", "Diff"},
}
SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"


@dataclass(frozen=True)
class Method:
    path: str
    descriptor: Any  # the method's MethodDescriptor
    request_cls: Any
    response_cls: Any


def fuzzed_methods() -> list[Method]:
    found = []
    for service, _ in descriptors():
        for method in service.methods:
            if method.name in EXCLUDED.get(service.full_name, ()):
                continue
            found.append(
                Method(
                    f"/{service.full_name}/{method.name}",
                    method,
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                )
            )
    return found


METHODS = fuzzed_methods()

# -- the seeded objects ------------------------------------------------------------------

BLOB = b"berth grpc fuzz blob\n"
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
IMAGE = "docker.io/library/fuzz:1"
KNOWN_NAMES = [
    "c1",
    "l1",
    "s1",
    "base",
    IMAGE,
    BLOB_DIGEST,
    "overlayfs",
    "native",
    "fuzz-ref",
]

# -- values --------------------------------------------------------------------------------

INT_EDGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOATS = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e300, -1e300, 5e-324]
FILTERS = [
    "",
    'labels."com.example/x"==y',
    "id==c1",
    "name~=^doc",
    "topic~=|^/tasks/|",
    "digest==" + BLOB_DIGEST,
    "kind==committed",
    "labels.a",
    "x==",
    '"unterminated',
    "a~=(",
    "a==b,c!=d",
    "==",
    'labels."containerd.io/gc.expire"==1',
]
MASK_PATHS = [
    "labels",
    "labels.a",
    "labels.containerd.io/gc.expire",
    "labels.",
    "spec",
    "image",
    "target",
    "name",
    "extensions",
    "extensions.x",
    "extensions.",
    "runtime",
    "snapshotter",
    "",
    ".",
    "..",
    "labels..x",
    "created_at",
    "x" * 1000,
]
SPEC = json.dumps(default_spec("c1", "fuzz", ["true"], root="")).encode()
ANY_TYPES = [
    capi.SPEC_TYPE,
    capi.PROCESS_TYPE,
    capi.RESOURCES_TYPE,
    capi.RUNC_OPTIONS_TYPE,
    capi.RUNC_V1_OPTIONS_TYPE,
    "containerd.events.TaskExit",
    "containerd.events.ContainerCreate",
    "types.containerd.io/opencontainers/runtime-spec/1/Else",
    "type.googleapis.com/google.protobuf.Empty",
    "",
    "/",
    "x" * 300,
]
ANY_VALUES = [
    b"",
    b"{}",
    b"[]",
    b"null",
    b"{not json",
    b'{"a":' * 100 + b"1" + b"}" * 100,
    SPEC,
    b'{"ociVersion": 1, "process": "x", "root": {"path": 5}}',
    b'{"memory": {"limit": 1e300}, "cpu": {"shares": -1}}',
    b'{"args": ["sh"], "cwd": "/", "user": {"uid": 18446744073709551615}}',
    b"\xff\xfe\x00garbage",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # field 1 varint
    b"\x0a\x05runc\x00",  # field 1 bytes, not UTF-8-clean
    b"\x12\x04/tmp",
]
NAMESPACES = ["valid", "valid", "valid", "other-ns", "a.b", "UPPER", "../x", "x" * 100, " ", "-x"]


def ident() -> st.SearchStrategy[str]:
    """containerd's identifier rule (identifiers.Validate): alphanumerics with . _ -
    inside, up to 76 characters."""
    return st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?", fullmatch=True)


def strings(field: FieldDescriptor, gentle: bool) -> st.SearchStrategy[str]:
    """A string field's values; `gentle`: well-formed only (the seeded objects' names,
    containerd identifiers, the field's own kind of value), so that a request passes
    validation and reaches the code behind it."""
    name = field.name
    choices: list[st.SearchStrategy[str]] = [st.sampled_from(KNOWN_NAMES), ident()]
    if not gentle:
        choices += [st.sampled_from(HOSTILE), st.text(max_size=30)]
    if "digest" in name or name == "expected":
        choices.append(st.just(BLOB_DIGEST))
        choices.append(st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True))
    if "filter" in name:
        choices.append(st.sampled_from(FILTERS))
    if name == "type_url":
        choices.append(st.sampled_from(ANY_TYPES))
    if name == "topic":
        topics = ["/tasks/exit", "/x", "/fuzz/a-b", "/" + "a/" * 40]
        choices = [st.sampled_from(topics), *choices[2:]]
    if name == "type" and field.containing_type.name == "Resource":
        choices.append(st.sampled_from(["content", "snapshots/overlayfs", "snapshots/x", "x"]))
    if name in ("media_type",):
        choices.append(
            st.sampled_from(
                [
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip",
                ]
            )
        )
    if name in ("value",):
        choices.append(st.sampled_from(TIMES))
    if name in ("digest", "expected") and gentle:
        choices = choices[2:]  # a digest, not a name
    return st.one_of(choices)


def integers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = INT_EDGES[field.type]
    edges = sorted({low, high, 0, max(low, -1), 1, min(high, 2**31 - 1), min(high, 2**53 + 1)})
    near = [len(BLOB), len(BLOB) + 1, 4 << 20, 1 << 20]
    return st.sampled_from(edges + near) | st.integers(low, high)


def timestamps(t: Any, gentle: bool) -> st.SearchStrategy[Any]:
    if gentle:  # a time of this era
        return st.builds(
            lambda s, n: t.Timestamp(seconds=s, nanos=n),
            st.integers(1, 2**33),
            st.integers(0, 999_999_999),
        )
    seconds = st.sampled_from(
        [
            -(2**63),
            2**63 - 1,
            0,
            -1,
            capi.ZERO_TIME_SECONDS,
            capi.ZERO_TIME_SECONDS - 1,
            253402300799,  # 9999-12-31
            253402300800,
            9223372036,  # int64 nanoseconds' end
            1_700_000_000,
        ]
    ) | st.integers(-(2**63), 2**63 - 1)
    nanos = st.sampled_from([0, -1, 999_999_999, 1_000_000_000, -(2**31), 2**31 - 1])
    return st.builds(lambda s, n: t.Timestamp(seconds=s, nanos=n), seconds, nanos)


def anys(t: Any) -> st.SearchStrategy[Any]:
    return st.builds(
        lambda url, value: t.Any(type_url=url, value=value),
        st.sampled_from(ANY_TYPES) | st.text(max_size=20),
        st.sampled_from(ANY_VALUES) | st.binary(max_size=64),
    )


def scalar(field: FieldDescriptor, gentle: bool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_EDGES:
        return integers(field)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from(FLOATS) | st.floats(width=64 if kind == 1 else 32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return strings(field, gentle)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from([BLOB, b"", b"\0" * 100]) | st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) | st.sampled_from([-1, 99, 2**31 - 1, -(2**31)])
    raise AssertionError(f"no strategy for field {field.full_name} of type {kind}")


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def messages(draw: Any, descriptor: Any, gentle: bool, depth: int = 0) -> Any:
    """A message of `descriptor`'s type, each field set or not (see `strings`)."""
    t = capi.types()
    full = descriptor.full_name
    if full == "google.protobuf.Timestamp":
        return draw(timestamps(t, gentle))
    if full == "google.protobuf.Any":
        return draw(anys(t))
    if full == "google.protobuf.FieldMask":
        from google.protobuf import field_mask_pb2

        paths = draw(st.lists(st.sampled_from(MASK_PATHS) | st.text(max_size=12), max_size=4))
        return field_mask_pb2.FieldMask(paths=paths)
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        _fill(draw, message, field, gentle, depth)
    return message


def _fill(draw: Any, message: Any, field: FieldDescriptor, gentle: bool, depth: int) -> None:
    kind = field.message_type
    target = getattr(message, field.name)
    if kind is not None and kind.GetOptions().map_entry:
        key_field, value_field = kind.fields_by_name["key"], kind.fields_by_name["value"]
        keys = st.sampled_from(LABEL_KEYS) | scalar(key_field, gentle)
        if value_field.message_type is None:
            values = st.sampled_from(TIMES + KNOWN_NAMES) | scalar(value_field, gentle)
            for k, v in draw(st.dictionaries(keys, values, max_size=4)).items():
                target[k] = v
        elif depth < 3:
            for k in draw(st.lists(keys, max_size=3, unique=True)):
                target[k].CopyFrom(draw(messages(value_field.message_type, gentle, depth + 1)))
        return
    if _repeated(field):
        if kind is None:
            target.extend(draw(st.lists(scalar(field, gentle), max_size=4)))
        elif depth < 3:
            for item in draw(st.lists(messages(kind, gentle, depth + 1), max_size=3)):
                target.add().CopyFrom(item)
        return
    if kind is not None:
        if depth < 3:
            target.CopyFrom(draw(messages(kind, gentle, depth + 1)))
        return
    value = draw(scalar(field, gentle))
    if field.type == FieldDescriptor.TYPE_FLOAT and math.isfinite(value):
        value = max(-3.4e38, min(3.4e38, value))
    setattr(message, field.name, value)


# -- the daemon ------------------------------------------------------------------------


@dataclass
class Served:
    daemon: Daemon
    channel: grpc.Channel
    frontend: int


def seed(daemon: Daemon) -> None:
    """One of each object the requests name (KNOWN_NAMES), made again if a request
    deleted it: a blob, an image of it, a lease, a committed and an active snapshot, a
    container without a task."""
    from berth.daemon.oci import default_spec as spec_of

    def missing(method: str, params: dict[str, Any]) -> bool:
        try:
            daemon.call(method, params)
            return False
        except BerthError:
            return True

    if missing("content.info", {"digest": BLOB_DIGEST}):
        daemon.cli("content", "ingest", "fuzz-blob", input=BLOB, check=True)
    image = {
        "name": IMAGE,
        "target": {
            "media_type": "application/vnd.oci.image.manifest.v1+json",
            "digest": BLOB_DIGEST,
            "size": len(BLOB),
        },
    }
    if missing("images.get", {"name": IMAGE}):
        daemon.call("images.create", image)
    if missing("leases.resources", {"id": "l1"}):
        daemon.call("leases.create", {"id": "l1"})
    if missing("snapshots.stat", {"key": "base"}):
        if not missing("snapshots.stat", {"key": "base-active"}):
            daemon.call("snapshots.remove", {"key": "base-active"})
        daemon.call("snapshots.prepare", {"key": "base-active"})
        daemon.call("snapshots.commit", {"key": "base-active", "name": "base"})
    if missing("snapshots.stat", {"key": "s1"}):
        daemon.call("snapshots.prepare", {"key": "s1", "parent": "base"})
    if missing("containers.get", {"id": "c1"}):
        spec = spec_of("c1", daemon.namespace, ["sleep", "1"])
        daemon.call("containers.create", {"id": "c1", "spec": spec})


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    daemon = grpc_daemon()
    channel = None
    try:
        seed(daemon)
        channel = grpc.insecure_channel(
            f"unix:{grpc_address(daemon)}",
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        frontends = frontend_pids(daemon)
        assert len(frontends) == 1, frontends
        yield Served(daemon, channel, frontends[0])
    finally:
        if channel is not None:
            channel.close()
        daemon.cleanup()


def _version(s: Served) -> None:
    """Both processes answer, berth-grpc the same one as before (not restarted)."""
    t = capi.types()
    version = s.channel.unary_unary(
        "/containerd.services.version.v1.Version/Version",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.version.VersionResponse.FromString,
    )
    assert version(t.Empty(), timeout=CALL_TIMEOUT).version
    assert s.daemon.call("version")["protocol"] == 1
    assert frontend_pids(s.daemon) == [s.frontend], "berth-grpc was restarted"


def _header(draw: Any, daemon: Daemon, gentle: bool) -> list[tuple[str, str]]:
    metadata = []
    namespace = "valid" if gentle else draw(st.sampled_from([*NAMESPACES, None]))
    if namespace is not None:
        metadata.append(
            ("containerd-namespace", daemon.namespace if namespace == "valid" else namespace)
        )
    if draw(st.booleans()):
        metadata.append(("containerd-lease", draw(st.sampled_from(["l1", "nosuch", "../x", ""]))))
    return metadata


def _call(s: Served, method: Method, requests: list[Any], metadata: Any) -> grpc.StatusCode:
    """Call `method` as its descriptor says; the status it ends with."""
    kw = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": method.response_cls.FromString,
    }
    streams_in = method.descriptor.client_streaming
    streams_out = method.descriptor.server_streaming
    timeout = SUBSCRIBE_TIMEOUT if method.path == SUBSCRIBE else CALL_TIMEOUT
    try:
        if streams_in and streams_out:
            fn = s.channel.stream_stream(method.path, **kw)
            for _ in fn(iter(requests), metadata=metadata, timeout=timeout):
                pass
        elif streams_in:
            s.channel.stream_unary(method.path, **kw)(
                iter(requests), metadata=metadata, timeout=timeout
            )
        elif streams_out:
            fn = s.channel.unary_stream(method.path, **kw)
            for _ in fn(requests[0], metadata=metadata, timeout=timeout):
                pass
        else:
            s.channel.unary_unary(method.path, **kw)(
                requests[0], metadata=metadata, timeout=timeout
            )
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(st.data())
def test_every_method_answers_typed_statuses(served: Served, data: Any) -> None:
    s = served
    for _ in range(data.draw(st.integers(1, 4))):
        method = data.draw(st.sampled_from(METHODS))
        count = data.draw(st.integers(1, 3)) if method.descriptor.client_streaming else 1
        gentle = data.draw(st.booleans())
        descriptor = method.request_cls.DESCRIPTOR
        requests = [data.draw(messages(descriptor, gentle)) for _ in range(count)]
        metadata = _header(data.draw, s.daemon, gentle)
        started = time.monotonic()
        code = _call(s, method, requests, metadata)
        ANSWERS[(method.path.rpartition("/")[2], code.name)] += 1
        if code in BUGS:
            raise AssertionError(f"{method.path} answered {code}: {requests!r} {metadata!r}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.path != SUBSCRIBE:
            raise AssertionError(
                f"{method.path} hung ({time.monotonic() - started:.1f} s): {requests!r}"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            raise AssertionError(f"{method.path} answered UNAVAILABLE: {requests!r} {metadata!r}")
    _version(s)
    seed(s.daemon)


def test_memory_stays_bounded_after_fuzzing(served: Served) -> None:
    # Runs after the fuzz test of this module (pytest keeps file order).
    print("answers:", sorted(ANSWERS.items()))
    _version(served)
    rss = psutil.Process(served.daemon.pid).memory_info().rss
    assert rss < 150 << 20, f"berthd RSS {rss >> 20} MiB after fuzzing"
    rss = psutil.Process(served.frontend).memory_info().rss
    assert rss < 150 << 20, f"berth-grpc RSS {rss >> 20} MiB after fuzzing"


def test_a_header_value_with_spaces_fails_its_call_alone(served: Served) -> None:
    """h2 took a header value with a space around it for a connection error: a GOAWAY
    ended every call on the connection (UNAVAILABLE). grpc-go takes the value; containerd
    then refuses the namespace (INVALID_ARGUMENT), and so does berth."""
    t = capi.types()
    listing = served.channel.unary_unary(
        "/containerd.services.containers.v1.Containers/List",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.containers.ListContainersResponse.FromString,
    )
    for value in (" ", served.daemon.namespace + " "):
        with pytest.raises(grpc.RpcError) as info:
            listing(
                t.containers.ListContainersRequest(),
                metadata=[("containerd-namespace", value)],
                timeout=CALL_TIMEOUT,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, value
    _version(served)


def test_a_read_far_past_a_blobs_end_is_out_of_range(served: Served) -> None:
    """berthd sought to the offset first: past ext4's largest file (16 TiB) that is
    EINVAL, answered INTERNAL. containerd answers OutOfRange, and so does berth."""
    t = capi.types()
    read = served.channel.unary_stream(
        "/containerd.services.content.v1.Content/Read",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.content.ReadContentResponse.FromString,
    )
    for offset in (2**53 + 1, 2**63 - 1):
        request = t.content.ReadContentRequest(digest=BLOB_DIGEST, offset=offset)
        with pytest.raises(grpc.RpcError) as info:
            list(read(request, metadata=[("containerd-namespace", served.daemon.namespace)]))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE, offset
    _version(served)


def test_malformed_headers_are_found_per_request() -> None:
    from berth.daemon.grpc.h2server import malformed_headers

    good = [(b":method", b"POST"), (b":path", b"/x/Y"), (b"te", b"trailers")]
    assert malformed_headers([*good, (b"containerd-namespace", b" spaced ")]) is None
    for bad in (
        (b"Upper", b"x"),
        (b"", b"x"),
        (b"a:b", b"x"),
        (b"x", b"a\0b"),
        (b"x", b"a\r\nb"),
        (b"connection", b"close"),
        (b"te", b"gzip"),
        (b":method", b"GET"),  # repeated
        (b":weird", b"x"),
    ):
        assert malformed_headers([*good, bad]) is not None, bad
    assert malformed_headers([(b"a", b"b"), (b":path", b"/x/Y")]) is not None
    # Every byte of a value: only the controls but the tab, and DEL, are refused.
    for byte in range(256):
        refused = malformed_headers([*good, (b"x", b"a" + bytes([byte]) + b"b")]) is not None
        assert refused == ((byte < 0x20 and byte != 0x09) or byte == 0x7F), byte
