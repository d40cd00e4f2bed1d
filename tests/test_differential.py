"""Differential tests: the same gRPC calls sent to berth-grpc and to a private containerd
1.6, compared call by call: the status code, and the response once what legitimately
differs is set aside (timestamps, generated ids, plugin lists, version strings).

Each test starts its own containerd (tests/support/containerd.py: a temp dir of its own, no
CRI, stopped by pid) and its own berthd with berth-grpc (served_wire); both see the same
namespace name, so responses compare as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from berth.daemon.grpc import convert as capi
from tests.support.clients import grpc_address
from tests.support.containerd import private_containerd
from tests.support.wire import served_wire

pytestmark = pytest.mark.container

NS = "/containerd.services.namespaces.v1.Namespaces/"
C = "/containerd.services.containers.v1.Containers/"
L = "/containerd.services.leases.v1.Leases/"
CT = "/containerd.services.content.v1.Content/"
I = "/containerd.services.images.v1.Images/"  # noqa: E741
S = "/containerd.services.snapshots.v1.Snapshots/"
INTRO = "/containerd.services.introspection.v1.Introspection/"
VERSION = "/containerd.services.version.v1.Version/"

# Fields whose values legitimately differ between two daemons: times, and what each
# generates on its own.
TIMES = {"created_at", "updated_at", "started_at", "expires_at"}
HELD = "held-by-the-test"  # the lease every call runs under


@dataclass
class Outcome:
    """One daemon's answer to one call: its status code, and its response(s) as dicts."""

    code: grpc.StatusCode
    response: Any
    details: str = ""
    # containerd's Content/Write sends its last response once more as a stream ends well;
    # berth does not (tests/test_grpc_storage.py holds it to one response a request)
    repeats_last: bool = False

    def comparable(self) -> tuple[str, Any]:
        return self.code.name, self.response


def to_dict(message: Any) -> dict[str, Any]:
    """A message as a dict of its set fields (proto field names); an Any as its type URL
    and its value (decoded JSON where it is JSON, as containerd's spec Any is)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if (
            field.type == field.TYPE_MESSAGE
            and field.message_type.full_name == "google.protobuf.Any"
        ):
            convert: Any = _any_dict
        elif field.type == field.TYPE_MESSAGE and not _is_map(field):
            convert = to_dict
        elif field.type == field.TYPE_BYTES:
            convert = bytes.hex
        else:
            convert = _plain
        if _is_map(field):
            entry = field.message_type.fields_by_name["value"]
            if entry.type == entry.TYPE_MESSAGE:
                conv = (
                    _any_dict if entry.message_type.full_name == "google.protobuf.Any" else to_dict
                )
                out[field.name] = {k: conv(v) for k, v in value.items()}
            else:
                out[field.name] = dict(value)
        elif field.is_repeated:
            out[field.name] = [convert(v) for v in value]
        else:
            out[field.name] = convert(value)
    return out


def _plain(value: Any) -> Any:
    return value


def _is_map(field: Any) -> bool:
    return bool(field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry)


def _any_dict(value: Any) -> dict[str, Any]:
    try:
        decoded: Any = json.loads(value.value) if value.value else None
    except ValueError:
        decoded = value.value.hex()
    return {"type_url": value.type_url, "value": decoded}


def scrub(value: Any, drop: frozenset[str] = frozenset()) -> Any:
    """The response without what legitimately differs: timestamps are kept only as
    "set" (a client may read them), fields named in `drop` go."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in drop:
                continue
            out[key] = "<time>" if key in TIMES else scrub(item, drop)
        return out
    if isinstance(value, list):
        return [scrub(item, drop) for item in value]
    return value


