"""Differential tests, round 2: the Diff service (Apply and Diff on snapshots' mounts), the
Events service's Publish, Forward and Subscribe filters, snapshot Cleanup and ingest
statuses, against a private containerd 1.6 (tests/test_differential.py's Pair: the same
calls to both, compared on the status code and the response, times set aside).

Where the two daemons' mounts differ (each side's own snapshot directories), a request is
made per side (`each`); anything else is the same request to both.
"""

from __future__ import annotations

import gzip
import io
import os
import queue
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from berth.daemon.grpc import convert as capi
from tests.support.helpers import wait_until
from tests.test_differential import (
    CT,
    Outcome,
    Pair,
    S,
    Side,
    _normal,
    by,
    digest_of,
    mask,
    pair,
    write_blob,
)
from tests.test_differential_tasks import Subscription

pytestmark = pytest.mark.container


@pytest.fixture
def p() -> Iterator[Pair]:
    """A containerd and a berth of this test's own."""
    with pair() as both:
        yield both


DF = "/containerd.services.diff.v1.Diff/"
EV = "/containerd.services.events.v1.Events/"

OCI = "application/vnd.oci.image.layer.v1.tar"
SN = "overlayfs"
SIZES = frozenset({"digest", "size"})  # of a gzip stream: each side's own compressor


def each(
    p: Pair, path: str, make: Callable[[str, Side], Any], response_cls: Any
) -> tuple[Outcome, Outcome]:
    """A call whose request differs per side (its mounts): berth's outcome, containerd's."""
    sides = (("berth", p.berth), ("containerd", p.containerd))
    b, c = (
        side.unary(path, make(name, side), response_cls, namespace="", lease=p.lease)
        for name, side in sides
    )
    return b, c


def assert_same(
    path: str, what: str, b: Outcome, c: Outcome, drop: frozenset[str] = frozenset()
) -> None:
    got, want = _normal(b, drop, None), _normal(c, drop, None)
    assert got == want, (
        f"{path} ({what}): berth answered {got} ({b.details!r}), containerd {want} ({c.details!r})"
    )


def mounts_of(p: Pair, side: Side, method: str, request: Any, response_cls: Any) -> Any:
    """A snapshot's mounts on one side (Prepare, View or Mounts), as messages."""
    fn = side.channel.unary_unary(
        S + method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    return fn(request, metadata=side.meta("", p.lease), timeout=60).mounts


def prepared(p: Pair, side: Side, key: str) -> Any:
    t = p.t.snapshots
    request = t.PrepareSnapshotRequest(snapshotter=SN, key=key)
    return mounts_of(p, side, "Prepare", request, t.PrepareSnapshotResponse)


def layer() -> bytes:
    """A layer tar: a directory, a file in it and one at the top, fixed times."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("d")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1000
        tar.addfile(d)
        for name, data in (("d/a.txt", b"hello\n"), ("b.txt", b"x" * 3000)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- Diff/Apply ---------------------------------------------------------------------------


def test_diff_apply_matches(p: Pair) -> None:
    """A layer applied onto a new snapshot's mounts, by its media type (OCI and docker,
    plain, gzip, non-distributable), a descriptor whose size is wrong, no mounts at all, a
    blob that is not there, payloads: the applied descriptor is the uncompressed tar's."""
    t = p.t
    tar = layer()
    gz = gzip.compress(tar, mtime=0)
    for name, data in (("tar", tar), ("gz", gz)):
        write_blob(p, "blob-" + name, data, expected=digest_of(data), total=len(data))
    cases = [
        (tar, OCI, 0),
        (gz, OCI + "+gzip", 0),
        (gz, "application/vnd.docker.image.rootfs.diff.tar.gzip", 0),
        (gz, "application/vnd.docker.image.rootfs.diff.tar", 0),  # docker's: detected
        (tar, OCI + "+gzip", 0),  # a plain tar labelled gzip: detected
        (tar, "application/vnd.oci.image.layer.nondistributable.v1.tar", 0),
        (gz, "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", 0),
        (tar, "application/vnd.docker.image.rootfs.foreign.diff.tar", 0),
        (gz, "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", 0),
        (b"not held", OCI, 0),
        (tar, OCI, 5),  # the size is not the blob's: containerd reads the blob it has
    ]
    for i, (data, media_type, extra) in enumerate(cases):
        desc = t.descriptor.Descriptor(
            media_type=media_type, digest=digest_of(data), size=len(data) + extra
        )

        def apply(_: str, side: Side, key: str = f"apply{i}", desc: Any = desc) -> Any:
            return t.diff.ApplyRequest(diff=desc, mounts=prepared(p, side, key))

        b, c = each(p, DF + "Apply", apply, t.diff.ApplyResponse)
        assert_same(DF + "Apply", media_type, b, c)
    desc = t.descriptor.Descriptor(media_type=OCI, digest=digest_of(tar), size=len(tar))
    p.same(DF + "Apply", t.diff.ApplyRequest(diff=desc), t.diff.ApplyResponse)  # no mounts

    def with_payload(_: str, side: Side) -> Any:
        request = t.diff.ApplyRequest(diff=desc, mounts=prepared(p, side, "payloads"))
        request.payloads["x"].CopyFrom(t.Any(type_url="a/b", value=b"1"))
        return request

    b, c = each(p, DF + "Apply", with_payload, t.diff.ApplyResponse)
    assert_same(DF + "Apply", "payloads", b, c)


