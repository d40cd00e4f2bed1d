"""berthd's API contract: every method, its parameters and its reply, in one place.

A method is `service.verb` (containerd's services). Its parameters are a typed record
(msgspec.Struct), converted from the request's params map once, at the edge (rpc.py),
before any handler runs: a handler only ever sees values of the declared types, and a bad
request is `invalid argument` naming the field. Unknown fields are ignored (a newer client
may send more). Replies are declared too: test daemons (BERTH_CHECK_REPLIES=1) check every
reply against its declaration, so the contract cannot drift from the code.

msgspec, measured: it validates and converts a request in microseconds, and its import
(~11 ms, typing_extensions and inspect come with it) is paid by berthd alone: the CLI
and the shim never import this module (an import-linter contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# -- field types -------------------------------------------------------------------------

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$")]
"""An ID or namespace: containerd's rule (it becomes part of paths)."""
OptionalName = Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,75})?$")]
"""A name where "" (and None) means none: an exec ID ("" is the task's init)."""
LeaseName = Annotated[str, Meta(min_length=1, max_length=4096, pattern="^[^\x00]*$")]
"""A lease's ID: any text (containerd keeps leases by their ID alone, never in a path;
`ctr images mount` names its lease after the mount point), not empty, no NUL."""
Digest = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
Ref = Annotated[str, Meta(min_length=1, max_length=512)]  # an ingest ref
Key = Annotated[str, Meta(min_length=1, max_length=1024)]  # a snapshot key
ImageName = Annotated[str, Meta(min_length=1, max_length=4096)]
Labels = dict[str, str]
Doc = dict[str, Any]  # a JSON-like document (an OCI spec, a record as stored)
Count = Annotated[int, Meta(ge=0)]


class Params(Struct, kw_only=True, omit_defaults=True):
    """Base of every method's parameters."""


class Page(Struct, omit_defaults=True, kw_only=True):
    """Ask for a list in pages (see paging.py): `{}` first, then `{after: next}`."""

    after: str | None = None


class Paged(Params, kw_only=True):
    page: Page | None = None


class Empty(Params, kw_only=True):
    pass


# -- namespaces --------------------------------------------------------------------------


class NamespaceName(Params, kw_only=True):
    name: Name


class NamespaceLabels(Params, kw_only=True):
    name: Name
    labels: Labels | None = None
    # the labels the caller set, for the update's event (containerd's NamespaceUpdate
    # carries the request's labels); all of them when not given
    changed: Labels | None = None


# -- containers --------------------------------------------------------------------------


class RuntimeRef(Struct, omit_defaults=True, kw_only=True):
    name: str | None = None
    options: Doc = {}


class Extension(Struct, kw_only=True):
    """An opaque typed value a client keeps on a container (containerd's Any): its bytes
    base64-encoded, as Go's JSON shows them."""

    type_url: str
    value: str = ""


class ContainerFields(Params, kw_only=True):
    id: Name | None = None
    spec: Doc | None = None
    runtime: str | RuntimeRef | None = None
    labels: Labels | None = None
    image: str | None = None
    snapshotter: str | None = None
    snapshot_key: str | None = None
    extensions: dict[str, Extension] | None = None


class ContainersCreate(ContainerFields, kw_only=True):
    """The container's fields, or the same under `container` (what berth-grpc sends)."""

    container: ContainerFields | None = None


class ContainerId(Params, kw_only=True):
    id: Name


class ContainersDelete(Params, kw_only=True):
    id: Name
    with_task: bool = False  # its task too, which must have stopped
    background: bool = False  # answer once the removal is durable (removals.py)


class ContainersUpdate(Params, kw_only=True):
    id: Name
    labels: Labels | None = None
    spec: Doc | None = None
    image: str | None = None
    extensions: dict[str, Extension] | None = None  # replaces them all
    snapshot_key: str | None = None  # containerd's `snapshotkey` path; needs a snapshotter


# -- network attachments ------------------------------------------------------------------


class PortMapping(Struct, kw_only=True):
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str | None = None