class Side:
    """One daemon's containerd socket, driven by grpcio with the stubs berth serves."""

    def __init__(self, name: str, address: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self.channel = grpc.insecure_channel(f"unix:{address}")

    def meta(self, namespace: str | None, lease: str | None) -> list[tuple[str, str]]:
        ns = self.namespace if namespace == "" else namespace
        out = [("containerd-namespace", ns)] if ns else []
        if lease:
            out.append(("containerd-lease", lease))
        return out

    def unary(self, path: str, request: Any, response_cls: Any, **kw: Any) -> Outcome:
        fn = self.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        try:
            reply = fn(request, metadata=self.meta(**kw), timeout=60)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), None, exc.details() or "")
        return Outcome(grpc.StatusCode.OK, to_dict(reply))

    def stream(self, path: str, request: Any, response_cls: Any, **kw: Any) -> Outcome:
        fn = self.channel.unary_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        replies = []
        try:
            for reply in fn(request, metadata=self.meta(**kw), timeout=60):
                replies.append(to_dict(reply))
        except grpc.RpcError as exc:
            return Outcome(exc.code(), replies, exc.details() or "")
        return Outcome(grpc.StatusCode.OK, replies)

    def bidi(self, path: str, requests: list[Any], response_cls: Any, **kw: Any) -> Outcome:
        fn = self.channel.stream_stream(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        replies = []
        try:
            for reply in fn(iter(requests), metadata=self.meta(**kw), timeout=60):
                replies.append(to_dict(reply))
        except grpc.RpcError as exc:
            return Outcome(exc.code(), replies, exc.details() or "")
        return Outcome(grpc.StatusCode.OK, replies, repeats_last=self.name == "containerd")


class Pair:
    """berth-grpc and containerd side by side: every call goes to both, and the two
    outcomes are compared (`same`) or returned for a test to look at (`both`)."""

    def __init__(self, berth: Side, containerd: Side) -> None:
        self.berth = berth
        self.containerd = containerd
        self.t = capi.types()
        self.lease: str | None = None

    def both(
        self, kind: str, path: str, request: Any, response_cls: Any, **kw: Any
    ) -> tuple[Outcome, Outcome]:
        kw.setdefault("namespace", "")
        kw.setdefault("lease", self.lease)
        b = getattr(self.berth, kind)(path, request, response_cls, **kw)
        c = getattr(self.containerd, kind)(path, request, response_cls, **kw)
        return b, c

    def same(
        self,
        path: str,
        request: Any,
        response_cls: Any,
        *,
        kind: str = "unary",
        drop: frozenset[str] = frozenset(),
        sort: Any = None,
        **kw: Any,
    ) -> Outcome:
        """Send the call to both and assert the same code and the same response (with
        `drop`'s fields removed; lists sorted by `sort` where containerd promises no
        order). Returns containerd's outcome."""
        b, c = self.both(kind, path, request, response_cls, **kw)
        got = _normal(b, drop, sort)
        want = _normal(c, drop, sort)
        assert got == want, (
            f"{path}({_short(request)}): berth answered {got} ({b.details!r}), "
            f"containerd {want} ({c.details!r})"
        )
        return c

    def code(self, path: str, request: Any, response_cls: Any, **kw: Any) -> grpc.StatusCode:
        """Only the status codes must agree (the responses hold generated values)."""
        b, c = self.both(kw.pop("kind", "unary"), path, request, response_cls, **kw)
        assert b.code == c.code, (
            f"{path}({_short(request)}): berth answered {b.code.name} ({b.details!r}), "
            f"containerd {c.code.name} ({c.details!r})"
        )
        return c.code


def _normal(outcome: Outcome, drop: frozenset[str], sort: Any) -> tuple[str, Any]:
    response = scrub(outcome.response, drop)
    if outcome.repeats_last and response and outcome.code == grpc.StatusCode.OK:
        assert response[-1] == response[-2], response
        response = response[:-1]
    if sort is not None and response is not None:
        response = sort(response)
    return outcome.code.name, response


def _short(request: Any) -> str:
    if isinstance(request, list):
        text = str([to_dict(r) for r in request])
    else:
        text = str(to_dict(request))
    return text if len(text) < 300 else text[:300] + "..."


@pytest.fixture
def p() -> Iterator[Pair]:
    """A containerd and a berth of this test's own."""
    with pair() as both:
        yield both


@contextlib.contextmanager
def pair(*, tasks: bool = False) -> Iterator[Pair]:
    """A private containerd (with its task plugins if `tasks`) and a private berth, one
    Pair on them, every call under the HELD lease; both stopped after."""
    with private_containerd(tasks=tasks) as ctd, served_wire() as w:
        berth = Side("berth", grpc_address(w.daemon), w.namespace)
        containerd = Side("containerd", ctd.address, w.namespace)
        try:
            both = Pair(berth, containerd)
            # Everything the tests make is held by a lease: containerd's collector, which
            # a removal sets off, would otherwise take unreferenced blobs and snapshots
            # away at a moment of its own (berth's collects on its own schedule).
            t = both.t.leases
            both.same(L + "Create", t.CreateRequest(id=HELD), t.CreateResponse)
            both.lease = HELD
            yield both
        finally:
            berth.channel.close()
            containerd.channel.close()


# -- helpers ------------------------------------------------------------------------------

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["true"]}}  # berth needs a process


def mask(paths: list[str] | None) -> Any:
    from google.protobuf import field_mask_pb2

    return None if paths is None else field_mask_pb2.FieldMask(paths=paths)


def by(key: str, field: str | None = None) -> Any:
    """A sort for list responses (containerd promises no order): the items of `field`
    (or of every streamed message's `field`), by `key`."""

    def sort(response: Any) -> Any:
        if isinstance(response, list):  # a stream: its messages' items together
            items = [item for message in response for item in message.get(field or "", [])]
        else:
            items = response.get(field or "", [])
        return sorted(items, key=lambda item: str(item.get(key, "")))

    return sort


def container(p: Pair, cid: str, **kw: Any) -> Any:
    t = p.t.containers
    kw.setdefault("runtime", t.Container.Runtime(name="io.containerd.runc.v2"))
    kw.setdefault("spec", capi.json_any(capi.SPEC_TYPE, SPEC))
    return t.Container(id=cid, **kw)


def create_container(p: Pair, cid: str, namespace: str = "", **kw: Any) -> Outcome:
    t = p.t.containers
    return p.same(
        C + "Create",
        t.CreateContainerRequest(container=container(p, cid, **kw)),
        t.CreateContainerResponse,
        namespace=namespace,
    )


def write_requests(p: Pair, ref: str, chunks: list[tuple[int, bytes]], **kw: Any) -> list[Any]:
    """A Content.Write stream: a STAT naming the ref, WRITEs, and a COMMIT unless told."""
    t = p.t.content
    total, expected = kw.get("total", 0), kw.get("expected", "")
    reqs = [t.WriteContentRequest(action=0, ref=ref, total=total, expected=expected)]
    reqs += [t.WriteContentRequest(action=1, ref=ref, offset=o, data=d) for o, d in chunks]
    if kw.get("commit", True):  # at the offset reached (0 would truncate, as containerd does)
        end = max((o + len(d) for o, d in chunks), default=0)
        reqs.append(
            t.WriteContentRequest(
                action=2,
                ref=ref,
                offset=end,
                total=total,
                expected=expected,
                labels=kw.get("labels", {}),
            )
        )
    return reqs


