"""berth's storage service: namespaced content, images, snapshots, diffs, leases, GC.

The pieces (content.py, snapshots.py, archive.py, images.py) know nothing of namespaces or
leases; this layer scopes them (content records and snapshot keys per namespace), protects
work in progress with leases, and runs the garbage collector. Trio-free and thread-safe:
berthd calls the heavy parts (import, unpack, diff, GC) from worker threads.

Leases: an operation that builds something (an ingest, an unpack, a prepared snapshot)
holds a lease, and every object it creates is recorded as a lease resource; GC never
removes what an unexpired lease holds. Callers may pass their own lease (the API's
`lease` meta field), or the operation takes a temporary one.

GC (mark and sweep, like containerd's): roots are images (-> their content graph -> the
snapshots of their layers, by chain ID), containers (-> their snapshot), unexpired leases,
and `containerd.io/gc.ref.*` labels on marked content. A marked snapshot keeps its parents.
Everything else is removed: content records, then blobs no namespace records, then
snapshots, children before parents.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from berth.daemon.documents import load_json
from berth.daemon.metadata import TEMPORARY_LEASE_LABEL, Store, out_of_space, validate_image_name
from berth.daemon.reference import normalize
from berth.daemon.storage import archive, images
from berth.daemon.storage.content import ContentStore, Writer, validate_digest
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.snapshots import SNAPSHOTTERS, Snapshotter, validate_key
from berth.shim.mount import Mount, release_leftover_mounts, temporary_mount
from berth.shim.wire.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("berth.storage")
T = TypeVar("T")

GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
TEMP_LEASE_SECONDS = 3600
RESERVE_BYTES = 8 << 20  # kept free for deletes on a full disk (SpaceReserve)
DEFAULT_INGEST_EXPIRY = 3600.0  # seconds an ingest no live lease holds may sit unwritten
MAX_ARCHIVE_DOCUMENT = images.MAX_DOCUMENT


def now_ns() -> int:
    return time.time_ns()


@dataclass
class GCResult:
    content_records: int = 0
    blobs: int = 0
    snapshots: int = 0
    leases: int = 0
    ingests: int = 0
    seconds: float = 0.0
    kept_blobs: int = 0
    kept_snapshots: int = 0
    kept_ingests: int = 0
    errors: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "removed": {
                "content": self.content_records,
                "blobs": self.blobs,
                "snapshots": self.snapshots,
                "leases": self.leases,
                "ingests": self.ingests,
            },
            "kept": {
                "blobs": self.kept_blobs,
                "snapshots": self.kept_snapshots,
                "ingests": self.kept_ingests,
            },
            "seconds": self.seconds,
            "errors": self.errors,
        }


class SpaceReserve:
    """A preallocated ballast file in the root, released when an operation that frees
    space fails for want of space, and taken again once space is back.

    Deleting needs a little space first: SQLite appends a delete to its WAL before the
    pages are freed. On a full disk (a hostile layer filled it, say) `leases rm`,
    `snapshots rm` and `gc` all failed with ENOSPC, so nothing could be recovered in-band;
    the reserve is what lets them run."""

    def __init__(self, path: str, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def present(self) -> bool:
        return os.path.exists(self.path)

    def release(self) -> bool:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return False
        log.warning("the disk is full: released the %d-byte reserve %s", self.size, self.path)
        return True

    def restore(self) -> bool:
        """Take the reserve again if it is gone and twice its size is free."""
        if self.present():
            return True
        st = os.statvfs(os.path.dirname(self.path))
        if st.f_bavail * st.f_frsize < 2 * self.size:
            return False
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not out_of_space(exc):
                raise
            return False
        return True


def decompressor(media_type: str, raw: IO[bytes]) -> IO[bytes]:
    """The uncompressed stream of a layer blob of `media_type`."""
    kind = images.LAYER_TYPES.get(media_type)
    if kind is None:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


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
        self._gc_lock = threading.Lock()  # GC and everything that creates objects
        self._snap_lock = threading.RLock()

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
    ) -> Writer:
        """A writer for the ingest `ref` of `namespace`. AlreadyExists when `expected` is
        already stored: it is then recorded in this namespace (content is shared)."""
        self._hold(namespace, lease_id, "ingest", ref)
        try:
            return self.content.writer(f"{namespace}/{ref}", total, expected)
        except AlreadyExists:
            with self._gc_lock:  # a collection must not sweep it between these steps
                info = self.content.info(expected)
                self._hold(namespace, lease_id, "content", expected)
                self.store.add_content(namespace, expected, info.size)
            raise

    def commit(
        self,
        namespace: str,
        writer: Writer,
        size: int = 0,
        expected: str = "",
        labels: dict[str, str] | None = None,
        lease_id: str | None = None,
    ) -> str:
        # Under the GC lock: a collection that ran between the blob landing in the store
        # and its record (or its lease reference) would sweep it as unreferenced.
        with self._gc_lock:
            digest = writer.commit(size, expected)
            self._hold(namespace, lease_id, "content", digest)
            self.store.add_content(namespace, digest, self.content.info(digest).size, labels)
            if labels:
                self.store.update_content(namespace, digest, labels)
        return digest

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
        self._hold(namespace, lease_id, f"snapshot/{s.name}", key)
        with self._snap_lock:
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
        self._hold(namespace, lease_id, f"snapshot/{s.name}", name)
        with self._snap_lock:
            s.commit(self.skey(namespace, name), self.skey(namespace, key), labels)

    def snapshot_mounts(self, namespace: str, snapshotter: str | None, key: str) -> list[Mount]:
        return self.snapshotter(snapshotter).mounts(self.skey(namespace, key))

    def snapshot_remove(self, namespace: str, snapshotter: str | None, key: str) -> None:
        with self._snap_lock:
            self.snapshotter(snapshotter).remove(self.skey(namespace, key))

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
            with open(tmp, "wb") as out:
                sink: IO[bytes] = out
                gz = None
                if media_type == images.OCI_LAYER_GZIP:
                    gz = gzip.GzipFile(fileobj=out, mode="wb", mtime=0)
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
            labels = {**(labels or {}), "containerd.io/uncompressed": diff_id}
            with open(tmp, "rb") as f:
                digest = self.put_blob(namespace, f, size=size, labels=labels, lease_id=lease_id)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return Descriptor(media_type, digest, size, {"containerd.io/uncompressed": diff_id})

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
                have = [e.platform for e in entries]
                raise NotFound(f"no manifest for platform {wanted} in {desc.digest} (have {have})")
            desc = matching[0]
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

    # -- import / export ------------------------------------------------------------------

    def import_archive(
        self,
        namespace: str,
        path: str,
        *,
        name: str | None = None,
        unpack: bool = True,
        snapshotter: str | None = None,
        lease_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Import an OCI image-layout tar or a `docker save` archive from `path`."""
        if not os.path.isabs(path):
            raise InvalidArgument("the archive path must be absolute")
        try:
            tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with` below
        except (OSError, tarfile.TarError) as exc:
            raise InvalidArgument(f"cannot read archive {path}: {exc}") from None
        with tar, self.lease(namespace, lease_id) as lease:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isreg()}

            def read_member(member_name: str, cap: int = MAX_ARCHIVE_DOCUMENT) -> bytes:
                m = members.get(member_name.lstrip("./"))
                if m is None:
                    raise InvalidArgument(f"archive has no {member_name}")
                if m.size > cap:
                    raise InvalidArgument(
                        f"{member_name} in the archive is larger than {cap} bytes"
                    )
                f = tar.extractfile(m)
                assert f is not None
                return f.read(cap + 1)

            def blob(desc: Descriptor, labels: dict[str, str] | None = None) -> None:
                m = members.get(f"blobs/sha256/{validate_digest(desc.digest)[7:]}")
                if m is None:
                    raise InvalidArgument(f"archive lacks blob {desc.digest}")
                if m.size != desc.size:
                    raise InvalidArgument(f"blob {desc.digest} is {m.size} bytes, not {desc.size}")
                f = tar.extractfile(m)
                assert f is not None
                self.put_blob(namespace, f, desc.digest, desc.size, labels, lease)

            if "index.json" in members:
                created = self._import_oci(namespace, read_member, blob, name)
            elif "manifest.json" in members:
                created = self._import_docker(namespace, read_member, members, tar, name, lease)
            else:
                raise InvalidArgument(
                    "not an OCI image layout or docker archive (no index.json or manifest.json)"
                )
            for image in created:
                if unpack:
                    self.unpack(namespace, image["name"], snapshotter, lease_id=lease)
            return created

    def _walk(self, namespace: str, desc: Descriptor, fetch: Any, depth: int = 0) -> None:
        """Store `desc` and everything it references, children first."""
        if depth > 4:
            raise InvalidArgument("image indexes nested too deeply")
        if desc.media_type in images.INDEX_TYPES:
            data = fetch(desc, read=True)
            refs = {}
            for i, child in enumerate(images.parse_index(data, desc.media_type)):
                self._walk(namespace, child, fetch, depth + 1)
                refs[f"{GC_REF_CONTENT}.m.{i}"] = child.digest
            fetch(desc, labels=refs)
        elif desc.media_type in images.MANIFEST_TYPES:
            data = fetch(desc, read=True)
            manifest = images.parse_manifest(data, desc.media_type)
            refs = {f"{GC_REF_CONTENT}.config": manifest.config.digest}
            fetch(manifest.config)
            for i, layer in enumerate(manifest.layers):
                fetch(layer)
                refs[f"{GC_REF_CONTENT}.l.{i}"] = layer.digest
            fetch(desc, labels=refs)
        else:
            raise InvalidArgument(f"unsupported image media type {desc.media_type!r}")

    def _import_oci(
        self, namespace: str, read_member: Any, blob: Any, name: str | None
    ) -> list[dict[str, Any]]:
        layout = images.parse_document(read_member("oci-layout"), "oci-layout")
        if layout.get("imageLayoutVersion") != "1.0.0":
            raise InvalidArgument("unsupported oci-layout version")
        entries = images.parse_index(read_member("index.json"), images.OCI_INDEX)
        if not entries:
            raise InvalidArgument("the archive's index.json lists no image")

        def fetch(
            desc: Descriptor, read: bool = False, labels: dict[str, str] | None = None
        ) -> bytes:
            m_data = b""
            if read:
                m_data = read_member(f"blobs/sha256/{validate_digest(desc.digest)[7:]}")
                if "sha256:" + hashlib.sha256(m_data).hexdigest() != desc.digest:
                    raise InvalidArgument(f"blob {desc.digest} does not match its digest")
            blob(desc, labels)
            return m_data

        created = []
        for entry in entries:
            self._walk(namespace, entry, fetch)
            image_name = (
                name
                if (name and len(entries) == 1)
                else (
                    entry.annotations.get("io.containerd.image.name")
                    or _full_ref(entry.annotations.get("org.opencontainers.image.ref.name", ""))
                    or entry.digest
                )
            )
            created.append(
                self.store.put_image(
                    namespace, image_name, entry.to_wire(), {}, create=True, update=True
                )
            )
        return created

    def _import_docker(
        self,
        namespace: str,
        read_member: Any,
        members: dict[str, tarfile.TarInfo],
        tar: tarfile.TarFile,
        name: str | None,
        lease: str,
    ) -> list[dict[str, Any]]:
        manifest_list = load_json(
            read_member("manifest.json"), "manifest.json", max_size=MAX_ARCHIVE_DOCUMENT
        )
        if not isinstance(manifest_list, list) or not manifest_list:
            raise InvalidArgument("manifest.json must be a non-empty list")
        created = []
        for item in manifest_list:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("Config"), str)
                or not isinstance(item.get("Layers"), list)
            ):
                raise InvalidArgument("manifest.json entries need Config and Layers")
            config_data = read_member(item["Config"])
            images.parse_config(config_data)  # validates
            config_digest = self.put_blob(namespace, config_data, lease_id=lease)
            layers: list[dict[str, Any]] = []
            for layer_name in item["Layers"]:
                if not isinstance(layer_name, str):
                    raise InvalidArgument("manifest.json Layers must be strings")
                m = members.get(layer_name.lstrip("./"))
                if m is None:
                    raise InvalidArgument(f"archive has no layer {layer_name}")
                f = tar.extractfile(m)
                assert f is not None
                head = f.read(2)
                f.seek(0)
                media = images.OCI_LAYER_GZIP if head == b"\x1f\x8b" else images.OCI_LAYER
                digest = self.put_blob(namespace, f, size=m.size, lease_id=lease)
                layers.append({"mediaType": media, "digest": digest, "size": m.size})
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": images.OCI_MANIFEST,
                    "config": {
                        "mediaType": images.OCI_CONFIG,
                        "digest": config_digest,
                        "size": len(config_data),
                    },
                    "layers": layers,
                },
                sort_keys=True,
            ).encode()
            refs = {f"{GC_REF_CONTENT}.config": config_digest}
            refs.update(
                {f"{GC_REF_CONTENT}.l.{i}": layer["digest"] for i, layer in enumerate(layers)}
            )
            manifest_digest = self.put_blob(namespace, manifest, labels=refs, lease_id=lease)
            target = {
                "media_type": images.OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
            }
            tags = item.get("RepoTags") or []
            names = (
                [name]
                if name
                else [_full_ref(t) for t in tags if isinstance(t, str)] or [manifest_digest]
            )
            for image_name in names:
                created.append(
                    self.store.put_image(
                        namespace, image_name, target, {}, create=True, update=True
                    )
                )
        return created

    def export_archive(
        self,
        namespace: str,
        names: list[str],
        path: str,
        platform: dict[str, str] | None = None,
        all_platforms: bool = True,
    ) -> dict[str, Any]:
        """Write an OCI image-layout tar (with a docker-compatible manifest.json) of the
        images `names` to `path`. Deterministic: same images, same bytes."""
        if not os.path.isabs(path):
            raise InvalidArgument("the archive path must be absolute")
        blobs: dict[str, int] = {}
        index_entries = []
        docker_manifest = []
        for name in names:
            image = self.store.get_image(namespace, validate_image_name(name))
            target = Descriptor.from_wire(image["target"])
            self._collect(
                namespace, target, blobs, None if all_platforms else (platform or images.host())
            )
            annotations = {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]
                if ":" in name.rsplit("/", 1)[-1]
                else "latest",
            }
            index_entries.append({**target.to_json(), "annotations": annotations})
            with contextlib.suppress(NotFound, InvalidArgument):
                _mdesc, manifest = self.manifest_for(namespace, target, platform)
                docker_manifest.append(
                    {
                        "Config": f"blobs/sha256/{manifest.config.digest[7:]}",
                        "RepoTags": [_docker_tag(name)],
                        "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in manifest.layers],
                    }
                )
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": images.OCI_INDEX, "manifests": index_entries},
            sort_keys=True,
        ).encode()
        tmp = f"{path}.tmp-{os.getpid()}"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

            def add(
                arcname: str, data: bytes | None = None, blob_digest: str | None = None
            ) -> None:
                info = tarfile.TarInfo(arcname)
                info.mtime = 0
                info.mode = 0o644
                if blob_digest is not None:
                    info.size = self.content.info(blob_digest).size
                    with open(self.content.path(blob_digest), "rb") as f:
                        tar.addfile(info, f)
                else:
                    assert data is not None
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

            for directory in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
            for digest in sorted(blobs):
                add(f"blobs/sha256/{digest[7:]}", blob_digest=digest)
            add("index.json", index)
            add("manifest.json", json.dumps(docker_manifest, sort_keys=True).encode())
            add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        os.replace(tmp, path)
        return {"path": path, "blobs": len(blobs), "images": len(names)}

    def _collect(
        self,
        namespace: str,
        desc: Descriptor,
        out: dict[str, int],
        platform: dict[str, str] | None,
        depth: int = 0,
    ) -> None:
        if depth > 4:
            raise InvalidArgument("image indexes nested too deeply")
        out[desc.digest] = desc.size
        if desc.media_type in images.INDEX_TYPES:
            for child in images.parse_index(self.read_json(namespace, desc), desc.media_type):
                if platform is None or images.platform_matches(child.platform, platform):
                    with contextlib.suppress(NotFound):
                        self.store.get_content(namespace, child.digest)
                        self._collect(namespace, child, out, platform, depth + 1)
        elif desc.media_type in images.MANIFEST_TYPES:
            manifest = images.parse_manifest(self.read_json(namespace, desc), desc.media_type)
            out[manifest.config.digest] = manifest.config.size
            for layer in manifest.layers:
                self.store.get_content(namespace, layer.digest)
                out[layer.digest] = layer.size

    # -- garbage collection ---------------------------------------------------------------

    def gc(self, protected_snapshots: set[tuple[str, str]] | None = None) -> GCResult:
        """Mark and sweep (see the module docstring). `protected_snapshots` are scoped
        (snapshotter, key) pairs a caller needs kept (e.g. rootfs of live tasks)."""
        started = time.monotonic()
        result = GCResult()
        with self._gc_lock, self._snap_lock:
            now = now_ns()
            for ns, lease_id in self.store.expired_leases(now):
                self.store.delete_lease(ns, lease_id)
                result.leases += 1
            marked_content: set[tuple[str, str]] = set()
            marked_snaps: set[tuple[str, str]] = set(protected_snapshots or ())
            pending: list[tuple[str, str]] = []
            for ns, image in self.store.all_images():
                pending.append((ns, image["target"]["digest"]))
            for ns, kind, key in self.store.live_lease_resources(now):
                if kind == "content":
                    pending.append((ns, key))
                elif kind.startswith("snapshot/"):
                    marked_snaps.add((kind[9:], f"{ns}/{key}"))
            for container in self.store.all_containers():
                if container.snapshot_key:
                    marked_snaps.add(
                        (
                            container.snapshotter or self.default_snapshotter,
                            f"{container.namespace}/{container.snapshot_key}",
                        )
                    )
            while pending:
                ns, digest = pending.pop()
                if (ns, digest) in marked_content:
                    continue
                marked_content.add((ns, digest))
                try:
                    record = self.store.get_content(ns, digest)
                except NotFound:
                    continue
                for label, value in record["labels"].items():
                    if label.startswith(GC_REF_CONTENT):
                        pending.append((ns, value))
                    elif label.startswith(GC_REF_SNAPSHOT):
                        marked_snaps.add((label[len(GC_REF_SNAPSHOT) :], f"{ns}/{value}"))
                self._mark_from_document(ns, digest, record["size"], pending, marked_snaps)
            # a marked snapshot keeps its ancestors
            for name, s in self.snapshotters.items():
                for _, key in [m for m in marked_snaps if m[0] == name]:
                    try:
                        info = s.stat(key)
                    except NotFound:
                        continue
                    while info.parent:
                        marked_snaps.add((name, info.parent))
                        info = s.stat(info.parent)
            # sweep content records, then unreferenced blobs
            for ns, digest in self.store.all_content():
                if (ns, digest) not in marked_content:
                    self.store.delete_content(ns, digest)
                    result.content_records += 1
            live_blobs = {d for _, d in self.store.all_content()}
            for digest in list(self.content.digests()):
                if digest in live_blobs:
                    result.kept_blobs += 1
                    continue
                with contextlib.suppress(NotFound):
                    self.content.delete(digest)
                    result.blobs += 1
            # sweep snapshots, children before parents
            for name, s in self.snapshotters.items():
                doomed = [i for i in s.walk() if (name, i.key) not in marked_snaps]
                result.kept_snapshots += len(s.walk()) - len(doomed)
                progress = True
                while doomed and progress:
                    progress = False
                    for info in list(doomed):
                        try:
                            s.remove(info.key)
                        except FailedPrecondition:
                            continue  # has a child still: next round
                        except NotFound:
                            pass
                        doomed.remove(info)
                        result.snapshots += 1
                        progress = True
                for info in doomed:
                    result.errors.append(f"snapshot {name}/{info.key} could not be removed")
            self._sweep_ingests(now, result)
        result.seconds = time.monotonic() - started
        return result

    def _sweep_ingests(self, now: int, result: GCResult) -> None:
        """An ingest is kept while a live lease holds it or while it is being written to
        (its lock is held) or was written to in the last `ingest_expiry` seconds; else it
        is stale (its writer died, a daemon crashed mid-import) and removed."""
        leased = {
            f"{ns}/{key}"
            for ns, kind, key in self.store.live_lease_resources(now)
            if kind == "ingest"
        }
        cutoff = now - int(self.ingest_expiry * 1e9)
        for status in self.content.list_ingests():
            if status.ref in leased or status.updated_at > cutoff:
                result.kept_ingests += 1
                continue
            try:
                self.content.abort(status.ref)
                result.ingests += 1
            except Unavailable:  # a writer holds it right now
                result.kept_ingests += 1
            except NotFound:
                pass

    def drop_temporary_leases(self) -> int:
        """Leases berthd took for one operation (an import, a pull) die with the process
        that ran it: a starting daemon drops those of its predecessors, so what they held
        (a partial ingest) becomes collectable instead of being held for an hour."""
        dropped = 0
        for namespace, lease_id in self.store.temporary_leases():
            with contextlib.suppress(NotFound):
                self.store.delete_lease(namespace, lease_id)
                dropped += 1
        return dropped

    def _mark_from_document(
        self,
        namespace: str,
        digest: str,
        size: int,
        pending: list[tuple[str, str]],
        marked_snaps: set[tuple[str, str]],
    ) -> None:
        """Follow what an index, manifest or config references, by parsing it."""
        if size > MAX_ARCHIVE_DOCUMENT:
            return
        try:
            data = self.content.read(digest, 0, MAX_ARCHIVE_DOCUMENT + 1)
            doc = load_json(data, digest, max_size=MAX_ARCHIVE_DOCUMENT)
        except (NotFound, InvalidArgument):
            return
        if not isinstance(doc, dict):
            return
        if isinstance(doc.get("manifests"), list):
            for m in doc["manifests"]:
                if isinstance(m, dict) and isinstance(m.get("digest"), str):
                    pending.append((namespace, m["digest"]))
        if isinstance(doc.get("config"), dict) and isinstance(doc.get("layers"), list):
            cfg = doc["config"].get("digest")
            if isinstance(cfg, str):
                pending.append((namespace, cfg))
            for layer in doc["layers"]:
                if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                    pending.append((namespace, layer["digest"]))
        rootfs = doc.get("rootfs")
        if isinstance(rootfs, dict) and isinstance(rootfs.get("diff_ids"), list):
            with contextlib.suppress(InvalidArgument):
                for chain in images.chain_ids([str(d) for d in rootfs["diff_ids"]]):
                    for name in self.snapshotters:
                        marked_snaps.add((name, f"{namespace}/{chain}"))


def _full_ref(name: str) -> str:
    """docker's normalisation (busybox -> docker.io/library/busybox:latest); a name that is
    not a reference (a bare tag in an OCI layout, say) is kept as it is."""
    if not name or ("/" not in name and ":" not in name):
        return name  # a bare tag: no repository to normalise against
    try:
        return normalize(name)
    except InvalidArgument:
        return name


def _docker_tag(name: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