class AttachmentsCreate(Params, kw_only=True):
    container_id: Name
    networks: Annotated[list[Name], Meta(max_length=8)] = []  # [] = ["bridge"]
    ports: Annotated[list[PortMapping], Meta(max_length=256)] = []
    ips: Annotated[list[str], Meta(max_length=4)] = []  # CIDRs on the first network
    labels: Labels | None = None


class AttachmentRef(Params, kw_only=True):
    container_id: Name


class NetworksCreate(Params, kw_only=True):
    name: Name
    subnet: str = ""  # CIDR; "" = the first free /24 of 10.78.0.0/16
    gateway: str = ""
    labels: Labels | None = None
    config: Doc | None = None  # a whole config list instead (its `name` must be `name`)


class NetworkRef(Params, kw_only=True):
    name: Name


# -- events ------------------------------------------------------------------------------


class EventsSubscribe(Params, kw_only=True):
    filters: list[str] = []
    since: int | None = None  # ns: replay what was published after it first
    after_seq: int | None = None  # replay what is numbered after it (survives a handover)
    epoch: str | None = None  # the numbering after_seq is of (events.py)
    with_published: bool = False  # also the events clients publish (events.py)


MAX_PUBLISHED_VALUE = 16 * 1024  # bytes of a client's event (containerd's are < 1 KiB)


