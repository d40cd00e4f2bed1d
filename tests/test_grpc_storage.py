"""containerd's storage services at the wire (Content, Snapshots, Diff, Leases and the
collector behind them), as containerd 1.6.20 answers them, checked with plain grpcio stubs;
and real containers (runc, through berth's Tasks service) on 128- and 400-layer overlay
chains."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from berth.daemon.grpc import convert as capi
from berth.daemon.oci import default_spec
from tests.support.helpers import wait_until
from tests.support.images import layer_tar
from tests.support.wire import Wire, served_wire

pytestmark = pytest.mark.container

CS = "/containerd.services.content.v1.Content/"
SN = "/containerd.services.snapshots.v1.Snapshots/"
DF = "/containerd.services.diff.v1.Diff/"
LS = "/containerd.services.leases.v1.Leases/"
C = "/containerd.services.containers.v1.Containers/"
T = "/containerd.services.tasks.v1.Tasks/"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
STAT, WRITE, COMMIT = 0, 1, 2
GC_ROOT = "containerd.io/gc.root"
OVERLAY_MAX_STACK = 500  # the kernel's OVL_MAX_STACK: lower layers one overlay mount stacks


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with served_wire() as w:
        yield w


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _meta(w: Wire, lease: str = "") -> list[tuple[str, str]]:
    return w.meta() + ([("containerd-lease", lease)] if lease else [])


def _write(w: Wire, requests: list[Any], lease: str = "") -> list[Any]:
    """One Content.Write stream: every request sent, every response read."""
    call = w.channel.stream_stream(
        CS + "Write",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=w.t.content.WriteContentResponse.FromString,
    )
    return list(call(iter(requests), metadata=_meta(w, lease), timeout=60))


def _write_code(w: Wire, requests: list[Any]) -> tuple[Any, str]:
    with pytest.raises(grpc.RpcError) as info:
        _write(w, requests)
    return info.value.code(), info.value.details()


def _put(
    w: Wire, data: bytes, ref: str, labels: dict[str, str] | None = None, lease: str = ""
) -> str:
    req = w.t.content.WriteContentRequest
    commit = req(action=COMMIT, ref=ref, total=len(data), expected=_digest(data), data=data)
    commit.labels.update(labels or {})
    _write(w, [req(action=STAT, ref=ref), commit], lease)
    return _digest(data)


def _exists(w: Wire, digest: str) -> bool:
    try:
        w.unary(CS + "Info", w.t.content.InfoRequest(digest=digest), w.t.content.InfoResponse)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
        return False


# -- Content.Write ------------------------------------------------------------------------


def test_write_reports_the_digest_of_the_bytes_so_far(wire: Wire) -> None:
    req = wire.t.content.WriteContentRequest
    data = b"so far, so good " * 1000
    replies = _write(
        wire,
        [
            req(action=STAT, ref="so-far", total=len(data)),
            req(action=WRITE, offset=0, data=data[:100]),
            req(action=STAT),
            req(action=WRITE, offset=100, data=data[100:5000]),
            req(action=COMMIT, offset=5000, data=data[5000:], total=len(data)),
        ],
    )
    assert (
        [r.digest for r in replies]
        == [
            EMPTY_DIGEST,  # nothing received yet
            _digest(data[:100]),
            _digest(data[:100]),
            _digest(data[:5000]),
            _digest(data),
        ]
    )
    assert [r.offset for r in replies] == [0, 100, 100, 5000, len(data)]
    assert replies[0].total == len(data) and replies[0].started_at.seconds > 0
    # A write that is not at the current offset: OutOfRange, as containerd answers.
    code, details = _write_code(
        wire, [req(action=WRITE, ref="gap", data=b"abc"), req(action=WRITE, offset=10, data=b"x")]
    )
    assert code == grpc.StatusCode.OUT_OF_RANGE and "offset" in details, details
    wire.unary(CS + "Abort", wire.t.content.AbortRequest(ref="gap"), wire.t.Empty)


def test_commit_of_content_that_exists_is_already_exists(wire: Wire) -> None:
    req = wire.t.content.WriteContentRequest
    data = b"committed once"
    digest = _put(wire, data, "first", labels={"a": "1"})
    # Again without any expected digest: the bytes are written, the commit finds them.
    code, details = _write_code(
        wire,
        [
            req(action=WRITE, ref="again", data=data),
            req(action=COMMIT, offset=len(data), total=len(data)),
        ],
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    # With the expected digest on the commit only.
    code, details = _write_code(
        wire,
        [
            req(action=WRITE, ref="again2", data=data),
            req(action=COMMIT, offset=len(data), expected=digest),
        ],
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    # Neither left an ingest behind, nor changed what is stored.
    statuses = wire.unary(
        CS + "ListStatuses",
        wire.t.content.ListStatusesRequest(),
        wire.t.content.ListStatusesResponse,
    ).statuses
    assert not {"again", "again2"} & {s.ref for s in statuses}
    info = wire.unary(
        CS + "Info", wire.t.content.InfoRequest(digest=digest), wire.t.content.InfoResponse
    )
    assert dict(info.info.labels) == {"a": "1"} and info.info.size == len(data)


def test_a_stream_that_ends_without_a_commit_releases_its_ingest(wire: Wire) -> None:
    """The next writer of the ref resumes at once (the lock is not held until berthd sees
    a connection close), and an Abort right after the stream succeeds."""
    req = wire.t.content.WriteContentRequest
    data = os.urandom(64 << 10)
    for i in range(10):
        ref = f"resume-{i}"
        first = _write(wire, [req(action=WRITE, ref=ref, total=len(data), data=data[:1000])])
        assert first[-1].offset == 1000
        second = _write(
            wire,
            [
                req(action=STAT, ref=ref),
                req(action=COMMIT, offset=1000, data=data[1000:], expected=_digest(data)),
            ],
        )
        assert second[0].offset == 1000 and second[0].digest == _digest(data[:1000])
        assert second[-1].digest == _digest(data)
        wire.unary(
            CS + "Delete", wire.t.content.DeleteContentRequest(digest=_digest(data)), wire.t.Empty
        )
        _write(wire, [req(action=WRITE, ref=f"dropped-{i}", data=b"partial")])
        wire.unary(CS + "Abort", wire.t.content.AbortRequest(ref=f"dropped-{i}"), wire.t.Empty)


# -- Snapshots ----------------------------------------------------------------------------


def _prepare(w: Wire, key: str, parent: str = "", labels: dict[str, str] | None = None) -> Any:
    request = w.t.snapshots.PrepareSnapshotRequest(snapshotter="overlayfs", key=key, parent=parent)
    request.labels.update(labels or {})
    return w.unary(SN + "Prepare", request, w.t.snapshots.PrepareSnapshotResponse).mounts


def _commit(w: Wire, name: str, key: str, labels: dict[str, str] | None = None) -> None:
    request = w.t.snapshots.CommitSnapshotRequest(snapshotter="overlayfs", name=name, key=key)
    request.labels.update(labels or {})
    w.unary(SN + "Commit", request, w.t.Empty)


def _stat(w: Wire, key: str) -> Any:
    request = w.t.snapshots.StatSnapshotRequest(snapshotter="overlayfs", key=key)
    return w.unary(SN + "Stat", request, w.t.snapshots.StatSnapshotResponse).info


def _snapshot_exists(w: Wire, key: str) -> bool:
    try:
        _stat(w, key)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
        return False


def test_snapshot_remove_with_a_child_and_timestamps(wire: Wire) -> None:
    t = wire.t
    _prepare(wire, "ts-base-tmp")
    _commit(wire, "ts-base", "ts-base-tmp")
    _prepare(wire, "ts-child", "ts-base")
    view = t.snapshots.ViewSnapshotRequest(snapshotter="overlayfs", key="ts-view", parent="ts-base")
    wire.unary(SN + "View", view, t.snapshots.ViewSnapshotResponse)
    for key in ("ts-base", "ts-child", "ts-view"):
        info = _stat(wire, key)
        assert info.created_at == info.updated_at, key  # one timestamp at creation
        assert info.created_at.seconds > 0
    remove = t.snapshots.RemoveSnapshotRequest(snapshotter="overlayfs", key="ts-base")
    with pytest.raises(grpc.RpcError) as failed:
        wire.unary(SN + "Remove", remove, t.Empty)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot remove" in failed.value.details(), failed.value.details()
    assert _snapshot_exists(wire, "ts-base")
    # An update moves Updated only.
    before = _stat(wire, "ts-child")
    update = t.snapshots.UpdateSnapshotRequest(
        snapshotter="overlayfs", info=t.snapshots.Info(name="ts-child", labels={"l": "1"})
    )
    update.update_mask.paths.append("labels.l")
    after = wire.unary(SN + "Update", update, t.snapshots.UpdateSnapshotResponse).info
    assert after.created_at == before.created_at
    assert (after.updated_at.seconds, after.updated_at.nanos) > (
        before.updated_at.seconds,
        before.updated_at.nanos,
    )
    for key in ("ts-view", "ts-child", "ts-base"):
        wire.unary(
            SN + "Remove",
            t.snapshots.RemoveSnapshotRequest(snapshotter="overlayfs", key=key),
            t.Empty,
        )


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _apply(w: Wire, mounts: Any, data: bytes) -> None:
    t = w.t
    desc = t.descriptor.Descriptor(
        media_type="application/vnd.oci.image.layer.v1.tar", digest=_digest(data), size=len(data)
    )
    w.unary(DF + "Apply", t.diff.ApplyRequest(diff=desc, mounts=mounts), t.diff.ApplyResponse)


def _gc_now(w: Wire) -> None:
    """A synchronous collection, as a client triggers one: delete a lease with `sync`."""
    t = w.t
    lease = w.unary(LS + "Create", t.leases.CreateRequest(), t.leases.CreateResponse).lease
    w.unary(LS + "Delete", t.leases.DeleteRequest(id=lease.id, sync=True), t.Empty)


def _run_on(w: Wire, cid: str, mounts: Any, script: str) -> int:
    """A container on `mounts` through Containers and Tasks (as ctr runs one): its exit
    status. The task is deleted and the container removed whatever happens."""
    t = w.t
    spec = default_spec(cid, w.namespace, ["sh", "-c", script])
    container = t.containers.Container(
        id=cid,
        runtime=t.containers.Container.Runtime(name="io.containerd.runc.v2"),
        spec=capi.json_any(capi.SPEC_TYPE, spec),
    )
    w.unary(
        C + "Create",
        t.containers.CreateContainerRequest(container=container),
        t.containers.CreateContainerResponse,
    )
    try:
        create = t.tasks.CreateTaskRequest(container_id=cid, rootfs=mounts)
        w.unary(T + "Create", create, t.tasks.CreateTaskResponse)
        try:
            w.unary(T + "Start", t.tasks.StartRequest(container_id=cid), t.tasks.StartResponse)
            waited = w.unary(
                T + "Wait", t.tasks.WaitRequest(container_id=cid), t.tasks.WaitResponse
            )
            return int(waited.exit_status)
        finally:
            w.unary(
                T + "Delete", t.tasks.DeleteTaskRequest(container_id=cid), t.tasks.DeleteResponse
            )
    finally:
        w.unary(C + "Delete", t.containers.DeleteContainerRequest(id=cid), t.Empty)


def _layer_script(top: int) -> str:
    """Checks, inside the container, what every layer of a `top`-layer chain left."""
    return (
        f'[ "$(cat /top)" = {top} ] && [ "$(ls /layers | wc -l)" = {top - 1} ] '
        f'&& [ "$(cat /layers/2)" = 2 ] && [ "$(cat /layers/{top})" = {top} ] '
        "&& [ ! -e /gone ]"
    )


def test_deep_layer_chains_prepare_mount_and_run(wire: Wire, busybox_rootfs: str) -> None:
    """containerd's snapshotter suite builds 128 layers labelled `containerd.io/gc.root`
    (and no lease); berth collected them mid-chain (the "layer 35" failure: a collection
    ran, and gc.root meant nothing to it). Here a collection runs after every 50 layers;
    containers run on 128, 400 and 500 lower layers (the kernel's most: OVL_MAX_STACK);
    one more is a clear InvalidArgument, from Diff.Apply and from Tasks.Create alike."""
    root = {GC_ROOT: "deep-chain"}
    parent = ""
    base = layer_tar(busybox_rootfs)
    for i in range(1, OVERLAY_MAX_STACK + 3):
        files = {"top": str(i).encode(), f"layers/{i}": str(i).encode()}
        if i == 3:
            files["gone"] = b"removed by the next layer"
        if i == 4:
            files[".wh.gone"] = b""
        data = base if i == 1 else _tar(files)
        _put(wire, data, f"deep-{i}", labels={GC_ROOT: "layer blob"})
        key = f"deep-prepare-{i}"
        mounts = _prepare(wire, key, parent, root)
        if i == OVERLAY_MAX_STACK + 2:  # 501 lower layers: one more than overlayfs stacks
            with pytest.raises(grpc.RpcError) as refused:
                _apply(wire, mounts, data)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(OVERLAY_MAX_STACK) in refused.value.details(), refused.value.details()
            with pytest.raises(grpc.RpcError) as refused:
                _run_on(wire, "deep501", mounts, "true")
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(OVERLAY_MAX_STACK) in refused.value.details(), refused.value.details()
            break
        _apply(wire, mounts, data)
        _commit(wire, f"deep-{i}", key, root)
        parent = f"deep-{i}"
        if i % 50 == 0:
            _gc_now(wire)  # a collection keeps what is labelled gc.root
        if i in (128, 400, OVERLAY_MAX_STACK):
            run_mounts = _prepare(wire, f"deep-rootfs-{i}", parent, root)
            lower = next(o for o in run_mounts[0].options if o.startswith("lowerdir="))
            assert lower.count(":") == i - 1 and len(",".join(run_mounts[0].options)) > 4096
            assert _run_on(wire, f"deep{i}", run_mounts, _layer_script(i)) == 0
    assert parent == f"deep-{OVERLAY_MAX_STACK + 1}"


def test_lowerdirs_too_long_even_relative_mount_through_short_links(
    wire: Wire, busybox_rootfs: str
) -> None:
    """300 lowerdirs whose paths share no useful parent (as with many-digit snapshot ids,
    or a client's own mounts): too long for a page even relative, so berthd (Diff.Apply,
    from a child process: it is threaded) and the shim (Tasks.Create) mount them through
    links named 0, 1, ... and remove the links at once."""
    t = wire.t
    base = tempfile.mkdtemp(prefix="bt-lower-", dir="/tmp")
    try:
        layers = []
        for i in range(300):
            layer = os.path.join(base, f"{i:03d}-{'x' * 100}", "layer")
            os.makedirs(layer)
            Path(layer, f"marker-{i}").write_text(str(i))
            layers.append(layer)
        lower = "lowerdir=" + ":".join([*reversed(layers), busybox_rootfs])

        def overlay(name: str) -> Any:
            upper, work = os.path.join(base, name, "upper"), os.path.join(base, name, "work")
            os.makedirs(upper)
            os.makedirs(work)
            options = [f"workdir={work}", f"upperdir={upper}", lower]
            return [t.mount.Mount(type="overlay", source="overlay", options=options)]

        applied = _tar({"applied": b"yes"})
        _put(wire, applied, "shortlinks-layer")
        _apply(wire, overlay("apply"), applied)
        assert Path(base, "apply", "upper", "applied").read_text() == "yes"
        script = '[ "$(ls / | grep -c marker-)" = 300 ] && [ "$(cat /marker-299)" = 299 ]'
        assert _run_on(wire, "shortlinks", overlay("run"), script) == 0
        assert not [n for n in os.listdir(base) if n.startswith(".lower-")]
        state = Path(wire.daemon.state)
        assert not [*state.glob("mounts/.lower-*"), *state.glob("tasks/*/*/.lower-*")]
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- Leases and the collector -------------------------------------------------------------


def test_lease_sync_delete_collects_what_only_the_lease_held(wire: Wire) -> None:
    """A pull that discards its layers (the manifest names them, no gc.ref label does):
    deleting its lease with SynchronousDelete collects them before the answer. Whatever
    another root holds stays: an image's target and the labels of the chain below it,
    gc.root content and snapshots, the labels of images, containers and snapshots."""
    t = wire.t
    lease = wire.unary(
        LS + "Create", t.leases.CreateRequest(id="pull-lease"), t.leases.CreateResponse
    ).lease.id
    layer = _put(wire, b"layer bytes " * 100, "l-layer", lease=lease)
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    }
    config = _put(wire, json.dumps(config_doc).encode(), "l-config", lease=lease)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config,
            "size": 10,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1200}
        ],
    }
    manifest_bytes = json.dumps(manifest_doc).encode()
    manifest = _put(
        wire, manifest_bytes, "l-manifest", {"containerd.io/gc.ref.content.config": config}, lease
    )
    rooted = _put(wire, b"a gc root", "l-rooted", {GC_ROOT: "yes"}, lease)
    by_image_label = _put(wire, b"named by an image label", "l-imglabel", lease=lease)
    by_container_label = _put(wire, b"named by a container label", "l-ctrlabel", lease=lease)
    by_snapshot_label = _put(wire, b"named by a snapshot label", "l-snaplabel", lease=lease)
    loose = _put(wire, b"held by the lease alone", "l-loose", lease=lease)
    image = t.images.Image(
        name="example.com/discarding:1",
        target=t.descriptor.Descriptor(
            media_type="application/vnd.oci.image.manifest.v1+json",
            digest=manifest,
            size=len(manifest_bytes),
        ),
        labels={"containerd.io/gc.ref.content.extra": by_image_label},
    )
    wire.unary(
        "/containerd.services.images.v1.Images/Create",
        t.images.CreateImageRequest(image=image),
        t.images.CreateImageResponse,
    )
    container = t.containers.Container(
        id="labelled",
        runtime=t.containers.Container.Runtime(name="io.containerd.runc.v2"),
        spec=capi.json_any(
            capi.SPEC_TYPE, default_spec("labelled", wire.namespace, ["true"], root="")
        ),
        labels={"containerd.io/gc.ref.content.x": by_container_label},
    )
    wire.unary(
        C + "Create",
        t.containers.CreateContainerRequest(container=container),
        t.containers.CreateContainerResponse,
    )
    # Snapshots: one gc.root, one whose label names content, one held by the lease alone.
    wire_lease = _meta(wire, lease)
    for key, labels in (
        ("l-snap-root", {GC_ROOT: "yes"}),
        ("l-snap-ref", {GC_ROOT: "yes", "containerd.io/gc.ref.content.blob": by_snapshot_label}),
        ("l-snap-leased", {}),
    ):
        request = t.snapshots.PrepareSnapshotRequest(
            snapshotter="overlayfs", key=key, labels=labels
        )
        fn = wire.channel.unary_unary(
            SN + "Prepare",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=t.snapshots.PrepareSnapshotResponse.FromString,
        )
        fn(request, metadata=wire_lease, timeout=60)
    try:
        wire.unary(LS + "Delete", t.leases.DeleteRequest(id=lease, sync=True), t.Empty)
        # Collected before the answer.
        assert not _exists(wire, layer)
        assert not _exists(wire, loose)
        assert not _snapshot_exists(wire, "l-snap-leased")
        blobs = os.path.join(wire.daemon.root, "content", "blobs", "sha256")
        assert not os.path.exists(os.path.join(blobs, layer[7:]))
        # Kept: what a root holds.
        for digest in (
            manifest,
            config,
            rooted,
            by_image_label,
            by_container_label,
            by_snapshot_label,
        ):
            assert _exists(wire, digest), digest
        assert _snapshot_exists(wire, "l-snap-root") and _snapshot_exists(wire, "l-snap-ref")
    finally:
        wire.unary(C + "Delete", t.containers.DeleteContainerRequest(id="labelled"), t.Empty)
        wire.unary(
            "/containerd.services.images.v1.Images/Delete",
            t.images.DeleteImageRequest(name="example.com/discarding:1"),
            t.Empty,
        )


def test_image_snapshot_content_and_namespace_events_as_containerd_sends_them(
    wire: Wire,
) -> None:
    """Each call containerd publishes an event for gets it, with containerd's type URL
    and fields: ImageCreate/Update/Delete (`containerd.services.images.v1`), ContentDelete,
    SnapshotPrepare/Commit/Remove (a View publishes nothing), ContainerUpdate with the
    container's fields; a namespace's events carry the caller's namespace; a filter on a
    field that is not a string (`event.pid`) matches nothing, as on containerd."""
    t = wire.t
    received: queue.Queue[Any] = queue.Queue()
    marker = "evmark" + wire.namespace[2:]
    streams = [
        wire.subscribe(filters)
        for filters in (
            [f"namespace=={wire.namespace}"],
            ["event.pid", "event.exit_status==0", f"event.name=={marker}"],
        )
    ]

    def pump(index: int) -> None:
        with contextlib.suppress(grpc.RpcError):
            for envelope in streams[index]:
                received.put((index, envelope))

    readers = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        time.sleep(0.5)  # both subscriptions reach berthd before the first event
        blob = _put(wire, b"an image target " * 4, "ev-target", {GC_ROOT: "yes"})
        loose = _put(wire, b"deleted by its client", "ev-loose", {GC_ROOT: "yes"})
        image = t.images.Image(
            name="example.com/events:1",
            target=t.descriptor.Descriptor(
                media_type="application/octet-stream", digest=blob, size=64
            ),
            labels={"role": "first"},
        )
        images = "/containerd.services.images.v1.Images/"
        wire.unary(
            images + "Create",
            t.images.CreateImageRequest(image=image),
            t.images.CreateImageResponse,
        )
        image.labels["role"] = "second"
        wire.unary(
            images + "Update",
            t.images.UpdateImageRequest(image=image),
            t.images.UpdateImageResponse,
        )
        wire.unary(images + "Delete", t.images.DeleteImageRequest(name=image.name), t.Empty)
        wire.unary(CS + "Delete", t.content.DeleteContentRequest(digest=loose), t.Empty)
        sn = {"snapshotter": "overlayfs"}
        rooted = {GC_ROOT: "yes"}  # kept from a collection another test's delete starts
        wire.unary(
            SN + "Prepare",
            t.snapshots.PrepareSnapshotRequest(key="ev-a", labels=rooted, **sn),
            t.snapshots.PrepareSnapshotResponse,
        )
        wire.unary(
            SN + "Commit",
            t.snapshots.CommitSnapshotRequest(name="ev-c", key="ev-a", labels=rooted, **sn),
            t.Empty,
        )
        wire.unary(
            SN + "View",
            t.snapshots.ViewSnapshotRequest(key="ev-v", parent="ev-c", labels=rooted, **sn),
            t.snapshots.ViewSnapshotResponse,
        )
        wire.unary(SN + "Remove", t.snapshots.RemoveSnapshotRequest(key="ev-v", **sn), t.Empty)
        wire.unary(SN + "Remove", t.snapshots.RemoveSnapshotRequest(key="ev-c", **sn), t.Empty)
        container = t.containers.Container(
            id="ev-upd",
            runtime=t.containers.Container.Runtime(name="io.containerd.runc.v2"),
            spec=capi.json_any(
                capi.SPEC_TYPE, default_spec("ev-upd", wire.namespace, ["true"], root="")
            ),
            image="example.com/events:1",
            snapshotter="overlayfs",
        )
        options = t.Any(
            type_url=capi.RUNC_OPTIONS_TYPE,
            value=t.runc.Options(binary_name="crun").SerializeToString(),
        )
        container.runtime.options.CopyFrom(options)
        wire.unary(
            C + "Create",
            t.containers.CreateContainerRequest(container=container),
            t.containers.CreateContainerResponse,
        )
        container.labels["tier"] = "web"
        container.snapshot_key = "ev-key"
        update = t.containers.UpdateContainerRequest(container=container)
        update.update_mask.paths.extend(["labels", "snapshotkey"])
        wire.unary(C + "Update", update, t.containers.UpdateContainerResponse)
        wire.unary(C + "Delete", t.containers.DeleteContainerRequest(id="ev-upd"), t.Empty)
        namespaces = "/containerd.services.namespaces.v1.Namespaces/"
        wire.unary(
            namespaces + "Create",
            t.namespaces.CreateNamespaceRequest(namespace=t.namespaces.Namespace(name=marker)),
            t.namespaces.CreateNamespaceResponse,
        )
        seen: list[tuple[int, Any]] = []

        def until_marker() -> bool:
            with contextlib.suppress(queue.Empty):
                while True:
                    seen.append(received.get(timeout=0.1))
            return sum(1 for _, e in seen if e.topic == "/namespaces/create") == 2

        wait_until(until_marker, timeout=15, what="the namespace marker on both streams")
        wire.unary(namespaces + "Delete", t.namespaces.DeleteNamespaceRequest(name=marker), t.Empty)
    finally:
        for stream in streams:
            stream.cancel()
        for reader in readers:
            reader.join(10)

    def decoded(envelope: Any) -> dict[str, Any]:
        message = t.event_types[envelope.event.type_url].FromString(envelope.event.value)
        return {f.name: v for f, v in message.ListFields()}

    mine = [(e.topic, e.event.type_url, decoded(e)) for i, e in seen if i == 0]
    assert mine == [
        (
            "/images/create",
            "containerd.services.images.v1.ImageCreate",
            {"name": image.name, "labels": {"role": "first"}},
        ),
        (
            "/images/update",
            "containerd.services.images.v1.ImageUpdate",
            {"name": image.name, "labels": {"role": "second"}},
        ),
        ("/images/delete", "containerd.services.images.v1.ImageDelete", {"name": image.name}),
        ("/content/delete", "containerd.events.ContentDelete", {"digest": loose}),
        ("/snapshot/prepare", "containerd.events.SnapshotPrepare", {"key": "ev-a"}),
        ("/snapshot/commit", "containerd.events.SnapshotCommit", {"key": "ev-a", "name": "ev-c"}),
        ("/snapshot/remove", "containerd.events.SnapshotRemove", {"key": "ev-v"}),
        ("/snapshot/remove", "containerd.events.SnapshotRemove", {"key": "ev-c"}),
        (
            "/containers/create",
            "containerd.events.ContainerCreate",
            {
                "id": "ev-upd",
                "image": "example.com/events:1",
                "runtime": t.event_types["containerd.events.ContainerCreate"].Runtime(
                    name="io.containerd.runc.v2", options=options
                ),
            },
        ),
        (
            "/containers/update",
            "containerd.events.ContainerUpdate",
            {
                "id": "ev-upd",
                "image": "example.com/events:1",
                "labels": {"tier": "web"},
                "snapshot_key": "ev-key",
            },
        ),
        ("/containers/delete", "containerd.events.ContainerDelete", {"id": "ev-upd"}),
        ("/namespaces/create", "containerd.events.NamespaceCreate", {"name": marker}),
    ]
    # the other stream: only its marker (no event has a string pid or exit_status)
    assert [(e.topic, e.namespace) for i, e in seen if i == 1] == [
        ("/namespaces/create", wire.namespace)
    ]


def test_lease_resources_name_only_what_exists_and_its_delete_takes_its_ingests(
    wire: Wire,
) -> None:
    """As containerd's metadata store: a lease lists an unfinished ingest as `ingests`,
    a committed blob as `content` (its ingest gone from the lease), a committed snapshot
    under its name (its active key gone), nothing for a removed one; deleting the lease
    (synchronously) removes the ingest and the snapshot it alone held."""
    t = wire.t
    lease = wire.unary(
        LS + "Create", t.leases.CreateRequest(id="res-lease"), t.leases.CreateResponse
    ).lease.id
    req = t.content.WriteContentRequest
    _write(
        wire,
        [
            req(action=STAT, ref="res-partial"),
            req(action=WRITE, ref="res-partial", total=100, data=b"x" * 10),
        ],
        lease,
    )
    blob = _put(wire, b"committed under the lease", "res-done", lease=lease)
    sn = {"snapshotter": "overlayfs"}
    meta = _meta(wire, lease)

    def call(path: str, request: Any, response_cls: Any) -> Any:
        fn = wire.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        return fn(request, metadata=meta, timeout=60)

    call(
        SN + "Prepare",
        t.snapshots.PrepareSnapshotRequest(key="res-a", **sn),
        t.snapshots.PrepareSnapshotResponse,
    )
    call(SN + "Commit", t.snapshots.CommitSnapshotRequest(name="res-c", key="res-a", **sn), t.Empty)
    call(
        SN + "Prepare",
        t.snapshots.PrepareSnapshotRequest(key="res-gone", **sn),
        t.snapshots.PrepareSnapshotResponse,
    )
    call(SN + "Remove", t.snapshots.RemoveSnapshotRequest(key="res-gone", **sn), t.Empty)
    listed = wire.unary(
        LS + "ListResources",
        t.leases.ListResourcesRequest(id=lease),
        t.leases.ListResourcesResponse,
    )
    assert sorted((r.type, r.id) for r in listed.resources) == [
        ("content", blob),
        ("ingests", "res-partial"),
        ("snapshots/overlayfs", "res-c"),
    ]
    status = t.content.StatusRequest(ref="res-partial")
    assert wire.unary(CS + "Status", status, t.content.StatusResponse).status.offset == 10
    wire.unary(LS + "Delete", t.leases.DeleteRequest(id=lease, sync=True), t.Empty)
    assert wire.code(CS + "Status", status, t.content.StatusResponse) == grpc.StatusCode.NOT_FOUND
    stat = t.snapshots.StatSnapshotRequest(key="res-c", **sn)  # the lease alone held it
    assert (
        wire.code(SN + "Stat", stat, t.snapshots.StatSnapshotResponse) == grpc.StatusCode.NOT_FOUND
    )


def test_an_image_may_name_content_that_is_not_stored(wire: Wire) -> None:
    """containerd records an image whose target is not (yet) in the content store, and
    updates one to such a target: a client may write the content after the record."""
    t = wire.t
    images = "/containerd.services.images.v1.Images/"
    absent = _digest(b"never written " + wire.namespace.encode())
    image = t.images.Image(
        name="example.com/absent:1",
        target=t.descriptor.Descriptor(
            media_type="application/vnd.oci.image.manifest.v1+json", digest=absent, size=10
        ),
    )
    wire.unary(
        images + "Create", t.images.CreateImageRequest(image=image), t.images.CreateImageResponse
    )
    image.target.digest = _digest(b"another absent one " + wire.namespace.encode())
    update = t.images.UpdateImageRequest(image=image)
    update.update_mask.paths.append("target")
    wire.unary(images + "Update", update, t.images.UpdateImageResponse)
    got = wire.unary(
        images + "Get", t.images.GetImageRequest(name=image.name), t.images.GetImageResponse
    )
    assert got.image.target.digest == image.target.digest
    wire.unary(images + "Delete", t.images.DeleteImageRequest(name=image.name), t.Empty)


def test_a_snapshot_makes_its_namespace(wire: Wire) -> None:
    """As on containerd: a snapshot prepared in a namespace nobody created makes it (it is
    listed), and the namespace cannot be deleted while the snapshot is there."""
    t = wire.t
    fresh = "snapns" + wire.namespace[2:]
    namespaces = "/containerd.services.namespaces.v1.Namespaces/"
    rooted = {GC_ROOT: "yes"}  # kept from the collector that other tests' deletes start
    prepare = t.snapshots.PrepareSnapshotRequest(key="k", snapshotter="overlayfs", labels=rooted)
    wire.unary(SN + "Prepare", prepare, t.snapshots.PrepareSnapshotResponse, namespace=fresh)
    listed = wire.unary(
        namespaces + "List",
        t.namespaces.ListNamespacesRequest(),
        t.namespaces.ListNamespacesResponse,
    )
    assert fresh in [n.name for n in listed.namespaces]
    delete = t.namespaces.DeleteNamespaceRequest(name=fresh)
    assert wire.code(namespaces + "Delete", delete, t.Empty) == grpc.StatusCode.FAILED_PRECONDITION
    # listed in byte order of their keys, as containerd lists them (not in creation order)
    for key in ("zz", "aa", "m"):
        prepare = t.snapshots.PrepareSnapshotRequest(
            key=key, snapshotter="overlayfs", labels=rooted
        )
        wire.unary(SN + "Prepare", prepare, t.snapshots.PrepareSnapshotResponse, namespace=fresh)
    listing = wire.channel.unary_stream(
        SN + "List",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=t.snapshots.ListSnapshotsResponse.FromString,
    )
    listed_keys = [
        info.name
        for reply in listing(
            t.snapshots.ListSnapshotsRequest(snapshotter="overlayfs"),
            metadata=wire.meta(fresh),
            timeout=60,
        )
        for info in reply.info
    ]
    assert listed_keys == ["aa", "k", "m", "zz"]
    for key in ("k", "zz", "aa", "m"):
        remove = t.snapshots.RemoveSnapshotRequest(key=key, snapshotter="overlayfs")
        wire.unary(SN + "Remove", remove, t.Empty, namespace=fresh)
    wire.unary(namespaces + "Delete", delete, t.Empty)


def test_a_flat_lease_keeps_its_content_but_not_what_that_references(wire: Wire) -> None:
    """containerd's `containerd.io/gc.flat` lease (BuildKit's temporary leases): the blob
    it holds stays, a blob only that one's gc.ref label names is collected; the same
    reference from a plain lease keeps it."""
    t = wire.t

    def lease(lease_id: str, labels: dict[str, str] | None = None) -> str:
        request = t.leases.CreateRequest(id=lease_id)
        request.labels.update(labels or {})
        return wire.unary(LS + "Create", request, t.leases.CreateResponse).lease.id

    def stored(digest: str) -> bool:
        info = t.content.InfoRequest(digest=digest)
        try:
            wire.unary(CS + "Info", info, t.content.InfoResponse)
            return True
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            return False

    flat, plain, writing = lease("flat", {"containerd.io/gc.flat": "x"}), lease("plain"), lease("w")
    writing2 = lease("w2")
    child = _put(wire, b"named by the flat-leased blob", "flat-child", lease=writing)
    other = _put(wire, b"named by the plain-leased blob", "plain-child", lease=writing)
    ref = "containerd.io/gc.ref.content.0"
    parent = _put(wire, b"flat parent", "flat-parent", {ref: child}, lease=flat)
    kept = _put(wire, b"plain parent", "plain-parent", {ref: other}, lease=plain)
    wire.unary(LS + "Delete", t.leases.DeleteRequest(id=writing, sync=True), t.Empty)
    assert (stored(parent), stored(child)) == (True, False)
    assert (stored(kept), stored(other)) == (True, True)
    # content a plain lease holds as well as a flat one is a full root: followed
    shared_child = _put(wire, b"named by a blob both leases hold", "both-child", lease=writing2)
    shared = _put(wire, b"held flat and plain", "both-parent", {ref: shared_child}, lease=flat)
    add = t.leases.AddResourceRequest(
        id=plain, resource=t.leases.Resource(id=shared, type="content")
    )
    wire.unary(LS + "AddResource", add, t.Empty)
    wire.unary(LS + "Delete", t.leases.DeleteRequest(id=writing2, sync=True), t.Empty)
    assert (stored(shared), stored(shared_child)) == (True, True)
    for lease_id in (flat, plain):
        wire.unary(LS + "Delete", t.leases.DeleteRequest(id=lease_id, sync=True), t.Empty)
    assert not any(stored(d) for d in (parent, kept, other, shared, shared_child))


# -- berth-grpc's kept Content answers (ContentCache) -----------------------------------------


def _read(w: Wire, digest: str, offset: int = 0, size: int = 0) -> bytes:
    read = w.channel.unary_stream(
        CS + "Read",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=w.t.content.ReadContentResponse.FromString,
    )
    request = w.t.content.ReadContentRequest(digest=digest, offset=offset, size=size)
    return b"".join(r.data for r in read(request, metadata=w.meta(), timeout=60))


def _labels(w: Wire, digest: str) -> dict[str, str]:
    info = w.unary(CS + "Info", w.t.content.InfoRequest(digest=digest), w.t.content.InfoResponse)
    return dict(info.info.labels)


def test_kept_content_answers_follow_every_change_whoever_makes_it(wire: Wire) -> None:
    """berth-grpc gives Info and small Reads again without asking berthd while no content
    record changed: a label change or a delete, through gRPC, through berth's own API or
    by the collector, is seen by the very next call."""
    lease = wire.unary(
        LS + "Create", wire.t.leases.CreateRequest(id="kept-answers"), wire.t.leases.CreateResponse
    ).lease.id
    data = b"kept answers " * 100
    digest = _put(wire, data, "kept-1", labels={"a": "1"}, lease=lease)
    for _ in range(3):  # asked, then kept
        assert _labels(wire, digest) == {"a": "1"}
        assert _read(wire, digest) == data
    # reads of any part, from the kept bytes as from berthd's
    assert _read(wire, digest, 13, 7) == data[13:20]
    assert _read(wire, digest, len(data)) == b""
    with pytest.raises(grpc.RpcError) as past:
        _read(wire, digest, len(data) + 1)
    assert past.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # a label change through gRPC, then through berth's own API
    update = wire.t.content.UpdateRequest(
        info=wire.t.content.Info(digest=digest, labels={"b": "2"})
    )
    update.update_mask.paths.append("labels")
    wire.unary(CS + "Update", update, wire.t.content.UpdateResponse)
    assert _labels(wire, digest) == {"b": "2"}
    wire.daemon.call("content.update", {"digest": digest, "labels": {"c": "3"}})
    assert _labels(wire, digest) == {"c": "3"}
    # a delete through berth's own API: gone for the next gRPC call
    wire.daemon.call("content.delete", {"digest": digest})
    assert not _exists(wire, digest)
    with pytest.raises(grpc.RpcError) as gone:
        _read(wire, digest)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # and by the collector: a blob only the lease held goes with the lease
    other = b"collected " * 50
    digest = _put(wire, other, "kept-2", lease=lease)
    assert _read(wire, digest) == other and _read(wire, digest) == other
    wire.unary(LS + "Delete", wire.t.leases.DeleteRequest(id=lease, sync=True), wire.t.Empty)
    assert not _exists(wire, digest)
    with pytest.raises(grpc.RpcError) as collected:
        _read(wire, digest)
    assert collected.value.code() == grpc.StatusCode.NOT_FOUND