def write_blob(p: Pair, ref: str, data: bytes, **kw: Any) -> Outcome:
    return p.same(
        CT + "Write",
        write_requests(p, ref, [(0, data)], **kw),
        p.t.content.WriteContentResponse,
        kind="bidi",
    )


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- namespaces ---------------------------------------------------------------------------


def test_namespace_names_and_labels_match(p: Pair) -> None:
    """Names by containerd's identifier rule ("a..b", "a-", "-x" refused; 76 characters at
    most), labels at 4096 bytes of key and value and past it; a label set to "" is none."""
    t = p.t.namespaces
    for name in [
        "ns1",
        "a.b-c_d",
        "1abc",
        "UPPER",
        "a..b",
        "a-",
        "-x",
        "a/b",
        "",
        "x" * 76,
        "x" * 77,
    ]:
        p.same(
            NS + "Create",
            t.CreateNamespaceRequest(namespace=t.Namespace(name=name, labels={"a": "1"})),
            t.CreateNamespaceResponse,
        )
    p.same(
        NS + "Create",
        t.CreateNamespaceRequest(namespace=t.Namespace(name="ns1")),
        t.CreateNamespaceResponse,
    )
    for i, (key, value) in enumerate(
        [
            ("k" * 4095, "v"),
            ("k" * 4096, "v"),
            ("k", "v" * 4095),
            ("k" * 2048, "v" * 2049),
            ("e", ""),
        ]
    ):
        p.same(
            NS + "Create",
            t.CreateNamespaceRequest(
                namespace=t.Namespace(name=f"lbl{i}", labels={key: value, "b": "2"})
            ),
            t.CreateNamespaceResponse,
        )
    for name in ["ns1", "nosuch", "a.b-c_d", ""]:
        p.same(NS + "Get", t.GetNamespaceRequest(name=name), t.GetNamespaceResponse)
    b, c = p.both(
        "unary",
        NS + "List",
        t.ListNamespacesRequest(filter="labels.a==1"),
        t.ListNamespacesResponse,
    )
    ours = {p.berth.namespace}  # the test's own (neither daemon makes "default")

    def names(o: Outcome) -> list[str]:
        return sorted(n["name"] for n in o.response.get("namespaces", []) if n["name"] not in ours)

    assert (b.code, names(b)) == (c.code, names(c))  # containerd ignores the filter


def test_namespace_update_masks_match(p: Pair) -> None:
    """containerd updates a namespace's labels one path `labels.<key>` at a time and
    refuses every other path, `labels` included; no mask replaces them all."""
    t = p.t.namespaces
    p.same(
        NS + "Create",
        t.CreateNamespaceRequest(namespace=t.Namespace(name="ns1", labels={"a": "1"})),
        t.CreateNamespaceResponse,
    )
    for labels, paths in [
        ({"b": "2", "c": "3"}, None),
        ({"d": "4"}, ["labels.d"]),
        ({}, ["labels.b"]),
        ({"c": ""}, ["labels.c"]),
        ({"x": "1"}, ["labels"]),
        ({"x": "1"}, ["name"]),
        ({"x": "1"}, ["labels.x", "bogus"]),
        ({"e": "5", "f": ""}, None),
    ]:
        req = t.UpdateNamespaceRequest(
            namespace=t.Namespace(name="ns1", labels=labels), update_mask=mask(paths)
        )
        # containerd answers an update with an empty namespace: what it did, Get shows
        p.code(NS + "Update", req, t.UpdateNamespaceResponse)
        p.same(NS + "Get", t.GetNamespaceRequest(name="ns1"), t.GetNamespaceResponse)


def test_deleting_a_namespace_that_holds_something_matches(p: Pair) -> None:
    """containerd refuses to delete a namespace that holds images, blobs, containers or
    snapshots (FailedPrecondition); leases do not count."""
    t = p.t.namespaces
    E = p.t.Empty
    # a blob of each namespace's own: one another namespace holds already is AlreadyExists
    # at berth's first message (containerd takes the bytes again): reported, not fixed
    blob = b"a blob"
    for ns in ("n-lease", "n-blob", "n-image", "n-container", "n-snapshot"):
        req = t.CreateNamespaceRequest(namespace=t.Namespace(name=ns))
        p.same(NS + "Create", req, t.CreateNamespaceResponse)
    lease = p.t.leases.CreateRequest(id="l1")
    p.same(L + "Create", lease, p.t.leases.CreateResponse, namespace="n-lease", lease=None)
    for ns in ("n-blob", "n-image"):
        p.same(L + "Create", lease, p.t.leases.CreateResponse, namespace=ns, lease=None)
        own = blob + ns.encode()
        requests = write_requests(p, "b", [(0, own)], expected=digest_of(own))
        Wr = p.t.content.WriteContentResponse
        p.same(CT + "Write", requests, Wr, kind="bidi", namespace=ns, lease="l1")
    own = blob + b"n-image"
    target = p.t.descriptor.Descriptor(media_type="m", digest=digest_of(own), size=len(own))
    image = p.t.images.CreateImageRequest(image=p.t.images.Image(name="i", target=target))
    p.same(I + "Create", image, p.t.images.CreateImageResponse, namespace="n-image")
    create_container(p, "c1", namespace="n-container")
    p.same(L + "Create", lease, p.t.leases.CreateResponse, namespace="n-snapshot", lease=None)
    prepare = p.t.snapshots.PrepareSnapshotRequest(snapshotter="overlayfs", key="k")
    p.same(
        S + "Prepare",
        prepare,
        p.t.snapshots.PrepareSnapshotResponse,
        drop=MOUNTS,
        namespace="n-snapshot",
        lease="l1",
    )
    for ns in ("n-lease", "n-blob", "n-image", "n-container", "n-snapshot"):
        p.same(NS + "Delete", t.DeleteNamespaceRequest(name=ns), E)
    p.same(C + "Delete", p.t.containers.DeleteContainerRequest(id="c1"), E, namespace="n-container")
    for ns in ("n-container", "n-container", "nosuch"):
        p.same(NS + "Delete", t.DeleteNamespaceRequest(name=ns), E)