class EventsPublish(Params, kw_only=True):
    """A client's own event (containerd's Publish; Forward also names the envelope's
    namespace and time). The payload is opaque: its type and its bytes in base64."""

    topic: Annotated[str, Meta(min_length=1, max_length=1024)]
    type_url: Annotated[str, Meta(max_length=1024)]
    value: Annotated[str, Meta(max_length=(MAX_PUBLISHED_VALUE + 2) // 3 * 4)] = ""
    namespace: str | None = None  # Forward: the envelope's own (else the call's)
    timestamp: Annotated[int, Meta(gt=0)] | None = None  # Forward: the envelope's own (ns)


# -- tasks -------------------------------------------------------------------------------


class LogOptions(Struct, omit_defaults=True, kw_only=True):
    max_size: int | None = None
    max_files: int | None = None


class TaskIO(Params, kw_only=True):
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    terminal: bool = False
    width: Count | None = None
    height: Count | None = None
    log: bool | LogOptions | None = None


class TasksCreate(TaskIO, kw_only=True):
    container_id: Name
    rootfs: list[Doc] | None = None  # mounts, when the container has no snapshot


class TaskRef(Params, kw_only=True):
    container_id: Name
    exec_id: OptionalName | None = None


class TasksKill(TaskRef, kw_only=True):
    signal: int | str = 15
    all: bool = False


class TasksDelete(Params, kw_only=True):
    container_id: Name
    force: bool = False


class TasksExec(TaskIO, kw_only=True):
    container_id: Name
    exec_id: Name
    spec: Doc


class TasksResize(TaskRef, kw_only=True):
    width: Count = 0
    height: Count = 0


class TasksCloseIO(TaskRef, kw_only=True):
    stdin: bool = True


class TasksUpdate(Params, kw_only=True):
    container_id: Name
    resources: Doc


class TaskProcess(Params, kw_only=True):
    container_id: Name
    exec_id: Name


class ContainerTask(Params, kw_only=True):
    container_id: Name


class TasksShimLog(ContainerTask, kw_only=True):
    tail: Count = 0  # the last lines; 0: all the shim keeps (its log is bounded)


# -- content -----------------------------------------------------------------------------


class ContentDigest(Params, kw_only=True):
    digest: Digest


class ContentRead(ContentDigest, kw_only=True):
    offset: Count = 0
    size: int = 0  # <= 0: as much as fits one reply


class ContentUpdate(ContentDigest, kw_only=True):
    labels: Labels | None = None


class IngestRef(Params, kw_only=True):
    ref: Ref


class WriteOpen(IngestRef, kw_only=True):
    total: Count = 0
    expected: str | None = None


class WriteChunk(IngestRef, kw_only=True):
    data: bytes
    offset: int | None = None


class WriteCommit(IngestRef, kw_only=True):
    size: Count = 0
    expected: str | None = None
    labels: Labels | None = None


# -- images ------------------------------------------------------------------------------


class Descriptor(Struct, omit_defaults=True, kw_only=True):
    media_type: str
    digest: Digest
    size: Count
    annotations: Labels = {}
    platform: Doc | None = None


class ImagePut(Params, kw_only=True):
    name: ImageName
    target: Descriptor
    labels: Labels | None = None


class ImageRef(Params, kw_only=True):
    name: ImageName


class ImagesTag(Params, kw_only=True):
    source: ImageName
    target: ImageName
    force: bool = False


class ImagesDelete(ImageRef, kw_only=True):
    sync: bool = False


class ImagesList(Paged, kw_only=True):
    usage: bool = False  # add content_size and platforms to each image (images ls)


class ImagesImport(Params, kw_only=True):
    path: str
    name: str | None = None
    unpack: bool = True
    snapshotter: str | None = None
    progress: bool = False  # stream progress items before the reply


class ImagesExport(Params, kw_only=True):
    path: str
    names: Annotated[list[ImageName], Meta(min_length=1)]
    platform: str | None = None
    progress: bool = False  # stream progress items before the reply


class Registry(Params, kw_only=True):
    ref: str
    platform: str | None = None
    username: str | None = None
    password: str | None = None
    plain_http: bool = False
    tls_ca: str | None = None
    tls_skip_verify: bool = False


class ImagesPull(Registry, kw_only=True):
    unpack: bool = True
    snapshotter: str | None = None


class ImagesPush(Registry, kw_only=True):
    local: str | None = None


class ImagesUnpack(ImageRef, kw_only=True):
    snapshotter: str | None = None
    platform: str | None = None


class ImagesSpec(Params, kw_only=True):
    image: ImageName
    id: Name
    snapshotter: str | None = None
    args: list[str] | None = None
    env: list[str] | None = None
    cwd: str | None = None
    user: str | None = None
    terminal: bool = False


# -- snapshots ---------------------------------------------------------------------------


class Snapshotter(Params, kw_only=True):
    snapshotter: str | None = None


class SnapshotKey(Snapshotter, kw_only=True):
    key: Key


class SnapshotPrepare(SnapshotKey, kw_only=True):
    parent: str | None = None
    labels: Labels | None = None


class SnapshotCommit(SnapshotKey, kw_only=True):
    name: Key
    labels: Labels | None = None


class SnapshotUpdate(SnapshotKey, kw_only=True):
    labels: Labels | None = None


class SnapshotList(Snapshotter, kw_only=True):
    page: Page | None = None


# -- diff --------------------------------------------------------------------------------


class DiffApply(Params, kw_only=True):
    layer: Descriptor
    mounts: list[Doc]
    expected_diff_id: str | None = None


class DiffDiff(Params, kw_only=True):
    upper: list[Doc]
    lower: list[Doc] = []
    media_type: str | None = None
    labels: Labels | None = None


# -- leases ------------------------------------------------------------------------------


MAX_LEASE_SECONDS = 100 * 365 * 86400  # a lease's expiry ends in int64 nanoseconds (2262)


class LeasesCreate(Params, kw_only=True):
    id: LeaseName | None = None
    expire_seconds: Annotated[float, Meta(ge=0, le=MAX_LEASE_SECONDS)] = 0
    labels: Labels | None = None


class LeaseId(Params, kw_only=True):
    id: LeaseName


class LeasesDelete(LeaseId, kw_only=True):
    sync: bool = False


class LeaseResource(LeaseId, kw_only=True):
    kind: str
    key: str


# -- replies -----------------------------------------------------------------------------


class Reply(Struct, kw_only=True):
    """Base of declared replies; unknown extra fields are allowed (forward compatible)."""


class VersionReply(Reply, kw_only=True):
    version: str
    revision: str
    protocol: int


class ServerReply(Reply, kw_only=True):
    uuid: str
    pid: int
    root: str
    state: str
    started_at: int
    recovered: bool


class PidReply(Reply, kw_only=True):
    pid: int


class ExitReply(Reply, kw_only=True):
    pid: int
    exit_status: int
    exited_at: int


class WriteOpenReply(Reply, kw_only=True):
    exists: bool
    offset: int
    digest: str = ""  # of the bytes the ingest holds (containerd's Write reports it)
    started_at: int = 0  # the ingest's own times (ns), kept across resumes
    updated_at: int = 0


class OffsetReply(Reply, kw_only=True):
    offset: int
    digest: str = ""  # of the bytes written so far
    updated_at: int = 0  # the ingest's last write (ns)


class DigestReply(Reply, kw_only=True):
    digest: Digest


class ReadReply(Reply, kw_only=True):
    data: bytes
    offset: int


class DataReply(Reply, kw_only=True):
    data: bytes


class MountsReply(Reply, kw_only=True):
    mounts: list[Doc]


class ChainReply(Reply, kw_only=True):
    chain_id: str


class SpecReply(Reply, kw_only=True):
    spec: Doc
    chain_id: str


class GCReply(Reply, kw_only=True):
    removed: dict[str, int]
    kept: dict[str, int]
    freed_bytes: dict[str, int] = {}  # disk space given back, by kind
    seconds: float
    errors: list[str]


Record = Doc  # a stored record as it is on the wire (container, image, lease, ...)
Listing = dict[str, Any]  # {<items>: [...], next?: str | None}


# -- the methods ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    params: type[Params]
    reply: Any  # a Reply type, Record, Listing, or None for a stream
    stream: bool = False  # answers with items, then the end of the stream
    long: bool = False  # lasts as long as a container or a transfer: no client deadline
    after_recovery: bool = False  # waits until the task table is complete
    # Ended at once by a handover (its client repeats it on the successor: a wait, a
    # stream resumed with after_seq, a transfer resumed from its ingests); every other
    # call in flight is finished first.
    resumable: bool = False


_STREAM = None

METHODS: dict[str, Method] = {
    "ping": Method(Empty, Record),
    "version": Method(Empty, VersionReply),
    "introspection.server": Method(Empty, ServerReply),
    "introspection.plugins": Method(Empty, Record),
    "namespaces.list": Method(Paged, Listing),
    "namespaces.get": Method(NamespaceName, Record),
    "namespaces.create": Method(NamespaceLabels, Record),
    "namespaces.update": Method(NamespaceLabels, Record),
    "namespaces.delete": Method(NamespaceName, Record, after_recovery=True),
    "containers.create": Method(ContainersCreate, Record, long=True),
    "containers.get": Method(ContainerId, Record),
    "containers.list": Method(Paged, Listing),
    "containers.update": Method(ContainersUpdate, Record),
    "containers.delete": Method(ContainersDelete, Record, long=True, after_recovery=True),
    "events.subscribe": Method(EventsSubscribe, _STREAM, stream=True, long=True, resumable=True),
    "events.publish": Method(EventsPublish, Record),
    "tasks.create": Method(TasksCreate, PidReply, long=True, after_recovery=True),
    "tasks.start": Method(TaskRef, PidReply, after_recovery=True),
    "tasks.kill": Method(TasksKill, Record, after_recovery=True),
    "tasks.delete": Method(TasksDelete, ExitReply, long=True, after_recovery=True),
    "tasks.delete_process": Method(TaskProcess, ExitReply, after_recovery=True),
    "tasks.wait": Method(TaskRef, ExitReply, long=True, after_recovery=True, resumable=True),
    "tasks.exec": Method(TasksExec, Record, after_recovery=True),
    "tasks.pids": Method(ContainerTask, Record, after_recovery=True),
    "tasks.pause": Method(ContainerTask, Record, after_recovery=True),
    "tasks.resume": Method(ContainerTask, Record, after_recovery=True),
    "tasks.resize": Method(TasksResize, Record, after_recovery=True),
    "tasks.close_io": Method(TasksCloseIO, Record, after_recovery=True),
    "tasks.metrics": Method(ContainerTask, Record, after_recovery=True),
    "tasks.update": Method(TasksUpdate, Record, after_recovery=True),
    "tasks.get": Method(TaskRef, Record, after_recovery=True),
    "tasks.list": Method(Paged, Listing, after_recovery=True),
    "tasks.shim_log": Method(TasksShimLog, DataReply, after_recovery=True),
    "content.info": Method(ContentDigest, Record),
    "content.list": Method(Paged, Listing),
    "content.read": Method(ContentRead, ReadReply),
    "content.update": Method(ContentUpdate, Record),
    "content.delete": Method(ContentDigest, Record),
    "content.write.open": Method(WriteOpen, WriteOpenReply),
    "content.write.chunk": Method(WriteChunk, OffsetReply),
    "content.write.commit": Method(WriteCommit, DigestReply),
    "content.write.abort": Method(IngestRef, Record),
    "content.write.close": Method(IngestRef, Record),
    "content.status": Method(IngestRef, Record),
    "content.ingests": Method(Empty, Listing),
    "images.create": Method(ImagePut, Record),
    "images.update": Method(ImagePut, Record),
    "images.get": Method(ImageRef, Record),
    "images.list": Method(ImagesList, Listing),
    "images.tag": Method(ImagesTag, Record),
    "images.delete": Method(ImagesDelete, Record),
    "images.import": Method(ImagesImport, Listing, long=True),
    "images.export": Method(ImagesExport, Record, long=True),
    "images.pull": Method(ImagesPull, _STREAM, stream=True, long=True, resumable=True),
    "images.push": Method(ImagesPush, _STREAM, stream=True, long=True, resumable=True),
    "images.unpack": Method(ImagesUnpack, ChainReply, long=True),
    "images.spec": Method(ImagesSpec, SpecReply),
    "snapshots.prepare": Method(SnapshotPrepare, MountsReply, long=True),
    "snapshots.view": Method(SnapshotPrepare, MountsReply, long=True),
    "snapshots.mounts": Method(SnapshotKey, MountsReply),
    "snapshots.commit": Method(SnapshotCommit, Record, long=True),
    "snapshots.remove": Method(SnapshotKey, Record, long=True),
    "snapshots.stat": Method(SnapshotKey, Record),
    "snapshots.update": Method(SnapshotUpdate, Record),
    "snapshots.usage": Method(SnapshotKey, Record, long=True),
    "snapshots.list": Method(SnapshotList, Listing),
    "diff.apply": Method(DiffApply, Record, long=True),
    "diff.diff": Method(DiffDiff, Record, long=True),
    "leases.create": Method(LeasesCreate, Record),
    "leases.list": Method(Paged, Listing),
    "leases.delete": Method(LeasesDelete, Record),
    "leases.add_resource": Method(LeaseResource, Record),
    "leases.delete_resource": Method(LeaseResource, Record),
    "leases.resources": Method(LeaseId, Listing),
    "gc": Method(Empty, GCReply, long=True),
    "networks.list": Method(Empty, Listing),
    "networks.create": Method(NetworksCreate, Record, long=True),
    "networks.delete": Method(NetworkRef, Record, long=True),
    "attachments.create": Method(AttachmentsCreate, Record, long=True),
    "attachments.get": Method(AttachmentRef, Record),
    "attachments.list": Method(Paged, Listing),
    "attachments.delete": Method(AttachmentRef, Record, long=True),
}


def convert_params(method: Method, params: dict[str, Any]) -> Params:
    """The request's params as the method's typed record; ValidationError names the field."""
    return msgspec.convert(params, method.params, strict=True)


def check_reply(name: str, method: Method, reply: Any) -> None:
    """Raise ValidationError if `reply` does not match the declared reply (test daemons)."""
    if method.reply is not None and reply is not None:
        msgspec.convert(reply, method.reply, strict=True)


ValidationError = msgspec.ValidationError