# -- Diff/Diff ----------------------------------------------------------------------------


def fill(root: str) -> None:
    """The same files, with the same times, in either side's snapshot."""
    os.makedirs(os.path.join(root, "d"), exist_ok=True)
    with open(os.path.join(root, "d", "a.txt"), "w") as f:
        f.write("hello\n")
    with open(os.path.join(root, "b.txt"), "w") as f:
        f.write("x" * 3000)
    for path in ("d/a.txt", "b.txt", "d"):
        os.utime(os.path.join(root, path), (1000, 1000))


def test_diff_compare_matches(p: Pair) -> None:
    """Diff of an active snapshot (files written into it) against nothing and against an
    empty view: the descriptor (no annotations: the diff ID is the blob's
    `containerd.io/uncompressed` label, for gzip only), the blob's labels; media types
    containerd's differ cannot produce are UNIMPLEMENTED. The bytes are each daemon's own
    (tar padding, compressor): digests and sizes are set aside."""
    t = p.t
    mounts: dict[str, Any] = {}
    for name, side in (("berth", p.berth), ("containerd", p.containerd)):
        up = prepared(p, side, "up")
        fill(up[0].source)
        mounts[name] = up
        view = t.snapshots.ViewSnapshotRequest(snapshotter=SN, key="empty")
        mounts[name + "-view"] = mounts_of(p, side, "View", view, t.snapshots.ViewSnapshotResponse)

    def diff(what: str, kw: dict[str, str]) -> tuple[Outcome, Outcome]:
        def make(name: str, _: Side) -> Any:
            left = mounts[name + "-view"] if kw.get("left") else []
            return t.diff.DiffRequest(
                left=left,
                right=mounts[name],
                media_type=kw.get("media_type", ""),
                labels={"l": kw["label"]} if "label" in kw else {},
                ref=kw.get("ref", ""),
            )

        b, c = each(p, DF + "Diff", make, t.diff.DiffResponse)
        assert_same(DF + "Diff", what, b, c, SIZES)
        return b, c

    def label_keys(outcome: Outcome, side: Side) -> list[str]:
        digest = outcome.response["diff"]["digest"]
        info = side.unary(
            CT + "Info",
            t.content.InfoRequest(digest=digest),
            t.content.InfoResponse,
            namespace="",
            lease=None,
        )
        assert info.code == grpc.StatusCode.OK, info.details
        return sorted(info.response["info"].get("labels", {}))

    cases: list[tuple[str, dict[str, str]]] = [
        # labels are the commit's: on a new blob (containerd leaves a blob that exists as
        # it is, berth adds them to it; not compared)
        ("labelled", {"label": "1"}),
        ("default", {}),
        ("plain tar", {"media_type": OCI, "left": "view"}),
        ("gzip", {"media_type": OCI + "+gzip", "left": "view"}),
        ("a reference", {"ref": "diff-ref"}),
    ]
    digests: dict[str, set[str]] = {"berth": set(), "containerd": set()}
    for what, kw in cases:
        b, c = diff(what, kw)
        assert label_keys(b, p.berth) == label_keys(c, p.containerd), what
        if kw.get("media_type", OCI + "+gzip") == OCI + "+gzip":
            digests["berth"].add(b.response["diff"]["digest"])
            digests["containerd"].add(c.response["diff"]["digest"])
    # the same change is the same gzip blob, whatever the call (berth wrote its temporary
    # file's name into the gzip header: a new blob each time)
    assert (len(digests["berth"]), len(digests["containerd"])) == (1, 1), digests
    for media_type in (
        OCI + "+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/x-unknown",
    ):
        diff(media_type, {"media_type": media_type})


# -- Events -------------------------------------------------------------------------------