# -- containers ---------------------------------------------------------------------------


def test_container_create_get_delete_match(p: Pair) -> None:
    t = p.t.containers
    E = p.t.Empty
    any_ext = p.t.Any(type_url="x/y", value=b"abc")
    create_container(
        p, "c1", labels={"a.b": "x", "role": "web"}, image="docker.io/library/busybox:latest"
    )
    create_container(p, "c2", snapshotter="overlayfs", snapshot_key="k2", extensions={"e": any_ext})
    create_container(p, "c1")  # taken
    for cid in ["", "a..b", "a-", "bad_id!", "x" * 76, "x" * 77]:
        create_container(p, cid)
    create_container(p, "noruntime", runtime=t.Container.Runtime())
    create_container(p, "keyonly", snapshot_key="k")
    create_container(p, "snapperonly", snapshotter="overlayfs")
    create_container(p, "emptylabel", labels={"e": "", "f": "1"})
    create_container(p, "longlabel", labels={"k" * 4095: "v"})
    create_container(p, "toolonglabel", labels={"k" * 4096: "v"})
    create_container(p, "emptyext", extensions={"": any_ext})
    for cid in ["c1", "c2", "emptylabel", "nosuch", "", "bad_id!", "a..b"]:
        p.same(C + "Get", t.GetContainerRequest(id=cid), t.GetContainerResponse)
    p.same(
        C + "List", t.ListContainersRequest(), t.ListContainersResponse, sort=by("id", "containers")
    )
    for cid in ["c1", "c1", "", "bad_id!", "nosuch"]:
        p.same(C + "Delete", t.DeleteContainerRequest(id=cid), E)
    p.same(C + "List", t.ListContainersRequest(), t.ListContainersResponse, namespace=None)


def test_container_update_masks_match(p: Pair) -> None:
    """Every path containerd knows (`labels`, `labels.<key>`, `image`, `spec`,
    `extensions`, `extensions.<name>`, `snapshotkey`), ones it refuses (`runtime`,
    `snapshotter`, `id`, unknown), and no mask (immutable runtime and snapshotter)."""
    t = p.t.containers
    ext = p.t.Any(type_url="a/b", value=b"z")
    create_container(
        p,
        "c1",
        labels={"a": "1", "b": "2"},
        image="img1",
        snapshotter="overlayfs",
        snapshot_key="s1",
    )
    create_container(p, "c2", labels={"a": "1"})
    spec2 = capi.json_any(capi.SPEC_TYPE, {"ociVersion": "1.1.0", "process": {"args": ["sh"]}})
    cases: list[tuple[str, list[str] | None, dict[str, Any]]] = [
        (
            "c1",
            None,
            dict(labels={"z": "1"}, image="img2", snapshotter="overlayfs", snapshot_key="s1"),
        ),
        ("c1", ["labels"], dict(labels={"y": "2", "w": "3"})),
        ("c1", ["labels.y"], dict(labels={})),
        ("c1", ["labels.q"], dict(labels={"q": "3"})),
        ("c1", ["labels.q"], dict(labels={"q": ""})),
        ("c1", ["labels.w", "image"], dict(labels={"w": "4"}, image="img3")),
        ("c1", ["image"], dict(image="")),
        ("c1", ["spec"], dict(spec=spec2)),
        ("c1", ["extensions"], dict(extensions={"e1": ext, "e2": ext})),
        ("c1", ["extensions.e3"], dict(extensions={"e3": ext})),
        ("c1", ["extensions.e2"], {}),
        ("c1", ["snapshotkey"], dict(snapshot_key="s2")),
        ("c1", ["snapshot_key"], dict(snapshot_key="s3")),
        ("c1", ["runtime"], dict(runtime=t.Container.Runtime(name="other"))),
        ("c1", ["snapshotter"], dict(snapshotter="native")),
        ("c1", ["id"], {}),
        ("c1", ["bogus"], {}),
        ("c1", ["labels.k", "bogus"], dict(labels={"k": "v"})),
        ("c1", None, dict(runtime=t.Container.Runtime(name="other"), snapshotter="overlayfs")),
        ("c1", None, dict(snapshotter="native")),
        ("c1", None, dict(snapshotter="")),
        ("c2", None, dict(labels={"n": "1"}, snapshot_key="k")),
        ("c2", ["labels.k"], dict(labels={"k" * 4096: "v"})),
        ("nosuch", None, {}),
        ("bad_id!", ["labels"], {}),
        ("", ["labels"], {}),
    ]
    for cid, paths, kw in cases:
        req = t.UpdateContainerRequest(container=container(p, cid, **kw), update_mask=mask(paths))
        p.same(C + "Update", req, t.UpdateContainerResponse)
        p.same(C + "Get", t.GetContainerRequest(id="c1"), t.GetContainerResponse)


