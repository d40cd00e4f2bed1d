"""berthd's storage API: content, images, snapshots, diff, leases, GC (daemon/storage.py).

Primitives, as containerd exposes them, so that an engine or a builder composes its own
workflows: there is no build API, but snapshots + mounts + diff + content are what a
builder needs. Import/export and pull/push are transfers the daemon runs itself (the
archive and the registry are read directly, nothing streams through the client).

Heavy work (hashing, unpacking, diffs, GC) runs in worker threads, so the event loop
keeps serving tasks meanwhile.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import trio

from berth.daemon.api import schema
from berth.daemon.api.routes import TypedHandler
from berth.daemon.metadata import check_labels
from berth.daemon.paging import paged
from berth.daemon.rpc import STREAM_DONE, CallContext
from berth.daemon.storage import images, transfer
from berth.daemon.storage.content import Writer
from berth.daemon.storage.gc import GCResult
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.service import Storage
from berth.native import malloc_trim
from berth.shim.mount import Mount
from berth.shim.wire.errors import AlreadyExists, FailedPrecondition, Unavailable

T = TypeVar("T")
MAX_READ = 1 << 20
INLINE_READ = 64 * 1024  # a read this small is done on the loop (content_read)
WRITERS = "content.writers"
GC_DELAY = 1.0  # seconds after a delete before the collector runs (a burst is one run)
RELEASE_DELAY = 1.0  # seconds after heavy work before the C heap is trimmed (a burst: once)
ABORT_WAIT = 2.0  # seconds an abort waits for the writer of its ingest to let go

log = logging.getLogger("berthd.gc")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _progress_sender(ctx: CallContext) -> Callable[[dict[str, Any]], None]:
    """Send progress items from a worker thread to the caller, best effort: a client that
    went away stops the items, never the transfer."""
    broken = False

    def send(item: dict[str, Any]) -> None:
        nonlocal broken
        if broken:
            return
        try:
            trio.from_thread.run(ctx.send_item, item)
        except (Exception, trio.Cancelled):
            broken = True

    return send


class StorageApi:
    def __init__(
        self,
        storage: Storage,
        publish: Callable[..., Any],
        protected: Callable[[], set[tuple[str, str]]] = set,
    ) -> None:
        self.storage = storage
        self.publish = publish
        self.protected = protected  # snapshots the task service needs kept (rootfs of tasks)
        self._gc_requested = trio.Event()
        self._work_done = trio.Event()

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await in_thread(fn, *args, **kwargs)
        finally:
            self._work_done.set()

    async def memory_releaser(self) -> None:
        """Give the C heap's free pages back to the kernel a second after storage work.

        Chunks of content, layers being hashed or unpacked and documents pass through
        malloc in worker threads; glibc keeps what they freed for reuse, so a berthd that
        imported one image held ~5 MiB more for good (measured: 37.1 -> 32.4 MiB RSS after
        an import through ctr). malloc_trim walks the free lists only: ~30 us here."""
        while True:
            await self._work_done.wait()
            await trio.sleep(RELEASE_DELAY)
            self._work_done = trio.Event()
            malloc_trim()

    def request_gc(self) -> None:
        """A delete made something unreferenced: collect soon (background_collector)."""
        self._gc_requested.set()

    async def background_collector(self) -> None:
        """containerd collects after deletions, not only on demand; so does berth: a
        second after a delete, so a burst of deletes costs one collection. Whatever a
        lease, an image, a container or a running task references is never collected."""
        # Also every half ingest expiry: stale ingests and expired leases go without a
        # delete to trigger a collection.
        period = max(self.storage.ingest_expiry / 2, GC_DELAY)
        while True:
            with trio.move_on_after(period):
                await self._gc_requested.wait()
                await trio.sleep(GC_DELAY)
            self._gc_requested = trio.Event()
            try:
                result = await self._gc()
                log.debug("background GC: %s", result.to_wire())
            except Exception:
                log.exception("background GC failed")

    def handlers(self) -> dict[str, TypedHandler]:
        return {
            "content.info": self.content_info,
            "content.list": self.content_list,
            "content.read": self.content_read,
            "content.update": self.content_update,
            "content.delete": self.content_delete,
            "content.write.open": self.content_write_open,
            "content.write.chunk": self.content_write_chunk,
            "content.write.commit": self.content_write_commit,
            "content.write.abort": self.content_write_abort,
            "content.write.close": self.content_write_close,
            "content.status": self.content_status,
            "content.ingests": self.content_ingests,
            "images.create": self.images_create,
            "images.update": self.images_update,
            "images.get": self.images_get,
            "images.list": self.images_list,
            "images.tag": self.images_tag,
            "images.delete": self.images_delete,
            "images.import": self.images_import,
            "images.export": self.images_export,
            "images.pull": self.images_pull,
            "images.push": self.images_push,
            "images.unpack": self.images_unpack,
            "images.spec": self.images_spec,
            "snapshots.prepare": self.snapshots_prepare,
            "snapshots.view": self.snapshots_view,
            "snapshots.mounts": self.snapshots_mounts,
            "snapshots.commit": self.snapshots_commit,
            "snapshots.remove": self.snapshots_remove,
            "snapshots.stat": self.snapshots_stat,
            "snapshots.update": self.snapshots_update,
            "snapshots.usage": self.snapshots_usage,
            "snapshots.list": self.snapshots_list,
            "diff.apply": self.diff_apply,
            "diff.diff": self.diff_diff,
            "leases.create": self.leases_create,
            "leases.list": self.leases_list,
            "leases.delete": self.leases_delete,
            "leases.add_resource": self.leases_add_resource,
            "leases.delete_resource": self.leases_delete_resource,
            "leases.resources": self.leases_resources,
            "gc": self.gc,
        }

    # -- content --------------------------------------------------------------------------

    async def content_info(self, ctx: CallContext, p: schema.ContentDigest) -> Any:
        return self.storage.content_info(ctx.namespace, p.digest)

    async def content_list(self, ctx: CallContext, p: schema.Paged) -> Any:
        return paged("content", self.storage.store.list_content(ctx.namespace), "digest", p.page)

    async def content_read(self, ctx: CallContext, p: schema.ContentRead) -> Any:
        """Up to MAX_READ bytes at `offset`; none at or past the blob's end, without a
        seek there (past a filesystem's largest file, 16 TiB on ext4, a seek is EINVAL:
        such an offset was `internal`)."""
        size = min(p.size if p.size > 0 else MAX_READ, MAX_READ)
        info = self.storage.content_info(ctx.namespace, p.digest)
        blob_size = int(info.get("size") or 0)
        if p.offset >= blob_size:
            return {"data": b"", "offset": p.offset}
        # (the record was checked above: only the blob is read, here or in a thread)
        if min(size, blob_size - p.offset) <= INLINE_READ:
            # manifests, indexes and configs: read here. A worker thread's round trip
            # costs more than such a read from the page cache (measured: Content/Read
            # 0.81 ms through berth-grpc against Content/Info's 0.53; containerd's ctr
            # reads them ten times for one `ctr run`)
            data = self.storage.content.read(p.digest, p.offset, size)
        else:
            data = await self._in_thread(self.storage.content.read, p.digest, p.offset, size)
        return {"data": data, "offset": p.offset}

    async def content_update(self, ctx: CallContext, p: schema.ContentUpdate) -> Any:
        return self.storage.store.update_content(ctx.namespace, p.digest, check_labels(p.labels))

    async def content_delete(self, ctx: CallContext, p: schema.ContentDigest) -> Any:
        self.storage.freeing(lambda: self.storage.content_delete(ctx.namespace, p.digest))
        self.publish(ctx.namespace, "/content/delete", {"digest": p.digest})
        return {}

    def _writers(self, ctx: CallContext) -> dict[str, Writer]:
        writers: dict[str, Writer] | None = ctx.session.get(WRITERS)
        if writers is None:
            writers = ctx.session[WRITERS] = {}

            def release() -> None:  # the client went away: keep the ingest, drop the lock
                for w in writers.values():
                    w.close()

            ctx.on_close.append(release)
        return writers

    async def content_write_open(self, ctx: CallContext, p: schema.WriteOpen) -> Any:
        """Open (or resume) an ingest on this connection: returns the offset to write at
        and the ingest's times, or `exists` when this namespace has the expected digest.
        A client's ingest, under containerd's rules (storage/content.py): a blob stored
        for other namespaces opens a writer already complete."""
        writers = self._writers(ctx)
        if p.ref in writers:
            raise FailedPrecondition(f"ingest {p.ref!r} is already open on this connection")
        try:
            writer = await self._in_thread(
                self.storage.open_writer,
                ctx.namespace,
                p.ref,
                p.total,
                p.expected or "",
                ctx.lease,
                client=True,
            )
        except AlreadyExists:
            return {"exists": True, "offset": 0}
        writers[p.ref] = writer
        writer.lease = ctx.lease  # the commit records the blob under it
        return {
            "exists": False,
            "offset": writer.offset,
            "digest": writer.digest(),
            "started_at": writer.started_at,
            "updated_at": writer.updated_at,
        }

    def _writer(self, ctx: CallContext, ref: str) -> Writer:
        writer = self._writers(ctx).get(ref)
        if writer is None:
            raise FailedPrecondition(f"ingest {ref!r} is not open on this connection")
        return writer

    async def content_write_chunk(self, ctx: CallContext, p: schema.WriteChunk) -> Any:
        writer = self._writer(ctx, p.ref)
        offset = await self._in_thread(writer.write, p.data, p.offset)
        return {"offset": offset, "digest": writer.digest(), "updated_at": writer.updated_at}

    async def content_write_commit(self, ctx: CallContext, p: schema.WriteCommit) -> Any:
        writer = self._writer(ctx, p.ref)
        try:
            digest = await self._in_thread(
                self.storage.commit,
                ctx.namespace,
                writer,
                p.size,
                p.expected or "",
                check_labels(p.labels),
                ctx.lease or writer.lease,
                exists_ok=False,
            )
        finally:
            self._writers(ctx).pop(p.ref, None)
        return {"digest": digest}

    async def content_write_close(self, ctx: CallContext, p: schema.IngestRef) -> Any:
        """Let this connection's ingest go, keeping its bytes for a resume: a writer that
        stops without a commit frees the ref for the next one at once (a connection's
        close does too, but only once berthd notices it)."""
        writer = self._writers(ctx).pop(p.ref, None)
        if writer is not None:
            writer.close()
        return {}

    async def content_write_abort(self, ctx: CallContext, p: schema.IngestRef) -> Any:
        """Remove an ingest. One still being written (its lock held) is waited for a
        little: a client that closes its writer and aborts at once (containerd's Go client
        does: Close only half-closes the stream) reaches here before its stream's end does."""
        writer = self._writers(ctx).pop(p.ref, None)
        if writer is not None:
            writer.close()
        give_up = trio.current_time() + ABORT_WAIT
        while True:
            try:
                self.storage.abort_ingest(ctx.namespace, p.ref, ctx.lease)
                return {}
            except Unavailable:
                if trio.current_time() >= give_up:
                    raise
                await trio.sleep(0.01)

    async def content_status(self, ctx: CallContext, p: schema.IngestRef) -> Any:
        status = self.storage.content.status(f"{ctx.namespace}/{p.ref}")
        return {
            "ref": p.ref,
            "offset": status.offset,
            "total": status.total,
            "expected": status.expected,
            "started_at": status.started_at,
            "updated_at": status.updated_at,
        }

    async def content_ingests(self, ctx: CallContext, p: schema.Empty) -> Any:
        prefix = ctx.namespace + "/"
        return {
            "ingests": [
                {
                    "ref": s.ref[len(prefix) :],
                    "offset": s.offset,
                    "total": s.total,
                    "expected": s.expected,
                    "started_at": s.started_at,
                    "updated_at": s.updated_at,
                }
                for s in self.storage.content.list_ingests()
                if s.ref.startswith(prefix)
            ]
        }

    # -- images ---------------------------------------------------------------------------

    async def images_create(self, ctx: CallContext, p: schema.ImagePut) -> Any:
        return self._put_image(ctx, p, create=True, update=False)

    async def images_update(self, ctx: CallContext, p: schema.ImagePut) -> Any:
        return self._put_image(ctx, p, create=False, update=True)

    def _put_image(
        self, ctx: CallContext, p: schema.ImagePut, *, create: bool, update: bool
    ) -> Any:
        # The target need not be stored (yet): containerd records an image before or
        # without its content (a client that writes the content next, a namespace that
        # shares another's); using the image then fails on the missing blob, as there.
        target = Descriptor.from_wire(msgspec.to_builtins(p.target))
        image = self.storage.store.put_image(
            ctx.namespace,
            p.name,
            target.to_wire(),
            check_labels(p.labels),
            create=create,
            update=update,
        )
        self._image_event(ctx.namespace, "/images/create" if create else "/images/update", image)
        return image

    def _image_event(self, namespace: str, topic: str, image: dict[str, Any]) -> None:
        """containerd's ImageCreate/ImageUpdate: the image's name and labels."""
        self.publish(namespace, topic, {"name": image["name"], "labels": image.get("labels") or {}})

    async def images_get(self, ctx: CallContext, p: schema.ImageRef) -> Any:
        return self.storage.store.get_image(ctx.namespace, p.name)

    async def images_list(self, ctx: CallContext, p: schema.ImagesList) -> Any:
        """`usage`: each image also gets its content size and platforms (images ls)."""
        reply = paged("images", self.storage.store.list_images(ctx.namespace), "name", p.page)
        if p.usage:
            await self._in_thread(self._add_usage, ctx.namespace, reply["images"])
        return reply

    def _add_usage(self, namespace: str, found: list[dict[str, Any]]) -> None:
        for image in found:
            target = Descriptor.from_wire(image["target"])
            image.update(transfer.image_usage(self.storage, namespace, target))

    async def images_tag(self, ctx: CallContext, p: schema.ImagesTag) -> Any:
        source = self.storage.store.get_image(ctx.namespace, p.source)
        image = self.storage.store.put_image(
            ctx.namespace,
            p.target,
            source["target"],
            source["labels"],
            create=True,
            update=p.force,
        )
        self._image_event(ctx.namespace, "/images/create", image)
        return image

    async def _collect_after_delete(self, sync: bool) -> None:
        """`sync`: collect now, before answering; otherwise the background collector runs
        shortly (containerd's scheduler behaves alike)."""
        if sync:
            await self._gc()
        else:
            self.request_gc()

    async def images_delete(self, ctx: CallContext, p: schema.ImagesDelete) -> Any:
        self.storage.freeing(lambda: self.storage.store.delete_image(ctx.namespace, p.name))
        self.publish(ctx.namespace, "/images/delete", {"name": p.name})
        await self._collect_after_delete(p.sync)
        return {}

    async def images_import(self, ctx: CallContext, p: schema.ImagesImport) -> Any:
        """`progress`: pull's progress items stream before the reply (and the reply once
        more as a {kind: result} item, for a client reading the call as a stream)."""
        result = await self._in_thread(
            transfer.import_archive,
            self.storage,
            ctx.namespace,
            p.path,
            name=p.name or None,
            unpack=p.unpack,
            snapshotter=p.snapshotter or None,
            lease_id=ctx.lease,
            progress=_progress_sender(ctx) if p.progress else None,
        )
        for image in result["images"]:
            self._image_event(ctx.namespace, "/images/create", image)
        if p.progress:
            await ctx.send_item({"kind": "result", **result})
        return result

    async def images_export(self, ctx: CallContext, p: schema.ImagesExport) -> Any:
        """`progress`: as for images.import."""
        result = await self._in_thread(
            transfer.export_archive,
            self.storage,
            ctx.namespace,
            p.names,
            p.path,
            images.parse_platform(p.platform) if p.platform else None,
            all_platforms=not p.platform,
            progress=_progress_sender(ctx) if p.progress else None,
        )
        if p.progress:
            await ctx.send_item({"kind": "result", **result})
        return result

    @contextlib.asynccontextmanager
    async def _registry(self, ref: Any, p: schema.Registry) -> AsyncIterator[Any]:
        """A registry client for one pull or push: transport failures typed, closed after."""
        from berth.daemon.storage import registry

        client = registry.RegistryClient(
            ref,
            plain_http=p.plain_http,
            username=p.username or "",
            password=p.password or "",
            tls_ca=p.tls_ca or "",
            tls_skip_verify=p.tls_skip_verify,
        )
        try:
            async with registry.transport_errors(ref.host):
                yield client
        finally:
            await client.aclose()

    async def images_pull(self, ctx: CallContext, p: schema.ImagesPull) -> Any:
        """Stream progress items, then one {kind: result} item."""
        from berth.daemon import reference
        from berth.daemon.storage import registry

        ref = reference.parse(p.ref)
        async with self._registry(ref, p) as client:
            image = await registry.pull(
                self.storage,
                ctx.namespace,
                ref,
                client,
                ctx.send_item,
                platform=images.parse_platform(p.platform) if p.platform else None,
                unpack=p.unpack,
                snapshotter=p.snapshotter or None,
            )
        self._image_event(ctx.namespace, "/images/create", image)
        await ctx.send_item(
            {"kind": "result", "name": image["name"], "digest": image["target"]["digest"]}
        )
        return STREAM_DONE

    async def images_push(self, ctx: CallContext, p: schema.ImagesPush) -> Any:
        from berth.daemon import reference
        from berth.daemon.storage import registry

        ref = reference.parse(p.ref)
        async with self._registry(ref, p) as client:
            top = await registry.push(
                self.storage,
                ctx.namespace,
                p.local or str(ref),
                ref,
                client,
                ctx.send_item,
                images.parse_platform(p.platform) if p.platform else None,
            )
        await ctx.send_item({"kind": "result", "name": str(ref), "digest": top["digest"]})
        return STREAM_DONE

    async def images_unpack(self, ctx: CallContext, p: schema.ImagesUnpack) -> Any:
        chain = await self._in_thread(
            self.storage.unpack,
            ctx.namespace,
            p.name,
            p.snapshotter or None,
            images.parse_platform(p.platform) if p.platform else None,
            ctx.lease,
        )
        return {"chain_id": chain}

    async def images_spec(self, ctx: CallContext, p: schema.ImagesSpec) -> Any:
        """An OCI runtime spec for a container of an image (its config on safe defaults)."""
        spec = await self._in_thread(
            self.storage.image_spec,
            ctx.namespace,
            p.image,
            p.id,
            snapshotter=p.snapshotter or None,
            args=p.args,
            env=p.env,
            cwd=p.cwd or None,
            user=p.user,
            terminal=p.terminal,
        )
        chain = await self._in_thread(self.storage.image_chain, ctx.namespace, p.image)
        return {"spec": spec, "chain_id": chain}

    # -- snapshots ------------------------------------------------------------------------

    async def _prepare(self, ctx: CallContext, p: schema.SnapshotPrepare, *, view: bool) -> Any:
        mounts = await self._in_thread(
            self.storage.prepare,
            ctx.namespace,
            p.snapshotter or None,
            p.key,
            p.parent or "",
            check_labels(p.labels),
            ctx.lease,
            view=view,
        )
        return {"mounts": [m.to_wire() for m in mounts]}

    async def snapshots_prepare(self, ctx: CallContext, p: schema.SnapshotPrepare) -> Any:
        """containerd publishes /snapshot/prepare, /snapshot/commit and /snapshot/remove
        for a client's calls (not for a view, nor for what its GC removes): so does
        berthd."""
        mounts = await self._prepare(ctx, p, view=False)
        self.publish(ctx.namespace, "/snapshot/prepare", {"key": p.key, "parent": p.parent or ""})
        return mounts

    async def snapshots_view(self, ctx: CallContext, p: schema.SnapshotPrepare) -> Any:
        return await self._prepare(ctx, p, view=True)

    async def snapshots_mounts(self, ctx: CallContext, p: schema.SnapshotKey) -> Any:
        mounts = self.storage.snapshot_mounts(ctx.namespace, p.snapshotter or None, p.key)
        return {"mounts": [m.to_wire() for m in mounts]}

    async def snapshots_commit(self, ctx: CallContext, p: schema.SnapshotCommit) -> Any:
        await self._in_thread(
            self.storage.snapshot_commit,
            ctx.namespace,
            p.snapshotter or None,
            p.name,
            p.key,
            check_labels(p.labels),
            ctx.lease,
        )
        self.publish(ctx.namespace, "/snapshot/commit", {"key": p.key, "name": p.name})
        return {}

    async def snapshots_remove(self, ctx: CallContext, p: schema.SnapshotKey) -> Any:
        await self._in_thread(
            self.storage.freeing,
            lambda: self.storage.snapshot_remove(
                ctx.namespace, p.snapshotter or None, p.key, ctx.lease
            ),
        )
        self.publish(ctx.namespace, "/snapshot/remove", {"key": p.key})
        return {}

    async def snapshots_stat(self, ctx: CallContext, p: schema.SnapshotKey) -> Any:
        return self.storage.snapshot_info(ctx.namespace, p.snapshotter or None, p.key)

    async def snapshots_update(self, ctx: CallContext, p: schema.SnapshotUpdate) -> Any:
        return self.storage.snapshot_update(
            ctx.namespace, p.snapshotter or None, p.key, check_labels(p.labels)
        )

    async def snapshots_usage(self, ctx: CallContext, p: schema.SnapshotKey) -> Any:
        return await self._in_thread(
            self.storage.snapshot_usage, ctx.namespace, p.snapshotter or None, p.key
        )

    async def snapshots_list(self, ctx: CallContext, p: schema.SnapshotList) -> Any:
        snapshots = self.storage.snapshot_list(ctx.namespace, p.snapshotter or None)
        # by name (its key): a page continues after the last name, and containerd lists
        # snapshots in byte order (they were keyed by a field they lack: not sorted, and a
        # listing past one page stopped after the first)
        return paged("snapshots", snapshots, "name", p.page)

    # -- diff -----------------------------------------------------------------------------

    async def diff_apply(self, ctx: CallContext, p: schema.DiffApply) -> Any:
        layer = Descriptor.from_wire(msgspec.to_builtins(p.layer))
        diff = await self._in_thread(
            self.storage.apply,
            ctx.namespace,
            layer,
            [Mount.from_wire(m) for m in p.mounts],
            p.expected_diff_id or "",
        )
        return {"applied": diff.to_wire()}

    async def diff_diff(self, ctx: CallContext, p: schema.DiffDiff) -> Any:
        desc = await self._in_thread(
            self.storage.diff,
            ctx.namespace,
            [Mount.from_wire(m) for m in p.lower],
            [Mount.from_wire(m) for m in p.upper],
            p.media_type or images.OCI_LAYER_GZIP,
            check_labels(p.labels),
            ctx.lease,
        )
        return {"diff": desc.to_wire()}

    # -- leases ---------------------------------------------------------------------------

    async def leases_create(self, ctx: CallContext, p: schema.LeasesCreate) -> Any:
        lease_id = p.id or f"lease-{time.time_ns()}"
        labels = check_labels(p.labels)
        expires_at = time.time_ns() + int(p.expire_seconds * 1e9) if p.expire_seconds else 0
        gc_expire = labels.get("containerd.io/gc.expire")  # containerd's label, RFC 3339
        if gc_expire and not expires_at:
            expires_at = _rfc3339_ns(gc_expire)
        return self.storage.store.create_lease(ctx.namespace, lease_id, labels, expires_at)

    async def leases_list(self, ctx: CallContext, p: schema.Paged) -> Any:
        return paged("leases", self.storage.store.list_leases(ctx.namespace), "id", p.page)

    async def leases_delete(self, ctx: CallContext, p: schema.LeasesDelete) -> Any:
        # in a worker thread: it waits for the GC lock and removes the lease's ingests
        await self._in_thread(
            self.storage.freeing, lambda: self.storage.delete_lease(ctx.namespace, p.id)
        )
        await self._collect_after_delete(p.sync)
        return {}

    async def leases_add_resource(self, ctx: CallContext, p: schema.LeaseResource) -> Any:
        self.storage.store.add_lease_resource(ctx.namespace, p.id, p.kind, p.key)
        return {}

    async def leases_delete_resource(self, ctx: CallContext, p: schema.LeaseResource) -> Any:
        self.storage.store.get_lease(ctx.namespace, p.id)  # an unknown lease: NotFound
        self.storage.store.delete_lease_resource(ctx.namespace, p.id, p.kind, p.key)
        return {}

    async def leases_resources(self, ctx: CallContext, p: schema.LeaseId) -> Any:
        self.storage.store.get_lease(ctx.namespace, p.id)  # an unknown lease: NotFound
        resources = self.storage.store.lease_resources(ctx.namespace, p.id)
        return {"resources": [{"kind": k, "key": v} for k, v in resources]}

    async def gc(self, ctx: CallContext, p: schema.Empty) -> Any:
        return (await self._gc()).to_wire()

    async def _gc(self) -> GCResult:
        """A collection (which may need the reserve on a full disk); the reserve is taken
        again afterwards if it was released and the collection freed enough."""
        protected = self.protected()
        result: GCResult = await self._in_thread(
            self.storage.freeing, lambda: self.storage.gc(protected)
        )
        await self._in_thread(self.storage.reserve.restore)
        return result


def _rfc3339_ns(text: str) -> int:
    """containerd's `gc.expire` label as the lease's expiry in ns since the epoch: at least
    1 (0 means "never": a time at or before 1970 has passed) and at most int64's end (a
    year 9999 does not fit the database's integer: it is as good as never)."""
    from datetime import datetime

    try:
        ns = int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except (ValueError, OverflowError):
        # containerd keeps the label and its collector skips a time it cannot parse: the
        # lease never expires
        return 0
    return min(max(ns, 1), 2**63 - 1)