def test_event_publish_and_forward_match(p: Pair) -> None:
    """Publish's topics (containerd's identifier rule per component, 76 characters each),
    an empty Any, no namespace; Forward's envelopes: another namespace, an empty or invalid
    one, a bad topic, no time. (An event or envelope missing altogether panics containerd
    1.6's handler: berth refuses it, untested here.)"""
    t = p.t
    E = t.Empty
    event = t.Any(type_url="bt.test", value=b"\x01\x02")
    for topic in [
        "",
        "/",
        "x",
        "/a",
        "/a/b",
        "/A",
        "//a",
        "/a/",
        "/a b",
        "/a..b",
        "/a-",
        "/" + "a" * 76,
        "/" + "a" * 77,
        "/a/" + "b" * 77,
    ]:
        p.same(EV + "Publish", t.events.PublishRequest(topic=topic, event=event), E)
    p.same(EV + "Publish", t.events.PublishRequest(topic="/a", event=t.Any()), E)
    p.same(EV + "Publish", t.events.PublishRequest(topic="/a", event=event), E, namespace=None)
    now = capi.timestamp(time.time_ns())
    envelope = t.events.Envelope
    for env in [
        envelope(timestamp=now, namespace="other", topic="/a", event=event),
        envelope(timestamp=now, topic="/a", event=event),
        envelope(timestamp=now, namespace="a..b", topic="/a", event=event),
        envelope(timestamp=now, namespace="a-", topic="/a", event=event),
        envelope(timestamp=now, namespace="n" * 77, topic="/a", event=event),
        envelope(timestamp=now, namespace="x", topic="a", event=event),
        envelope(namespace="x", topic="/a", event=event),
    ]:
        p.same(EV + "Forward", t.events.ForwardRequest(envelope=env), E)


class Stream(Subscription):
    """One Events/Subscribe stream, read on a thread of its own (test_differential_tasks'),
    that collects the test's own events."""

    def until(self, marker: str, wait: float = 30) -> list[tuple[str, str, str, bytes]] | None:
        """The test's events (type bt.e) before the event of type `marker`; None if that
        has not come within `wait` seconds."""
        got: list[tuple[str, str, str, bytes]] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                e = self.items.get(timeout=0.1)
            except queue.Empty:
                continue
            if e.event.type_url == marker:
                return got
            if e.event.type_url.startswith("bt.e"):
                got.append((e.topic, e.namespace, e.event.type_url, e.event.value))
        return None


def test_event_subscribe_filters_match(p: Pair) -> None:
    """Subscribers with filters on topic (== and ~=), namespace, an OR of two, see the
    same published and forwarded events in the same order."""
    t = p.t
    E = t.Empty
    ns = p.berth.namespace
    filters = {
        "all": [],
        "topic": ['topic=="/bt/one"'],
        "topic~": ['topic~="/bt/"'],
        "namespace": [f"namespace=={ns}"],
        "other": ["namespace==other"],
        "or": ['topic=="/bt/one"', "namespace==other"],
        "and": [f'namespace=={ns},topic~="^/bt/t"'],
    }
    # each also passes the markers (an alternative of its own), which say when a
    # subscription is in place and when it has seen everything before them
    mark = 'topic=="/bt/mark"'
    subs = {
        (name, side_name): Stream(side, [*f, mark] if f else f)
        for name, f in filters.items()
        for side_name, side in (("berth", p.berth), ("containerd", p.containerd))
    }

    def marker(type_url: str) -> None:
        request = t.events.PublishRequest(topic="/bt/mark", event=t.Any(type_url=type_url))
        p.same(EV + "Publish", request, E)

    try:
        waiting = dict(subs)

        def ready() -> bool:
            marker("bt.ready")
            for key, sub in list(waiting.items()):
                if sub.until("bt.ready", wait=0.5) is not None:
                    del waiting[key]
            return not waiting

        wait_until(ready, timeout=30, what="the subscriptions")
        for topic in ["/bt/one", "/bt/two", "/other"]:
            event = t.Any(type_url="bt.e", value=topic.encode())
            p.same(EV + "Publish", t.events.PublishRequest(topic=topic, event=event), E)
        envelope = t.events.Envelope(
            timestamp=capi.timestamp(time.time_ns()),
            namespace="other",
            topic="/bt/fwd",
            event=t.Any(type_url="bt.e", value=b"f"),
        )
        p.same(EV + "Forward", t.events.ForwardRequest(envelope=envelope), E)
        marker("bt.stop")
        for name in filters:
            got = subs[(name, "berth")].until("bt.stop", wait=30)
            want = subs[(name, "containerd")].until("bt.stop", wait=30)
            assert got == want, f"filter {filters[name]}: berth {got}, containerd {want}"
    finally:
        for sub in subs.values():
            sub.close()


# -- Snapshots/Cleanup, Content/Status ------------------------------------------------------