CONTAINER_FILTERS = [
    [],
    [""],
    ['labels."a.b"==x'],
    ["labels.a.b==x"],
    ["id~=^c[12]$"],
    ["id~=c", "labels.role==db"],
    ["labels.role==web,image==docker.io/library/busybox:latest"],
    ["labels.role"],
    ["labels.role!=web"],
    ["labels.none!="],
    ["labels.none~=^$"],
    ["image"],
    ["id!=c1"],
    ['id=="c1"'],
    ["id==c1", ""],
    ["id==c1", "id==c1"],
    ["id~=|^c1$|"],
    ["id~=/^c1$/"],
    ['id~="^c\\\\d$"'],
    ["id~=|^c\\d$|"],
    ["id==c1,"],
    [",id==c1"],
    ["id==c1 , labels.role==web"],
    ["id== c1"],
    ["id ==c1"],
    [" id==c1"],
    ["id==c1 "],
    ["==x"],
    ["id"],
    ["id=c1"],
    ["id===c1"],
    ["id==/c1/"],
    ["id==|c1|"],
    ['labels."a.b'],
    ["labels.a-b==x"],
    ["id~=(["],
    ["runtime.name==io.containerd.runc.v2"],
    ["runtime==io.containerd.runc.v2"],
    ["runtime.options"],
    ["snapshotter==overlayfs"],
    ["snapshot_key"],
    ["spec"],
    ["created_at"],
    ["extensions.e"],
    ["unknown==x"],
    ["id==c1,id==c2"],
    ["labels.role!=web,labels.role"],
    ['labels."role"==web'],
    ["id==c\\x31"],
    ['id=="c\\x31"'],
    ['id=="c\\q"'],
]


def test_container_filters_match(p: Pair) -> None:
    """containerd's filter syntax and semantics on Containers/List and ListStream."""
    t = p.t.containers
    create_container(
        p, "c1", labels={"a.b": "x", "role": "web"}, image="docker.io/library/busybox:latest"
    )
    create_container(p, "c2", labels={"a.b": "y"}, snapshotter="overlayfs", snapshot_key="k2")
    create_container(
        p, "c3", labels={"role": "db", "a-b": "x"}, extensions={"e": p.t.Any(type_url="x/y")}
    )
    create_container(p, "d4")
    for filters in CONTAINER_FILTERS:
        p.same(
            C + "List",
            t.ListContainersRequest(filters=filters),
            t.ListContainersResponse,
            sort=by("id", "containers"),
        )
    for filters in (["labels.role"], ["id~=(["], ["id==c1,"]):
        p.same(
            C + "ListStream",
            t.ListContainersRequest(filters=filters),
            t.ListContainerMessage,
            kind="stream",
            sort=lambda r: sorted(m["container"]["id"] for m in r),
        )


# -- leases -------------------------------------------------------------------------------


def test_leases_match(p: Pair) -> None:
    t = p.t.leases
    E = p.t.Empty
    content_id = "sha256:" + "a" * 64
    p.same(L + "Create", t.CreateRequest(id="l1", labels={"a": "1", "e": ""}), t.CreateResponse)
    p.same(L + "Create", t.CreateRequest(id="l1"), t.CreateResponse)
    p.code(L + "Create", t.CreateRequest(labels={"gen": "1"}), t.CreateResponse)  # an id made up
    expire = "containerd.io/gc.expire"
    p.same(
        L + "Create",
        t.CreateRequest(id="l2", labels={expire: "2099-01-01T00:00:00Z"}),
        t.CreateResponse,
    )
    p.same(L + "Create", t.CreateRequest(id="l3", labels={expire: "not a time"}), t.CreateResponse)
    p.same(
        L + "Create",
        t.CreateRequest(id="l4", labels={"containerd.io/gc.flat": "x"}),
        t.CreateResponse,
    )

    def listing(filters: list[str]) -> None:
        b, c = p.both("unary", L + "List", t.ListRequest(filters=filters), t.ListResponse)
        generated = {"gen": "1"}  # the lease whose id each daemon made up: its labels only

        def normal(o: Outcome) -> Any:
            leases = [
                scrub({**x, "id": "<made>"} if x.get("labels") == generated else x)
                for x in (o.response or {}).get("leases", [])
            ]
            return o.code, sorted(leases, key=lambda x: x["id"])

        assert normal(b) == normal(c), f"Leases/List({filters}): {b} vs {c}"

    for filters in (
        [],
        ["id==l1"],
        [f'labels."{expire}"'],
        ["labels.a==1,id~=l"],
        ["id==l1,"],
        ["labels.gen"],
    ):
        listing(filters)
    resources = [
        ("content", content_id),
        ("content", "notadigest"),
        ("content", "sha256:" + "A" * 64),
        ("content", ""),
        ("content/x", content_id),
        ("ingests", "ref1"),
        ("ingests/x", "ref1"),
        ("snapshots/overlayfs", "snap1"),
        ("snapshots/native", "snap2"),
        ("snapshots/nosuch", "snap3"),
        ("snapshots/overlayfs/x", "snap4"),
        ("snapshots", "snap5"),
        ("images", "img"),
        ("containers", "c1"),
        ("bogus", "x"),
        ("", "x"),
    ]
    for kind, rid in resources:
        p.same(
            L + "AddResource",
            t.AddResourceRequest(id="l1", resource=t.Resource(id=rid, type=kind)),
            E,
        )
    p.same(
        L + "AddResource",
        t.AddResourceRequest(id="l1", resource=t.Resource(id="snap1", type="snapshots/overlayfs")),
        E,
    )
    p.same(
        L + "AddResource",
        t.AddResourceRequest(id="nosuch", resource=t.Resource(id="x", type="bogus")),
        E,
    )
    sort = lambda r: sorted((x.get("type", ""), x.get("id", "")) for x in r.get("resources", []))  # noqa: E731
    for lease in ("l1", "l2", "nosuch"):
        p.same(
            L + "ListResources",
            t.ListResourcesRequest(id=lease),
            t.ListResourcesResponse,
            sort=sort,
        )
    for lease, kind, rid in [
        ("l1", "snapshots/overlayfs", "snap1"),
        ("l1", "snapshots/overlayfs", "snap1"),
        ("l1", "content", "notadigest"),
        ("l1", "bogus", "x"),
        ("nosuch", "snapshots/overlayfs", "snap1"),
        ("nosuch", "bogus", "x"),
    ]:
        p.same(
            L + "DeleteResource",
            t.DeleteResourceRequest(id=lease, resource=t.Resource(id=rid, type=kind)),
            E,
        )
    p.same(L + "ListResources", t.ListResourcesRequest(id="l1"), t.ListResourcesResponse, sort=sort)
    for lease, sync in [("l1", True), ("l1", False), ("l2", False), ("", False), ("nosuch", True)]:
        p.same(L + "Delete", t.DeleteRequest(id=lease, sync=sync), E)
    listing([])


