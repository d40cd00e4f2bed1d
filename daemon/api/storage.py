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

import trio

from berth.daemon.metadata import check_labels
from berth.daemon.paging import paged
from berth.daemon.rpc import STREAM_DONE, CallContext, Handler
from berth.daemon.storage import images
from berth.daemon.storage.content import Writer, validate_digest, validate_ref
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.service import GCResult, Storage
from berth.shim.mount import Mount
from berth.shim.wire.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from berth.shim.wire.names import validate

T = TypeVar("T")
MAX_READ = 1 << 20
WRITERS = "content.writers"
GC_DELAY = 1.0  # seconds after a delete before the collector runs (a burst is one run)

log = logging.getLogger("berthd.gc")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _str(params: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = params.get(key)
    if value in (None, ""):
        if required:
            raise InvalidArgument(f"{key} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{key} must be a string")
    return value


def _mounts(value: Any, what: str) -> list[Mount]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a list of mounts")
    return [Mount.from_wire(m) for m in value]


class StorageApi:
    def __init__(self, storage: Storage, publish: Callable[..., Any]) -> None:
        self.storage = storage
        self.publish = publish
        self._gc_requested = trio.Event()

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

    def handlers(self) -> dict[str, Handler]:
        names = [
            n
            for n in dir(self)
            if n.startswith(("content_", "images_", "snapshots_", "diff_", "leases_", "gc"))
        ]
        table: dict[str, Handler] = {}
        for name in names:
            service, _, method = name.partition("_")
            if service == "gc" and not method:
                table["gc"] = getattr(self, name)
            elif method:
                if method.startswith("write_"):  # content.write.open/chunk/commit/abort
                    method = "write." + method[len("write_") :]
                table[f"{service}.{method}"] = getattr(self, name)
        return table

    # -- content --------------------------------------------------------------------------

    async def content_info(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self.storage.content_info(ctx.namespace, validate_digest(p.get("digest")))

    async def content_list(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return paged("content", self.storage.store.list_content(ctx.namespace), "digest", p)

    async def content_read(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        offset, size = p.get("offset", 0), p.get("size", MAX_READ)
        if not isinstance(offset, int) or not isinstance(size, int) or offset < 0:
            raise InvalidArgument("offset and size must be integers")
        size = min(size if size > 0 else MAX_READ, MAX_READ)
        data = await in_thread(
            self.storage.content_read, ctx.namespace, validate_digest(p.get("digest")), offset, size
        )
        return {"data": data, "offset": offset}

    async def content_update(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self.storage.store.update_content(
            ctx.namespace, validate_digest(p.get("digest")), check_labels(p.get("labels"))
        )

    async def content_delete(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        digest = validate_digest(p.get("digest"))
        self.storage.freeing(lambda: self.storage.content_delete(ctx.namespace, digest))
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

    async def content_write_open(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        """Open (or resume) an ingest on this connection: returns the offset to write at,
        or `exists` when the expected digest is already stored."""
        ref = validate_ref(p.get("ref"))
        total, expected = p.get("total", 0), _str(p, "expected", required=False)
        if not isinstance(total, int) or total < 0:
            raise InvalidArgument("total must be a non-negative integer")
        writers = self._writers(ctx)
        if ref in writers:
            raise FailedPrecondition(f"ingest {ref!r} is already open on this connection")
        try:
            writer = await in_thread(
                self.storage.open_writer, ctx.namespace, ref, total, expected, ctx.lease
            )
        except AlreadyExists:
            return {"exists": True, "offset": 0}
        writers[ref] = writer
        writer.lease = ctx.lease  # the commit records the blob under it
        return {"exists": False, "offset": writer.offset}

    def _writer(self, ctx: CallContext, p: dict[str, Any]) -> tuple[str, Writer]:
        ref = validate_ref(p.get("ref"))
        writer = self._writers(ctx).get(ref)
        if writer is None:
            raise FailedPrecondition(f"ingest {ref!r} is not open on this connection")
        return ref, writer

    async def content_write_chunk(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        _, writer = self._writer(ctx, p)
        data, offset = p.get("data"), p.get("offset")
        if not isinstance(data, bytes):
            raise InvalidArgument("data must be bytes")
        if offset is not None and not isinstance(offset, int):
            raise InvalidArgument("offset must be an integer")
        return {"offset": await in_thread(writer.write, data, offset)}

    async def content_write_commit(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        ref, writer = self._writer(ctx, p)
        size = p.get("size", 0)
        if not isinstance(size, int):
            raise InvalidArgument("size must be an integer")
        try:
            digest = await in_thread(
                self.storage.commit,
                ctx.namespace,
                writer,
                size,
                _str(p, "expected", required=False),
                check_labels(p.get("labels")),
                ctx.lease or writer.lease,
            )
        finally:
            self._writers(ctx).pop(ref, None)
        return {"digest": digest}

    async def content_write_abort(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        ref = validate_ref(p.get("ref"))
        writer = self._writers(ctx).pop(ref, None)
        if writer is not None:
            writer.close()
        self.storage.content.abort(f"{ctx.namespace}/{ref}")
        return {}

    async def content_status(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        status = self.storage.content.status(f"{ctx.namespace}/{validate_ref(p.get('ref'))}")
        return {
            "ref": p["ref"],
            "offset": status.offset,
            "total": status.total,
            "expected": status.expected,
            "started_at": status.started_at,
            "updated_at": status.updated_at,
        }

    async def content_ingests(self, ctx: CallContext, p: dict[str, Any]) -> Any:
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

    async def images_create(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self._put_image(ctx, p, create=True, update=False)

    async def images_update(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self._put_image(ctx, p, create=False, update=True)

    def _put_image(self, ctx: CallContext, p: dict[str, Any], *, create: bool, update: bool) -> Any:
        name = _str(p, "name")
        target = Descriptor.from_wire(p.get("target"))
        self.storage.store.get_content(ctx.namespace, target.digest)  # must be there
        image = self.storage.store.put_image(
            ctx.namespace,
            name,
            target.to_wire(),
            check_labels(p.get("labels")),
            create=create,
            update=update,
        )
        self.publish(
            ctx.namespace, "/images/create" if create else "/images/update", {"name": name}
        )
        return image

    async def images_get(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self.storage.store.get_image(ctx.namespace, _str(p, "name"))

    async def images_list(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return paged("images", self.storage.store.list_images(ctx.namespace), "name", p)

    async def images_tag(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        source = self.storage.store.get_image(ctx.namespace, _str(p, "source"))
        image = self.storage.store.put_image(
            ctx.namespace,
            _str(p, "target"),
            source["target"],
            source["labels"],
            create=True,
            update=bool(p.get("force")),
        )
        self.publish(ctx.namespace, "/images/create", {"name": image["name"]})
        return image

    async def _collect_after_delete(self, p: dict[str, Any]) -> None:
        """`sync`: collect now, before answering; otherwise the background collector runs
        shortly (containerd's scheduler behaves alike)."""
        if p.get("sync"):
            await self._gc()
        else:
            self.request_gc()

    async def images_delete(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        name = _str(p, "name")
        self.storage.freeing(lambda: self.storage.store.delete_image(ctx.namespace, name))
        self.publish(ctx.namespace, "/images/delete", {"name": name})
        await self._collect_after_delete(p)
        return {}

    async def images_import(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        created = await in_thread(
            self.storage.import_archive,
            ctx.namespace,
            _str(p, "path"),
            name=_str(p, "name", required=False) or None,
            unpack=bool(p.get("unpack", True)),
            snapshotter=_str(p, "snapshotter", required=False) or None,
            lease_id=ctx.lease,
        )
        for image in created:
            self.publish(ctx.namespace, "/images/create", {"name": image["name"]})
        return {"images": created}

    async def images_export(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        names = p.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgument("names must be a non-empty list of image names")
        platform = _str(p, "platform", required=False)
        return await in_thread(
            self.storage.export_archive,
            ctx.namespace,
            names,
            _str(p, "path"),
            images.parse_platform(platform) if platform else None,
            all_platforms=not platform,
        )

    @contextlib.asynccontextmanager
    async def _registry(self, ref: Any, p: dict[str, Any]) -> AsyncIterator[Any]:
        """A registry client for one pull or push: transport failures typed, closed after."""
        from berth.daemon.storage import registry

        client = registry.RegistryClient(
            ref,
            plain_http=bool(p.get("plain_http")),
            username=_str(p, "username", required=False),
            password=_str(p, "password", required=False),
            tls_ca=_str(p, "tls_ca", required=False),
            tls_skip_verify=bool(p.get("tls_skip_verify")),
        )
        try:
            async with registry.transport_errors(ref.host):
                yield client
        finally:
            await client.aclose()

    async def images_pull(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        """Stream progress items, then one {kind: result} item."""
        from berth.daemon import reference
        from berth.daemon.storage import registry

        ref = reference.parse(_str(p, "ref"))
        platform = _str(p, "platform", required=False)
        async with self._registry(ref, p) as client:
            image = await registry.pull(
                self.storage,
                ctx.namespace,
                ref,
                client,
                ctx.send_item,
                platform=images.parse_platform(platform) if platform else None,
                unpack=bool(p.get("unpack", True)),
                snapshotter=_str(p, "snapshotter", required=False) or None,
            )
        self.publish(ctx.namespace, "/images/create", {"name": image["name"]})
        await ctx.send_item(
            {"kind": "result", "name": image["name"], "digest": image["target"]["digest"]}
        )
        return STREAM_DONE

    async def images_push(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        from berth.daemon import reference
        from berth.daemon.storage import registry

        ref = reference.parse(_str(p, "ref"))
        local = _str(p, "local", required=False) or str(ref)
        platform = _str(p, "platform", required=False)
        async with self._registry(ref, p) as client:
            top = await registry.push(
                self.storage,
                ctx.namespace,
                local,
                ref,
                client,
                ctx.send_item,
                images.parse_platform(platform) if platform else None,
            )
        await ctx.send_item({"kind": "result", "name": str(ref), "digest": top["digest"]})
        return STREAM_DONE

    async def images_unpack(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        platform = _str(p, "platform", required=False)
        chain = await in_thread(
            self.storage.unpack,
            ctx.namespace,
            _str(p, "name"),
            _str(p, "snapshotter", required=False) or None,
            images.parse_platform(platform) if platform else None,
            ctx.lease,
        )
        return {"chain_id": chain}

    async def images_spec(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        """An OCI runtime spec for a container of an image (its config on safe defaults)."""

        def strings(key: str) -> list[str] | None:
            value = p.get(key)
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgument(f"{key} must be a list of strings")
            return value

        user = p.get("user")
        if user is not None and not isinstance(user, str):
            raise InvalidArgument("user must be a string")
        spec = await in_thread(
            self.storage.image_spec,
            ctx.namespace,
            _str(p, "image"),
            validate(p.get("id"), "container id"),
            snapshotter=_str(p, "snapshotter", required=False) or None,
            args=strings("args"),
            env=strings("env"),
            cwd=_str(p, "cwd", required=False) or None,
            user=user,
            terminal=bool(p.get("terminal")),
        )
        chain = await in_thread(self.storage.image_chain, ctx.namespace, _str(p, "image"))
        return {"spec": spec, "chain_id": chain}

    # -- snapshots ------------------------------------------------------------------------

    def _snap(self, p: dict[str, Any]) -> str | None:
        return _str(p, "snapshotter", required=False) or None

    async def _prepare(self, ctx: CallContext, p: dict[str, Any], *, view: bool) -> Any:
        mounts = await in_thread(
            self.storage.prepare,
            ctx.namespace,
            self._snap(p),
            _str(p, "key"),
            _str(p, "parent", required=False),
            check_labels(p.get("labels")),
            ctx.lease,
            view=view,
        )
        return {"mounts": [m.to_wire() for m in mounts]}

    async def snapshots_prepare(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return await self._prepare(ctx, p, view=False)

    async def snapshots_view(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return await self._prepare(ctx, p, view=True)

    async def snapshots_mounts(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        mounts = self.storage.snapshot_mounts(ctx.namespace, self._snap(p), _str(p, "key"))
        return {"mounts": [m.to_wire() for m in mounts]}

    async def snapshots_commit(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        await in_thread(
            self.storage.snapshot_commit,
            ctx.namespace,
            self._snap(p),
            _str(p, "name"),
            _str(p, "key"),
            check_labels(p.get("labels")),
            ctx.lease,
        )
        return {}

    async def snapshots_remove(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        snapshotter, key = self._snap(p), _str(p, "key")
        await in_thread(
            self.storage.freeing,
            lambda: self.storage.snapshot_remove(ctx.namespace, snapshotter, key),
        )
        return {}

    async def snapshots_stat(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self.storage.snapshot_info(ctx.namespace, self._snap(p), _str(p, "key"))

    async def snapshots_update(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return self.storage.snapshot_update(
            ctx.namespace, self._snap(p), _str(p, "key"), check_labels(p.get("labels"))
        )

    async def snapshots_usage(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return await in_thread(
            self.storage.snapshot_usage, ctx.namespace, self._snap(p), _str(p, "key")
        )

    async def snapshots_list(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        snapshots = self.storage.snapshot_list(ctx.namespace, self._snap(p))
        return paged("snapshots", snapshots, "key", p)

    # -- diff -----------------------------------------------------------------------------

    async def diff_apply(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        layer = Descriptor.from_wire(p.get("layer"))
        diff = await in_thread(
            self.storage.apply,
            ctx.namespace,
            layer,
            _mounts(p.get("mounts"), "mounts"),
            _str(p, "expected_diff_id", required=False),
        )
        return {"applied": diff.to_wire()}

    async def diff_diff(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        media_type = _str(p, "media_type", required=False) or images.OCI_LAYER_GZIP
        desc = await in_thread(
            self.storage.diff,
            ctx.namespace,
            _mounts(p.get("lower") or [], "lower"),
            _mounts(p.get("upper"), "upper"),
            media_type,
            check_labels(p.get("labels")),
            ctx.lease,
        )
        return {"diff": desc.to_wire()}

    # -- leases ---------------------------------------------------------------------------

    async def leases_create(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        lease_id = _str(p, "id", required=False) or f"lease-{time.time_ns()}"
        expire = p.get("expire_seconds", 0)
        if not isinstance(expire, (int, float)) or expire < 0:
            raise InvalidArgument("expire_seconds must be a non-negative number")
        labels = check_labels(p.get("labels"))
        expires_at = time.time_ns() + int(expire * 1e9) if expire else 0
        gc_expire = labels.get("containerd.io/gc.expire")  # containerd's label, RFC 3339
        if gc_expire and not expires_at:
            expires_at = _rfc3339_ns(gc_expire)
        return self.storage.store.create_lease(ctx.namespace, lease_id, labels, expires_at)

    async def leases_list(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return paged("leases", self.storage.store.list_leases(ctx.namespace), "id", p)

    async def leases_delete(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        lease_id = _str(p, "id")
        self.storage.freeing(lambda: self.storage.store.delete_lease(ctx.namespace, lease_id))
        await self._collect_after_delete(p)
        return {}

    async def leases_add_resource(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        self.storage.store.add_lease_resource(
            ctx.namespace, _str(p, "id"), _str(p, "kind"), _str(p, "key")
        )
        return {}

    async def leases_delete_resource(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        self.storage.store.delete_lease_resource(
            ctx.namespace, _str(p, "id"), _str(p, "kind"), _str(p, "key")
        )
        return {}

    async def leases_resources(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        resources = self.storage.store.lease_resources(ctx.namespace, _str(p, "id"))
        return {"resources": [{"kind": k, "key": v} for k, v in resources]}

    async def gc(self, ctx: CallContext, p: dict[str, Any]) -> Any:
        return (await self._gc()).to_wire()

    async def _gc(self) -> GCResult:
        """A collection (which may need the reserve on a full disk); the reserve is taken
        again afterwards if it was released and the collection freed enough."""
        protected = self.protected()
        result: GCResult = await in_thread(self.storage.freeing, lambda: self.storage.gc(protected))
        await in_thread(self.storage.reserve.restore)
        return result

    def protected(self) -> set[tuple[str, str]]:
        """Hook: snapshots the task service needs kept (set by the daemon)."""
        return set()


def _rfc3339_ns(text: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        raise InvalidArgument(f"invalid containerd.io/gc.expire {text!r}") from None