def test_snapshot_cleanup_codes_match(p: Pair) -> None:
    """Cleanup without a snapshotter or of an unknown one is INVALID_ARGUMENT on both. Of
    a real one containerd 1.6 answers UNIMPLEMENTED (its metadata layer has no Cleanup);
    berth, with nothing to clean up, OK."""
    t = p.t.snapshots
    for snapshotter in ("", "nosuch"):
        p.same(S + "Cleanup", t.CleanupRequest(snapshotter=snapshotter), p.t.Empty)
    for snapshotter in (SN, "native"):
        b, c = p.both("unary", S + "Cleanup", t.CleanupRequest(snapshotter=snapshotter), p.t.Empty)
        assert (b.code, c.code) == (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)


def test_ingest_status_matches(p: Pair) -> None:
    """An ingest opened with a size and an expected digest, written in part: Status and
    ListStatuses show its ref, offset and total, not the digest (containerd keeps none)."""
    t = p.t.content
    W = t.WriteContentRequest
    requests = [
        W(action=0, ref="st1", total=10, expected=digest_of(b"0123456789")),
        W(action=1, ref="st1", offset=0, data=b"0123"),
    ]
    p.same(CT + "Write", requests, t.WriteContentResponse, kind="bidi")
    p.same(CT + "Status", t.StatusRequest(ref="st1"), t.StatusResponse)
    for filters in ([], ["ref==st1"]):
        p.same(
            CT + "ListStatuses",
            t.ListStatusesRequest(filters=filters),
            t.ListStatusesResponse,
            sort=by("ref", "statuses"),
        )


def test_snapshot_usage_views_and_labels_match(p: Pair) -> None:
    """A snapshot key that is a committed name; labels of an active snapshot and of a view
    updated with and without masks; Usage of an active snapshot with files in its upper
    directory, of a view, of its committed parent, and after its commit; native's Usage."""
    t = p.t.snapshots
    E = p.t.Empty
    mounts = frozenset({"mounts"})

    def same(method: str, request: Any, response_cls: Any) -> None:
        p.same(S + method, request, response_cls, drop=mounts)

    same("Prepare", t.PrepareSnapshotRequest(snapshotter=SN, key="a"), t.PrepareSnapshotResponse)
    same("Commit", t.CommitSnapshotRequest(snapshotter=SN, key="a", name="c"), E)
    same("Prepare", t.PrepareSnapshotRequest(snapshotter=SN, key="c"), t.PrepareSnapshotResponse)
    same("View", t.ViewSnapshotRequest(snapshotter=SN, key="c"), t.ViewSnapshotResponse)
    request = t.PrepareSnapshotRequest(snapshotter=SN, key="b", parent="c", labels={"x": "1"})
    same("Prepare", request, t.PrepareSnapshotResponse)
    request = t.ViewSnapshotRequest(snapshotter=SN, key="v", parent="c", labels={"y": "2"})
    same("View", request, t.ViewSnapshotResponse)
    same("Mounts", t.MountsRequest(snapshotter=SN, key="v"), t.MountsResponse)
    for key, labels, paths in [
        ("b", {"z": "3"}, ["labels.z"]),
        ("v", {"w": "1"}, None),
        ("b", {}, ["labels"]),
        ("v", {"y": "5"}, ["labels.y", "labels.q"]),
    ]:
        request = t.UpdateSnapshotRequest(
            snapshotter=SN, info=t.Info(name=key, labels=labels), update_mask=mask(paths)
        )
        same("Update", request, t.UpdateSnapshotResponse)
    for side in (p.berth, p.containerd):
        (mount,) = mounts_of(
            p, side, "Mounts", t.MountsRequest(snapshotter=SN, key="b"), t.MountsResponse
        )
        upper = dict(o.split("=", 1) for o in mount.options if "=" in o)["upperdir"]
        os.makedirs(os.path.join(upper, "dd"))
        with open(os.path.join(upper, "dd", "f"), "wb") as f:
            f.write(b"y" * 10000)
        with open(os.path.join(upper, "g"), "wb") as f:
            f.write(b"y" * 5)
    for key in ("b", "v", "c"):
        same("Usage", t.UsageRequest(snapshotter=SN, key=key), t.UsageResponse)
    same("Commit", t.CommitSnapshotRequest(snapshotter=SN, key="b", name="c2"), E)
    same("Usage", t.UsageRequest(snapshotter=SN, key="c2"), t.UsageResponse)
    request = t.PrepareSnapshotRequest(snapshotter="native", key="n1")
    same("Prepare", request, t.PrepareSnapshotResponse)
    same("Usage", t.UsageRequest(snapshotter="native", key="n1"), t.UsageResponse)
    p.same(
        S + "List",
        t.ListSnapshotsRequest(snapshotter=SN),
        t.ListSnapshotsResponse,
        kind="stream",
        sort=by("name", "info"),
    )