# -- content ------------------------------------------------------------------------------


def test_content_writes_match(p: Pair) -> None:
    """Content/Write: ingests left open (Status, ListStatuses with filters), a resume at
    the offset and one away from it, a restart from 0, commits with and without a digest
    and size, a blob that exists (said at the first message or found at the commit),
    Abort. (ListStatuses is compared before any commit: containerd 1.6 keeps listing the
    ref of a committed ingest that declared a size or digest, with nothing written.)"""
    t = p.t.content
    E = p.t.Empty
    Wr = t.WriteContentResponse
    data = b"hello world\n"
    dg = digest_of(data)

    def write(ref: str, chunks: list[tuple[int, bytes]], **kw: Any) -> None:
        p.same(CT + "Write", write_requests(p, ref, chunks, **kw), Wr, kind="bidi")

    write("r5", [(0, b"abc")], commit=False)
    write("r6", [(0, b"abc")], commit=False)
    write("r7", [(0, b"x")], commit=False)
    write("r9", [], commit=False, total=10)
    write("", [(0, b"x")], commit=False)  # no ref
    p.same(CT + "Write", [t.WriteContentRequest(action=0)], Wr, kind="bidi")
    for ref in ("r5", "r9", "nosuch", ""):
        p.same(CT + "Status", t.StatusRequest(ref=ref), t.StatusResponse)
    sort = by("ref", "statuses")
    for filters in (
        [],
        ["ref==r7"],
        ["ref~=^r[5-7]$"],
        ["ref==r7,"],
        ["ref==r7", "ref==r5"],
        ["offset==1"],
        ["ref!=r7"],
    ):
        p.same(
            CT + "ListStatuses",
            t.ListStatusesRequest(filters=filters),
            t.ListStatusesResponse,
            sort=sort,
        )
    write("r5", [(3, b"def")], expected=digest_of(b"abcdef"))  # resumed at its offset
    write("r6", [(5, b"zzz")], commit=False)  # not at the offset
    write("r6", [(0, b"xyz")], expected=digest_of(b"xyz"))  # from 0 again: truncated
    write("r1", [(0, data)], expected=dg, total=len(data), labels={"l": "1"})
    write("r1", [(0, data)], expected=dg, total=len(data))  # exists: said at once
    write("r1b", [(0, data)])  # exists: found at the commit
    write("r4", [(0, b"other")])  # neither digest nor size
    write("r8", [(0, b"x"), (1, b"y")], total=2)
    write("r10", [(0, b"x"), (0, b"y")], total=1)  # written again from 0
    for ref in ("r7", "r7", "", "nosuch"):
        p.same(CT + "Abort", t.AbortRequest(ref=ref), E)
    for ref in ("r7", "r6"):
        p.same(CT + "Status", t.StatusRequest(ref=ref), t.StatusResponse)
    p.same(CT + "Info", t.InfoRequest(digest=dg), t.InfoResponse)


def test_content_commit_mismatches_match(p: Pair) -> None:
    """A commit with the wrong digest or size fails as containerd's does."""
    t = p.t.content
    data = b"hello world\n"
    write_blob(p, "w1", data, expected="sha256:" + "0" * 64, total=len(data))
    write_blob(p, "w2", data, expected=digest_of(data), total=len(data) + 1)
    # more bytes than the declared size: both take them and fail the commit's size check
    # (FailedPrecondition)
    requests = write_requests(p, "w3", [(0, data)], expected=digest_of(data), total=len(data) - 1)
    p.code(CT + "Write", requests, t.WriteContentResponse, kind="bidi")
    p.same(CT + "Info", t.InfoRequest(digest=digest_of(data)), t.InfoResponse)


