"""berth's storage service: namespaced content, images, snapshots, diffs, leases, GC.

The pieces (content.py, snapshots.py, archive.py, images.py) know nothing of namespaces or
leases; this layer scopes them (content records and snapshot keys per namespace), protects
work in progress with leases, and runs the garbage collector. Trio-free and thread-safe:
berthd calls the heavy parts (import, unpack, diff, GC) from worker threads.

Leases: an operation that builds something (an ingest, an unpack, a prepared snapshot)
holds a lease, and every object it creates is recorded as a lease resource; GC never
removes what an unexpired lease holds. Callers may pass their own lease (the API's
`lease` meta field), or the operation takes a temporary one.

GC (mark and sweep, like containerd's; gc.py): roots are images, containers, unexpired
leases and `containerd.io/gc.root` content and snapshots; from them only
`containerd.io/gc.ref.*` labels lead on (and an image config to its layers' snapshots). A
marked snapshot keeps its parents. Everything else is removed: content records, then blobs
no namespace records, then snapshots, children before parents.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

from berth.daemon.metadata import TEMPORARY_LEASE_LABEL, Store, out_of_space
from berth.daemon.storage import archive, images
from berth.daemon.storage.content import ContentStore, Writer, validate_digest
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.reserve import SpaceReserve
from berth.daemon.storage.snapshots import SNAPSHOTTERS, Snapshotter, validate_key
from berth.shim.mount import Mount, release_leftover_mounts, temporary_mount
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    from berth.daemon.storage.gc import GCResult

log = logging.getLogger("berth.storage")
T = TypeVar("T")

GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
GC_ROOT = "containerd.io/gc.root"  # content or a snapshot so labelled is a GC root
LEASED_SNAPSHOT = "snapshot/"  # a lease resource kind: snapshot/<snapshotter>
# the lease resource kinds of an ingest: berth's, and containerd's name, which berth-grpc
# stored as it was before it translated it
LEASED_INGEST = ("ingest", "ingests")
TEMP_LEASE_SECONDS = 3600
DEFAULT_INGEST_EXPIRY = 3600.0  # seconds an ingest no live lease holds may sit unwritten
MAX_ARCHIVE_DOCUMENT = images.MAX_DOCUMENT


def now_ns() -> int:
    return time.time_ns()


_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def decompressor(media_type: str, raw: IO[bytes]) -> IO[bytes]:
    """The uncompressed stream of a layer blob of `media_type`."""
    kind = images.LAYER_TYPES.get(media_type)
    if kind is None:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    kind = _sniffed(raw, kind)
    if kind == "gzip":
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        return _Decompressed(gz, kind, (EOFError, gzip.BadGzipFile, zlib.error))  # type: ignore[return-value]
    if kind == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw)
        return _Decompressed(reader, kind, (zstandard.ZstdError,))  # type: ignore[return-value]
    return raw


def _sniffed(raw: IO[bytes], kind: str) -> str:
    """The compression a seekable blob has, by its magic, as containerd and docker detect
    it whatever the media type says: skopeo 1.9 writes plain tars as `tar+gzip` (from a
    docker-archive with --dest-oci-accept-uncompressed-layers), which they take. A blob
    that is neither compressed nor a tar fails as its media type says."""
    if not raw.seekable():
        return kind
    head = raw.read(512)
    raw.seek(0)
    for other, magic in _MAGIC.items():
        if head.startswith(magic):
            return other
    return "" if head[257:262] == b"ustar" else kind


class _Decompressed(io.RawIOBase):
    """A decompressing reader whose format errors (a blob that is not the gzip or zstd
    its media type says: truncated, bad CRC, garbage) are the image's fault, `invalid
    argument`, not an internal error from deep inside the layer apply. A failure to read
    the blob itself (EIO) stays what it is."""

    def __init__(self, stream: Any, kind: str, errors: tuple[type[Exception], ...]) -> None:
        self._stream = stream
        self._kind = kind
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._stream.read(len(buffer))
        except self._errors as exc:
            raise InvalidArgument(f"layer blob is not valid {self._kind}: {exc}") from None
        n = len(data)
        buffer[:n] = data
        return n


class Storage:
    def __init__(
        self,
        root: str,
        state: str,
        store: Store,
        default_snapshotter: str = "overlayfs",
        ingest_expiry: float = DEFAULT_INGEST_EXPIRY,
    ) -> None:
        self.store = store
        self.ingest_expiry = ingest_expiry
        self.content = ContentStore(root)
        self.snapshotters: dict[str, Snapshotter] = {
            name: cls(root) for name, cls in SNAPSHOTTERS.items()
        }
        if default_snapshotter not in self.snapshotters:
            raise InvalidArgument(f"unknown snapshotter {default_snapshotter!r}")
        self.default_snapshotter = default_snapshotter
        self.mounts_dir = os.path.join(state, "mounts")
        os.makedirs(self.mounts_dir, mode=0o700, exist_ok=True)
        if released := release_leftover_mounts(self.mounts_dir):
            log.warning(
                "released %d mount(s) a previous daemon left in %s", released, self.mounts_dir
            )
        self.reserve = SpaceReserve(os.path.join(root, "reserve"))
        self.reserve.restore()
        self.gc_lock = threading.Lock()  # GC and everything that creates objects
        self.snap_lock = threading.RLock()
        # What the collections of this daemon did, for berthd's metrics.
        self.gc_runs = 0
        self.gc_seconds = 0.0
        self.gc_removed = dict.fromkeys(("content", "blobs", "snapshots", "leases", "ingests"), 0)
        self.gc_freed_bytes = dict.fromkeys(("blobs", "snapshots", "ingests"), 0)

    def close(self) -> None:
        for s in self.snapshotters.values():
            s.close()

    def freeing(self, fn: Callable[[], T]) -> T:
        """Run `fn`, an operation that frees space (a delete, a GC); if it fails for want
        of space, release the reserve and run it once more (see SpaceReserve)."""
        try:
            return fn()
        except Exception as exc:
            if not out_of_space(exc) or not self.reserve.release():
                raise
        return fn()

    # -- leases ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, namespace: str, lease_id: str | None) -> Iterator[str]:
        """The caller's lease, or a temporary one removed at the end."""
        if lease_id:
            self.store.get_lease(namespace, lease_id)
            yield lease_id
            return
        temp = "tmp-" + uuid.uuid4().hex[:16]
        self.store.create_lease(
            namespace,
            temp,
            {TEMPORARY_LEASE_LABEL: "true"},
            expires_at=now_ns() + TEMP_LEASE_SECONDS * 10**9,
        )
        try:
            yield temp
        finally:
            with contextlib.suppress(NotFound):
                self.store.delete_lease(namespace, temp)

    def _hold(self, namespace: str, lease_id: str | None, kind: str, key: str) -> None:
        if lease_id:
            self.store.add_lease_resource(namespace, lease_id, kind, key)

    def _let_go(self, namespace: str, lease_id: str | None, kind: str, key: str) -> None:
        """What is gone (a committed ingest, a committed or removed snapshot key) leaves
        the caller's lease, as containerd's metadata store drops it: its resources name
        only what exists."""
        if lease_id:
            self.store.delete_lease_resource(namespace, lease_id, kind, key)

    def abort_ingest(self, namespace: str, ref: str, lease_id: str | None = None) -> None:
        """Remove an ingest (Unavailable while a writer holds it); it leaves the caller's
        lease, as containerd's abort."""
        self.content.abort(f"{namespace}/{ref}")
        self._let_go(namespace, lease_id, "ingest", ref)

    def delete_lease(self, namespace: str, lease_id: str) -> int:
        """Delete a lease; the ingests it held that no other live lease holds and no writer
        is writing go with it (containerd collects them: an unleased ingest is no GC root
        there). How many were removed."""
        with self.gc_lock:  # no writer opens one of them between the check and the abort
            held = [
                k
                for kind, k in self.store.lease_resources(namespace, lease_id)
                if kind in LEASED_INGEST
            ]
            self.store.delete_lease(namespace, lease_id)
            still = {
                key
                for ns, kind, key in self.store.live_lease_resources(time.time_ns())
                if ns == namespace and kind in LEASED_INGEST
            }
            removed = 0
            for ref in held:
                if ref in still:
                    continue
                try:
                    self.content.abort(f"{namespace}/{ref}")
                    removed += 1
                except (NotFound, Unavailable):  # gone already, or being written right now
                    pass
        return removed

    # -- content --------------------------------------------------------------------------

    def content_info(self, namespace: str, digest: str) -> dict[str, Any]:
        return self.store.get_content(namespace, validate_digest(digest))

    def content_read(self, namespace: str, digest: str, offset: int = 0, size: int = -1) -> bytes:
        self.content_info(namespace, digest)
        return self.content.read(digest, offset, size)

    def open_writer(
        self,
        namespace: str,
        ref: str,
        total: int = 0,
        expected: str = "",
        lease_id: str | None = None,
        *,
        declared: bool = False,
        client: bool = False,
    ) -> Writer:
        """A writer for the ingest `ref` of `namespace`. AlreadyExists when `expected` is
        already stored: it is then recorded in this namespace (content is shared).
        `declared`: `total` is the size even if 0 (else 0 means unknown).

        A `client`'s writer (containerd's Content.Write) follows containerd's shared
        content policy instead: AlreadyExists only when this namespace records the blob
        (then held under the lease, as containerd does); a blob stored for other
        namespaces only gives a shared writer (ContentStore.writer), recorded here by its
        commit alone, so an open that is never committed records nothing."""
        self._hold(namespace, lease_id, "ingest", ref)
        if client and expected:
            with self.gc_lock:
                if self._records(namespace, validate_digest(expected)):
                    self._hold(namespace, lease_id, "content", expected)
                    raise AlreadyExists(f"content {expected}: already exists")
        try:
            return self.content.writer(
                f"{namespace}/{ref}", total, expected, declared=declared, client=client
            )
        except AlreadyExists:
            with self.gc_lock:  # a collection must not sweep it between these steps
                info = self.content.info(expected)
                self._hold(namespace, lease_id, "content", expected)
                self.store.add_content(namespace, expected, info.size)
            raise

    def _records(self, namespace: str, digest: str) -> bool:
        try:
            self.store.get_content(namespace, digest)
        except NotFound:
            return False
        return self.content.exists(digest)

    def commit(
        self,
        namespace: str,
        writer: Writer,
        size: int = 0,
        expected: str = "",
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
        *,
        exists_ok: bool = True,
    ) -> str:
        """Publish `writer`'s blob and record it in `namespace`. Without `exists_ok`, a
        blob the namespace records already is AlreadyExists (containerd's commit; the
        ingest is gone all the same and the lease holds the blob), its labels untouched."""
        # Under the GC lock: a collection that ran between the blob landing in the store
        # and its record (or its lease reference) would sweep it as unreferenced.
        with self.gc_lock:
            digest = writer.commit(size, expected)
            self._hold(namespace, lease_id, "content", digest)
            self._let_go(namespace, lease_id, "ingest", self.unscoped(namespace, writer.ref))
            if not exists_ok:
                with contextlib.suppress(NotFound):
                    self.store.get_content(namespace, digest)
                    raise AlreadyExists(f"content {digest}: already exists")
            self.store.add_content(namespace, digest, self.content.info(digest).size, labels)
            if labels:
                self.store.update_content(namespace, digest, labels)
        return digest

    @contextlib.contextmanager
    def images_replaced(
        self, namespace: str, records: list[tuple[str, dict[str, Any]]]
    ) -> Iterator[list[dict[str, Any]]]:
        """Create or move the image records (name, target) for the block that follows (an
        unpack): if it fails, each is put back as it was, or removed if it is new, unless
        another pull or import moved it since. Bad input changes nothing."""
        previous: dict[str, dict[str, Any] | None] = {}
        ours: dict[str, dict[str, Any]] = {}  # name -> the target this set
        created = []
        try:
            for name, target in records:
                if name not in previous:
                    try:
                        previous[name] = self.store.get_image(namespace, name)
                    except NotFound:
                        previous[name] = None
                created.append(
                    self.store.put_image(namespace, name, target, {}, create=True, update=True)
                )
                ours[name] = created[-1]["target"]
            yield created
        except BaseException:
            for name, old in previous.items():
                with contextlib.suppress(Exception):
                    self._restore_image(namespace, name, ours.get(name), old)
            raise

    def _restore_image(
        self,
        namespace: str,
        name: str,
        ours: dict[str, Any] | None,
        old: dict[str, Any] | None,
    ) -> None:
        try:
            current = self.store.get_image(namespace, name)
        except NotFound:
            current = None
        if ours is None or current is None or current["target"] != ours:
            return  # never set here, or moved since by another pull or import
        if old is None:
            self.store.delete_image(namespace, name)
        else:
            self.store.put_image(
                namespace, name, old["target"], old["labels"], create=True, update=True
            )

    def put_blob(
        self,
        namespace: str,
        data: bytes | IO[bytes],
        expected: str = "",
        size: int = 0,
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
    ) -> str:
        """Store a whole blob (verified against `expected`/`size` if given)."""
        ref = f"put-{uuid.uuid4().hex}"
        try:
            writer = self.open_writer(namespace, ref, size, expected, lease_id)
        except AlreadyExists:
            if labels:
                self.store.update_content(
                    namespace,
                    expected,
                    {**self.store.get_content(namespace, expected)["labels"], **labels},
                )
            return expected
        try:
            if isinstance(data, bytes):
                writer.write(data)
            else:
                while chunk := data.read(1 << 20):
                    writer.write(chunk)
            return self.commit(namespace, writer, size, expected, labels, lease_id)
        finally:
            writer.close()
            with contextlib.suppress(NotFound, Exception):
                self.content.abort(f"{namespace}/{ref}")

    def content_delete(self, namespace: str, digest: str) -> None:
        self.store.delete_content(namespace, validate_digest(digest))
        if not self.store.content_referenced_anywhere(digest):
            with contextlib.suppress(NotFound):
                self.content.delete(digest)

    def read_json(self, namespace: str, desc: Descriptor) -> bytes:
        if desc.size > MAX_ARCHIVE_DOCUMENT:
            raise InvalidArgument(f"document {desc.digest} of {desc.size} bytes is too large")
        data = self.content_read(namespace, desc.digest, 0, MAX_ARCHIVE_DOCUMENT + 1)
        if len(data) != desc.size:
            raise FailedPrecondition(
                f"content {desc.digest} has {len(data)} bytes, not {desc.size}"
            )
        return data

    # -- snapshots (keys scoped by namespace) ----------------------------------------------

    def snapshotter(self, name: str | None) -> Snapshotter:
        s = self.snapshotters.get(name or self.default_snapshotter)
        if s is None:
            raise InvalidArgument(f"unknown snapshotter {name!r}; have {sorted(self.snapshotters)}")
        return s

    @staticmethod
    def skey(namespace: str, key: str) -> str:
        return f"{namespace}/{validate_key(key)}"

    @staticmethod
    def unscoped(namespace: str, key: str) -> str:
        return key[len(namespace) + 1 :] if key.startswith(namespace + "/") else key

    def snapshot_info(self, namespace: str, snapshotter: str | None, key: str) -> dict[str, Any]:
        info = self.snapshotter(snapshotter).stat(self.skey(namespace, key)).to_wire()
        info["name"] = self.unscoped(namespace, info["name"])
        info["parent"] = self.unscoped(namespace, info["parent"]) if info["parent"] else ""
        return info

    def prepare(
        self,
        namespace: str,
        snapshotter: str | None,
        key: str,
        parent: str = "",
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
        view: bool = False,
    ) -> list[Mount]:
        s = self.snapshotter(snapshotter)
        scoped_parent = self.skey(namespace, parent) if parent else ""
        self.store.ensure_namespace(namespace)  # listed, as a snapshot makes it on containerd
        self._hold(namespace, lease_id, f"{LEASED_SNAPSHOT}{s.name}", key)
        with self.snap_lock:
            if view:
                return s.view(self.skey(namespace, key), scoped_parent, labels)
            return s.prepare(self.skey(namespace, key), scoped_parent, labels)

    def snapshot_commit(
        self,
        namespace: str,
        snapshotter: str | None,
        name: str,
        key: str,
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
    ) -> None:
        s = self.snapshotter(snapshotter)
        self._hold(namespace, lease_id, f"{LEASED_SNAPSHOT}{s.name}", name)
        with self.snap_lock:
            s.commit(self.skey(namespace, name), self.skey(namespace, key), labels)
        self._let_go(namespace, lease_id, f"{LEASED_SNAPSHOT}{s.name}", key)

    def snapshot_mounts(self, namespace: str, snapshotter: str | None, key: str) -> list[Mount]:
        return self.snapshotter(snapshotter).mounts(self.skey(namespace, key))

    def snapshot_remove(
        self, namespace: str, snapshotter: str | None, key: str, lease_id: str | None = None
    ) -> None:
        s = self.snapshotter(snapshotter)
        with self.snap_lock:
            s.remove(self.skey(namespace, key))
        self._let_go(namespace, lease_id, f"{LEASED_SNAPSHOT}{s.name}", key)

    def snapshot_update(
        self, namespace: str, snapshotter: str | None, key: str, labels: dict[str, str]
    ) -> dict[str, Any]:
        self.snapshotter(snapshotter).update(self.skey(namespace, key), labels)
        return self.snapshot_info(namespace, snapshotter, key)

    def snapshot_usage(self, namespace: str, snapshotter: str | None, key: str) -> dict[str, int]:
        usage = self.snapshotter(snapshotter).usage(self.skey(namespace, key))
        return {"size": usage.size, "inodes": usage.inodes}

    def snapshot_list(self, namespace: str, snapshotter: str | None) -> list[dict[str, Any]]:
        out = []
        for info in self.snapshotter(snapshotter).walk(namespace + "/"):
            doc = info.to_wire()
            doc["name"] = self.unscoped(namespace, doc["name"])
            doc["parent"] = self.unscoped(namespace, doc["parent"]) if doc["parent"] else ""
            out.append(doc)
        out.sort(key=lambda doc: str(doc["name"]))  # byte order, as containerd lists them
        return out

    # -- diff -----------------------------------------------------------------------------

    def apply(
        self,
        namespace: str,
        layer: Descriptor,
        mounts: list[Mount],
        expected_diff_id: str = "",
        allow_devices: bool = False,
    ) -> Descriptor:
        """Apply a layer blob to `mounts`; the returned descriptor is its diff (the
        uncompressed tar) as containerd's Diff/Apply returns it."""
        self.content_info(namespace, layer.digest)
        fd = self.content.open(layer.digest)
        with os.fdopen(fd, "rb") as raw, temporary_mount(mounts, self.mounts_dir) as root:
            stream = decompressor(layer.media_type, raw)
            result = archive.apply_layer(
                root, stream, allow_devices=allow_devices, expected_diff_id=expected_diff_id
            )
        return Descriptor(images.OCI_LAYER, result.diff_id, result.size)

    def diff(
        self,
        namespace: str,
        lower: list[Mount],
        upper: list[Mount],
        media_type: str = images.OCI_LAYER_GZIP,
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
    ) -> Descriptor:
        """Compute the layer that turns `lower` into `upper` and store it (gzip by
        default); the descriptor's annotations carry its uncompressed diff ID."""
        if media_type not in (images.OCI_LAYER, images.OCI_LAYER_GZIP):
            raise InvalidArgument(f"cannot produce {media_type!r}")
        tmp = os.path.join(self.mounts_dir, f"diff-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as file:
                out = archive.HashingWriter(file)  # the blob's digest, as it is written
                sink: IO[bytes] = out  # type: ignore[assignment]
                gz = None
                if media_type == images.OCI_LAYER_GZIP:
                    # no file name in the header (GzipFile would write the temporary
                    # file's): the same diff is the same blob, as containerd's
                    gz = gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0)
                    sink = gz  # type: ignore[assignment]
                with temporary_mount(upper, self.mounts_dir) as upper_dir:
                    if lower:
                        with temporary_mount(lower, self.mounts_dir) as lower_dir:
                            diff_id = archive.write_diff(lower_dir, upper_dir, sink)
                    else:
                        diff_id = archive.write_diff(None, upper_dir, sink)
                if gz is not None:
                    gz.close()
            size = os.path.getsize(tmp)
            labels = self._diff_labels(namespace, out.digest, labels or {}, diff_id if gz else None)
            with open(tmp, "rb") as f:
                digest = self.put_blob(namespace, f, size=size, labels=labels, lease_id=lease_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return Descriptor(media_type, digest, size, {"containerd.io/uncompressed": diff_id})

    def _diff_labels(
        self, namespace: str, digest: str, labels: dict[str, str], diff_id: str | None
    ) -> dict[str, str]:
        """The labels a diff's blob (`digest`) is stored with, as containerd's differ
        commits it: a compressed one is labelled with its diff ID; one the namespace holds
        already keeps its own labels (the call's are not added), gaining only a missing
        diff ID."""
        uncompressed = {"containerd.io/uncompressed": diff_id} if diff_id else {}
        try:
            held: dict[str, str] = self.store.get_content(namespace, digest)["labels"] or {}
        except NotFound:
            return {**labels, **uncompressed}
        return {**uncompressed, **held}

    # -- images ---------------------------------------------------------------------------

    def manifest_for(
        self, namespace: str, target: Descriptor, platform: dict[str, str] | None = None
    ) -> tuple[Descriptor, images.Manifest]:
        """Resolve an image target (index or manifest) to one manifest for `platform`."""
        wanted = platform or images.host()
        desc = target
        for _ in range(4):
            if desc.media_type in images.MANIFEST_TYPES:
                return desc, images.parse_manifest(self.read_json(namespace, desc), desc.media_type)
            if desc.media_type not in images.INDEX_TYPES:
                raise InvalidArgument(f"unsupported image media type {desc.media_type!r}")
            entries = images.parse_index(self.read_json(namespace, desc), desc.media_type)
            matching = [e for e in entries if images.platform_matches(e.platform, wanted)]
            if not matching:
                untagged = [e for e in entries if not e.platform]
                if len(entries) == 1 and untagged:
                    matching = untagged
            if not matching:
                have = ", ".join(images.format_platform(e.platform) for e in entries) or "none"
                raise NotFound(
                    f"no manifest for platform {images.format_platform(wanted)} in "
                    f"{desc.digest} (have {have})"
                )
            desc = matching[0]
            try:
                self.store.get_content(namespace, desc.digest)
            except NotFound:
                raise NotFound(
                    f"the image's {images.format_platform(wanted)} manifest {desc.digest} is "
                    "not held here (it was pulled or imported for other platforms)"
                ) from None
        raise InvalidArgument("indexes nested too deeply")

    def image_config(
        self, namespace: str, name: str, platform: dict[str, str] | None = None
    ) -> tuple[images.Manifest, images.ImageConfig]:
        image = self.store.get_image(namespace, name)
        _, manifest = self.manifest_for(namespace, Descriptor.from_wire(image["target"]), platform)
        config = images.parse_config(self.read_json(namespace, manifest.config))
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument("image config and manifest disagree on the number of layers")
        return manifest, config

    def unpack(
        self,
        namespace: str,
        name: str,
        snapshotter: str | None = None,
        platform: dict[str, str] | None = None,
        lease_id: str | None = None,
    ) -> str:
        """Unpack image `name` into committed snapshots keyed by chain ID; layers already
        unpacked (by any image) are skipped. Returns the top chain ID."""
        manifest, config = self.image_config(namespace, name, platform)
        chains = images.chain_ids(config.diff_ids)
        s = self.snapshotter(snapshotter)
        with self.lease(namespace, lease_id) as lease:
            parent = ""
            for layer, diff_id, chain in zip(manifest.layers, config.diff_ids, chains, strict=True):
                try:
                    s.stat(self.skey(namespace, chain))
                    parent = chain
                    continue  # shared with an image unpacked before
                except NotFound:
                    pass
                key = f"extract-{uuid.uuid4().hex[:12]} {chain}"
                mounts = self.prepare(namespace, s.name, key, parent, lease_id=lease)
                try:
                    self.apply(namespace, layer, mounts, expected_diff_id=diff_id)
                    try:
                        self.snapshot_commit(namespace, s.name, chain, key, lease_id=lease)
                    except AlreadyExists:
                        self.snapshot_remove(namespace, s.name, key)  # a concurrent unpack won
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.snapshot_remove(namespace, s.name, key)
                    raise
                parent = chain
            return chains[-1] if chains else ""

    def image_spec(
        self,
        namespace: str,
        name: str,
        container_id: str,
        *,
        snapshotter: str | None,
        args: list[str] | None,
        env: list[str] | None,
        cwd: str | None,
        user: str | None,
        terminal: bool,
    ) -> dict[str, Any]:
        """An OCI spec from the image's config; users and groups are resolved against the
        image's own /etc/passwd and /etc/group through a read-only view."""
        _, config = self.image_config(namespace, name)
        chain = images.chain_ids(config.diff_ids)[-1] if config.diff_ids else ""
        with self.lease(namespace, None) as lease:
            key = f"spec-view-{uuid.uuid4().hex[:12]}"
            mounts = (
                self.prepare(namespace, None, key, chain, lease_id=lease, view=True)
                if chain
                else []
            )
            try:
                if mounts:
                    with temporary_mount(mounts, self.mounts_dir) as view:
                        return images.runtime_spec(
                            container_id,
                            namespace,
                            config,
                            rootfs_view=view,
                            args=args,
                            env=env,
                            cwd=cwd,
                            user=user,
                            terminal=terminal,
                        )
                return images.runtime_spec(
                    container_id,
                    namespace,
                    config,
                    rootfs_view=None,
                    args=args,
                    env=env,
                    cwd=cwd,
                    user=user,
                    terminal=terminal,
                )
            finally:
                if mounts:
                    with contextlib.suppress(Exception):
                        self.snapshot_remove(namespace, None, key)

    def image_chain(self, namespace: str, name: str) -> str:
        _, config = self.image_config(namespace, name)
        chains = images.chain_ids(config.diff_ids)
        return chains[-1] if chains else ""

    def gc(self, protected_snapshots: set[tuple[str, str]] | None = None) -> GCResult:
        """Collect garbage (gc.py); `protected_snapshots` are scoped (snapshotter, key) pairs
        a caller needs kept (the rootfs of live tasks)."""
        from berth.daemon.storage.gc import collect  # gc.py imports this module

        result = collect(self, protected_snapshots)
        with self.gc_lock:  # collections may run in two worker threads at once
            self.gc_runs += 1
            self.gc_seconds += result.seconds
            for kind, count in result.to_wire()["removed"].items():
                self.gc_removed[kind] = self.gc_removed.get(kind, 0) + count
            for kind, size in result.freed_bytes.items():
                self.gc_freed_bytes[kind] = self.gc_freed_bytes.get(kind, 0) + size
        return result