def test_content_info_update_list_read_delete_match(p: Pair) -> None:
    t = p.t.content
    E = p.t.Empty
    data = b"hello world\n"
    dg = digest_of(data)
    other = b"another blob"
    write_blob(p, "r1", data, expected=dg, total=len(data))
    write_blob(p, "r2", other, expected=digest_of(other), total=len(other), labels={"b.c": "2"})
    for digest in (dg, "sha256:" + "1" * 64, "notadigest", ""):
        p.same(CT + "Info", t.InfoRequest(digest=digest), t.InfoResponse)
    for labels, paths, digest in [
        ({"a": "1", "b.c": "2"}, None, dg),
        ({"x": "1"}, ["labels.x"], dg),
        ({}, ["labels.a"], dg),
        ({"z": ""}, ["labels.z"], dg),
        ({"x": ""}, ["labels.x"], dg),
        ({"q": "1"}, ["labels"], dg),
        ({"q": "1"}, ["size"], dg),
        ({"q": "1"}, ["digest"], dg),
        ({"q": "1"}, ["labels.q", "bogus"], dg),
        ({"q": "1"}, None, "sha256:" + "1" * 64),
        ({"b.c": "2", "e": ""}, None, dg),
    ]:
        req = t.UpdateRequest(info=t.Info(digest=digest, labels=labels), update_mask=mask(paths))
        p.same(CT + "Update", req, t.UpdateResponse)
    sort = by("digest", "info")
    for filters in (
        [],
        ['labels."b.c"==2'],
        ["labels.b.c==2"],
        [f"digest=={dg}"],
        ["size==12"],
        ["labels.nosuch!=x"],
        ["labels.nosuch"],
        ["digest~=^sha256:"],
        ["bad,"],
        ["digest==" + dg, 'labels."b.c"'],
    ):
        p.same(
            CT + "List",
            t.ListContentRequest(filters=filters),
            t.ListContentResponse,
            kind="stream",
            sort=sort,
        )
    for offset, size in [
        (0, 0),
        (0, 5),
        (5, 0),
        (11, 0),
        (12, 0),
        (13, 0),
        (12, 5),
        (11, 5),
        (0, 100),
        (-1, 0),
        (0, -1),
        (100, 1),
    ]:
        req = t.ReadContentRequest(digest=dg, offset=offset, size=size)
        p.same(CT + "Read", req, t.ReadContentResponse, kind="stream")
    for digest in ("sha256:" + "1" * 64, "bad"):
        p.same(
            CT + "Read", t.ReadContentRequest(digest=digest), t.ReadContentResponse, kind="stream"
        )
    for digest in (dg, dg, "bad", "", "sha256:" + "1" * 64):
        p.same(CT + "Delete", t.DeleteContentRequest(digest=digest), E)


# -- images -------------------------------------------------------------------------------


def test_images_match(p: Pair) -> None:
    """Images whose target is a blob both hold: names that are not references, targets
    containerd refuses, update masks (labels, target), filters, deletes."""
    t = p.t.images
    E = p.t.Empty
    D = p.t.descriptor.Descriptor
    blob = b'{"schemaVersion": 2}'
    write_blob(p, "m1", blob, expected=digest_of(blob), total=len(blob))
    manifest = "application/vnd.oci.image.manifest.v1+json"
    # berthd keeps no annotations of an image's target yet (its images table has no
    # column for them, and a schema change would stop a berthd of the previous schema
    # from resuming if its successor died half-way through a handover): none here
    target = D(media_type=manifest, digest=digest_of(blob), size=len(blob))

    def image(name: str, **kw: Any) -> Any:
        return t.Image(name=name, target=kw.pop("target", target), **kw)

    for img in [
        image("docker.io/library/a:1", labels={"l.a": "x", "e": ""}),
        image("docker.io/library/a:1"),
        image("notareference!!"),
        image("plain"),
        image(""),
        image("x", target=D()),
        image("y", target=D(digest=digest_of(blob))),
        image("z", target=D(media_type="m", digest="bad", size=1)),
        image("w", target=D(media_type="m", digest=digest_of(blob), size=0)),
        image("u", target=D(digest=digest_of(blob), size=len(blob))),
        # a target not in the content store: recorded all the same
        image("absent", target=D(media_type=manifest, digest=digest_of(b"not held"), size=8)),
    ]:
        p.same(I + "Create", t.CreateImageRequest(image=img), t.CreateImageResponse)
    for name in ["docker.io/library/a:1", "notareference!!", "nosuch", ""]:
        p.same(I + "Get", t.GetImageRequest(name=name), t.GetImageResponse)
    for filters in (
        [],
        ['labels."l.a"==x'],
        ["name~=^docker"],
        [f"target.digest=={digest_of(blob)}"],
        [f"target.mediatype=={manifest}"],
        ["name==plain", "name==u"],
        ['name=="docker.io/library/a:1"'],
        ["name==docker.io/library/a:1"],
        ["target.size==20"],
        ["name,"],
    ):
        p.same(
            I + "List",
            t.ListImagesRequest(filters=filters),
            t.ListImagesResponse,
            sort=by("name", "images"),
        )
    for img, paths in [
        (image("docker.io/library/a:1", labels={"n": "1"}), None),
        (image("docker.io/library/a:1", labels={"m": "1"}), ["labels.m"]),
        (image("docker.io/library/a:1"), ["labels.n"]),
        (image("docker.io/library/a:1", labels={"o": "1", "p": "2"}), ["labels"]),
        (image("docker.io/library/a:1", labels={"p": ""}), ["labels.p"]),
        (
            image(
                "docker.io/library/a:1",
                target=D(media_type="m2", digest=digest_of(blob), size=len(blob)),
            ),
            ["target"],
        ),
        (image("docker.io/library/a:1", target=D()), ["target"]),
        (image("docker.io/library/a:1"), ["name"]),
        (image("docker.io/library/a:1"), ["labels.k", "bogus"]),
        (image("nosuch"), None),
        (image(""), None),
        (image("docker.io/library/a:1", target=D()), None),
    ]:
        p.same(
            I + "Update",
            t.UpdateImageRequest(image=img, update_mask=mask(paths)),
            t.UpdateImageResponse,
        )
        p.same(I + "Get", t.GetImageRequest(name="docker.io/library/a:1"), t.GetImageResponse)
    for name, sync in [
        ("plain", False),
        ("plain", False),
        ("", False),
        ("docker.io/library/a:1", True),
    ]:
        p.same(I + "Delete", t.DeleteImageRequest(name=name, sync=sync), E)
    p.same(I + "List", t.ListImagesRequest(), t.ListImagesResponse, sort=by("name", "images"))


# -- snapshots ----------------------------------------------------------------------------

MOUNTS = frozenset({"mounts"})  # paths under each daemon's own root


def test_snapshots_match(p: Pair) -> None:
    """overlayfs on both: Prepare/View/Commit/Remove/Stat/Update/Usage/Mounts/List, keys
    reused, parents that do not exist or are not committed, a parent with children."""
    t = p.t.snapshots
    E = p.t.Empty
    sn = "overlayfs"

    def prepare(
        key: str, parent: str = "", labels: dict[str, str] | None = None, snapshotter: str = sn
    ) -> None:
        req = t.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels or {}
        )
        p.same(S + "Prepare", req, t.PrepareSnapshotResponse, drop=MOUNTS)

    def view(key: str, parent: str = "") -> None:
        req = t.ViewSnapshotRequest(snapshotter=sn, key=key, parent=parent)
        p.same(S + "View", req, t.ViewSnapshotResponse, drop=MOUNTS)

    def commit(name: str, key: str, labels: dict[str, str] | None = None) -> None:
        req = t.CommitSnapshotRequest(snapshotter=sn, name=name, key=key, labels=labels or {})
        p.same(S + "Commit", req, E)

    def stat(*keys: str) -> None:
        for key in keys:
            p.same(
                S + "Stat", t.StatSnapshotRequest(snapshotter=sn, key=key), t.StatSnapshotResponse
            )

    prepare("a1", labels={"l": "1", "e": ""})
    prepare("a1")
    prepare("a2", parent="nosuch")
    prepare("a3", snapshotter="nosuchsnapshotter")
    prepare("a4", snapshotter="")
    stat("a1")
    commit("c1", "a1", {"x": "y"})
    commit("c1", "a1")
    commit("c1", "nosuch")
    commit("c2", "nosuch")
    prepare("b1", parent="c1")
    view("v1", parent="c1")
    view("v2")
    view("v3", parent="b1")
    prepare("b2", parent="b1")
    commit("c3", "v1")
    prepare("a5", labels={"keep": "1"})
    commit("c4", "a5")
    stat("c1", "b1", "v1", "c4", "nosuch", "")
    for key in ("b1", "v1", "c1", "nosuch", ""):
        p.same(
            S + "Mounts", t.MountsRequest(snapshotter=sn, key=key), t.MountsResponse, drop=MOUNTS
        )
    for key in ("c1", "b1", "v1", "nosuch", ""):
        p.same(S + "Usage", t.UsageRequest(snapshotter=sn, key=key), t.UsageResponse)
    for name, labels, paths in [
        ("c1", {"n": "1"}, None),
        ("c1", {"m": "1"}, ["labels.m"]),
        ("c1", {}, ["labels.n"]),
        ("c1", {"m": ""}, ["labels.m"]),
        ("c1", {"o": "1", "e": ""}, ["labels"]),
        ("c1", {"o": "1"}, ["name"]),
        ("c1", {"o": "1"}, ["parent"]),
        ("c1", {"o": "1"}, ["bogus"]),
        ("nosuch", {"o": "1"}, None),
        ("", {"o": "1"}, None),
    ]:
        req = t.UpdateSnapshotRequest(
            snapshotter=sn, info=t.Info(name=name, labels=labels), update_mask=mask(paths)
        )
        p.same(S + "Update", req, t.UpdateSnapshotResponse)
    for filters in (
        [],
        ["kind==committed"],
        ["kind==active"],
        ["kind==view"],
        ["parent==c1"],
        ["parent"],
        ["name~=^b"],
        ["labels.o==1"],
        ["labels.o"],
        ["labels.x!=y"],
        ["kind==committed", "name==b1"],
    ):
        p.same(
            S + "List",
            t.ListSnapshotsRequest(snapshotter=sn, filters=filters),
            t.ListSnapshotsResponse,
            kind="stream",
            sort=by("name", "info"),
        )
    for key in ("c1", "b1", "v1", "v1", "nosuch", ""):
        p.same(S + "Remove", t.RemoveSnapshotRequest(snapshotter=sn, key=key), E)
    p.same(
        S + "List",
        t.ListSnapshotsRequest(snapshotter=sn),
        t.ListSnapshotsResponse,
        kind="stream",
        sort=by("name", "info"),
    )


# -- introspection and version: their shape -----------------------------------------------


def test_introspection_and_version_have_containerd_shape(p: Pair) -> None:
    b, c = p.both(
        "unary", VERSION + "Version", p.t.Empty(), p.t.version.VersionResponse, namespace=None
    )
    assert b.code == c.code == grpc.StatusCode.OK
    assert set(b.response) == set(c.response) == {"version", "revision"}
    assert b.response["version"].split(".")[:2] == c.response["version"].split(".")[:2]
    b, c = p.both(
        "unary", INTRO + "Server", p.t.Empty(), p.t.introspection.ServerResponse, namespace=None
    )
    assert b.code == c.code == grpc.StatusCode.OK and set(b.response) == set(c.response)
    req = p.t.introspection.PluginsRequest(filters=["type==io.containerd.snapshotter.v1"])
    b, c = p.both(
        "unary", INTRO + "Plugins", req, p.t.introspection.PluginsResponse, namespace=None
    )
    assert b.code == c.code == grpc.StatusCode.OK

    def snapshotters(o: Outcome) -> set[str]:
        return {x["id"] for x in o.response["plugins"]}

    assert {"overlayfs", "native"} <= snapshotters(b) & snapshotters(c)
