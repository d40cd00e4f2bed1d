"""berthd's API: the handlers behind each method of its socket.

Methods are `service.method`, mirroring containerd's services. Every call is scoped to a
namespace, taken from the request's `namespace` meta field ("default" when absent) and
validated before anything else looks at it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import signal as signals
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from berth.daemon import __version__
from berth.daemon.api import schema
from berth.daemon.api.routes import TypedHandler
from berth.daemon.config import Config
from berth.daemon.events import Exchange, check_topic
from berth.daemon.metadata import Container, Store, check_extensions, check_labels
from berth.daemon.network.service import NetworkService
from berth.daemon.paging import paged
from berth.daemon.removals import Removals
from berth.daemon.rpc import STREAM_DONE, CallContext
from berth.daemon.storage.service import Storage
from berth.daemon.tasks.service import TaskService
from berth.shim.fs import atomic_write
from berth.shim.wire.errors import BerthError, FailedPrecondition, InvalidArgument, NotFound
from berth.shim.wire.names import validate
from berth.shim.wire.protocol import PROTOCOL_VERSION, Request

VERSION = __version__
DEFAULT_NAMESPACE = "default"


log = logging.getLogger("berthd.api")


def namespace_of(req: Request) -> str:
    value = req.meta.get("namespace", DEFAULT_NAMESPACE)
    return validate(value, "namespace")


def _caller(ctx: CallContext, subject: str) -> str:
    """The namespace a namespace's create or update event is stamped with: the caller's,
    as containerd's (its events carry the namespace of the call's context); the
    subject's own when the caller named none (containerd would refuse to publish it). A
    delete's carries the deleted namespace, on containerd too."""
    return ctx.namespace if ctx.meta.get("namespace") else subject


def signal_number(value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signals.Signals[name])
        except KeyError:
            pass
    raise InvalidArgument(f"invalid signal {value!r}")


def load_server_uuid(root: str) -> str:
    path = os.path.join(root, "uuid")
    try:
        with open(path) as f:
            return str(uuid.UUID(f.read().strip()))
    except (OSError, ValueError):
        value = str(uuid.uuid4())
        atomic_write(path, f"{value}\n".encode())
        return value


class Api:
    """Version, introspection, namespaces, containers, events: the handlers that need
    nothing but the metadata store and the exchange (tasks: tasks.py, storage: storage.py)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        exchange: Exchange,
        tasks: TaskService,
        server_uuid: str,
        recovered: trio.Event,
        storage: Storage,
    ) -> None:
        self.config = config
        self.store = store
        self.storage = storage
        self.exchange = exchange
        self.tasks = tasks
        self.server_uuid = server_uuid
        self.recovered = recovered
        self.started_at = time.time_ns()
        self.networks: NetworkService | None = None  # set by berthd: attachments
        self.removals = Removals(config.root)  # berthd starts its task group (serve)

    def handlers(self) -> dict[str, TypedHandler]:
        return {
            "ping": self.ping,
            "version": self.version,
            "introspection.server": self.server,
            "introspection.plugins": self.plugins,
            "namespaces.list": self.namespaces_list,
            "namespaces.get": self.namespaces_get,
            "namespaces.create": self.namespaces_create,
            "namespaces.update": self.namespaces_update,
            "namespaces.delete": self.namespaces_delete,
            "containers.create": self.containers_create,
            "containers.get": self.containers_get,
            "containers.list": self.containers_list,
            "containers.update": self.containers_update,
            "containers.delete": self.containers_delete,
            "events.subscribe": self.events_subscribe,
            "events.publish": self.events_publish,
        }

    # -- introspection

    async def ping(self, ctx: CallContext, p: schema.Empty) -> Any:
        """A client's liveness check on a quiet long call."""
        return {}

    async def version(self, ctx: CallContext, p: schema.Empty) -> Any:
        return {"version": VERSION, "revision": "", "protocol": PROTOCOL_VERSION}

    async def server(self, ctx: CallContext, p: schema.Empty) -> Any:
        return {
            "uuid": self.server_uuid,
            "pid": os.getpid(),
            "root": self.config.root,
            "state": self.config.state,
            "started_at": self.started_at,
            "recovered": self.recovered.is_set(),
        }

    async def plugins(self, ctx: CallContext, p: schema.Empty) -> Any:
        runtimes = [
            {
                "type": "runtime",
                "id": e.name,
                "binary": e.binary,
                "default": e.name == self.config.default_runtime,
            }
            for e in self.config.runtimes.values()
        ]
        storage = [
            {"type": "content", "id": "content", "root": self.storage.content.root},
            *(
                {"type": "snapshotter", "id": name, "root": snapshotter.root}
                for name, snapshotter in sorted(self.storage.snapshotters.items())
            ),
        ]
        return {
            "plugins": [
                {"type": "metadata", "id": "sqlite", "path": self.config.db_path},
                {"type": "events", "id": "exchange"},
                {"type": "task", "id": "shim", "shim": "berth-shim"},
                *storage,
                *runtimes,
            ]
        }

    # -- namespaces

    async def namespaces_list(self, ctx: CallContext, p: schema.Paged) -> Any:
        return paged("namespaces", self.store.list_namespaces(), "name", p.page)

    async def namespaces_get(self, ctx: CallContext, p: schema.NamespaceName) -> Any:
        return self.store.get_namespace(p.name)

    async def namespaces_create(self, ctx: CallContext, p: schema.NamespaceLabels) -> Any:
        ns = self.store.create_namespace(p.name, p.labels)
        self.exchange.publish(
            _caller(ctx, ns["name"]),
            "/namespaces/create",
            {"name": ns["name"], "labels": ns["labels"]},
        )
        return ns

    async def namespaces_update(self, ctx: CallContext, p: schema.NamespaceLabels) -> Any:
        """Labels of a namespace, which the update creates if need be (as containerd's
        store does: a client sets a fresh namespace's default labels before anything)."""
        try:
            self.store.get_namespace(p.name)
        except NotFound:
            return await self.namespaces_create(ctx, p)
        ns = self.store.update_namespace(p.name, check_labels(p.labels))
        changed = ns["labels"] if p.changed is None else check_labels(p.changed)
        self.exchange.publish(
            _caller(ctx, ns["name"]), "/namespaces/update", {"name": ns["name"], "labels": changed}
        )
        return ns

    async def namespaces_delete(self, ctx: CallContext, p: schema.NamespaceName) -> Any:
        for container_id in self.removals.in_namespace(p.name):  # `run --rm`'s, say
            await self.removals.settled(p.name, container_id)
        if removing := self.removals.in_namespace(p.name):
            raise FailedPrecondition(
                f"namespace {p.name}: container(s) {', '.join(removing)} still being removed"
            )
        if self.tasks.namespace_in_use(p.name):
            raise FailedPrecondition(f"namespace {p.name} still has tasks")
        snapshots = tuple(
            f"snapshots on {s.name!r} snapshotter"
            for s in self.storage.snapshotters.values()
            if s.walk(p.name + "/")
        )
        self.store.delete_namespace(p.name, also_holds=snapshots)
        self.exchange.publish(p.name, "/namespaces/delete", {"name": p.name})  # as containerd
        return {}

    # -- containers

    async def containers_create(self, ctx: CallContext, p: schema.ContainersCreate) -> Any:
        doc: schema.ContainerFields = p.container or p
        if doc.id is None:
            raise InvalidArgument("container id is required")
        await self._settle_removal(ctx.namespace, doc.id)
        if doc.spec is None or not isinstance(doc.spec.get("process"), dict):
            raise InvalidArgument("spec must be an OCI runtime spec with a process")
        runtime, options = self._runtime(doc.runtime)
        if doc.snapshot_key:
            self.storage.snapshotter(doc.snapshotter or None)  # a known one, or an error
        container = self.store.create_container(
            Container(
                namespace=ctx.namespace,
                id=doc.id,
                runtime=runtime,
                runtime_options=options,
                spec=doc.spec,
                labels=check_labels(doc.labels),
                image=doc.image or "",
                snapshotter=doc.snapshotter or "",
                snapshot_key=doc.snapshot_key or "",
                extensions=check_extensions(doc.extensions),
            )
        )
        self.exchange.publish(
            ctx.namespace,
            "/containers/create",
            {
                "id": container.id,
                "image": container.image,
                "runtime": {"name": container.runtime, "options": container.runtime_options},
            },
        )
        return container.to_wire()

    def _runtime(self, runtime: str | schema.RuntimeRef | None) -> tuple[str, dict[str, Any]]:
        """(runtime name, options) of a create: a name, or {name, options}. Any name is
        recorded, as containerd records it: one this berthd has not configured fails the
        task's create, not the container's (so a client's own clean-up of a failed run,
        which deletes the container and its snapshot, finds them, as on containerd)."""
        options: dict[str, Any] = {}
        if isinstance(runtime, schema.RuntimeRef):
            name, options = runtime.name or "", runtime.options
        else:
            name = runtime or ""
        return name or self.config.default_runtime, options

    def _visible(self, namespace: str, container_id: str) -> Container:
        """A container as clients see it: one being removed is gone already."""
        if self.removals.hidden(namespace, container_id):
            raise NotFound(f"container {container_id} not found")
        return self.store.get_container(namespace, container_id)

    async def containers_get(self, ctx: CallContext, p: schema.ContainerId) -> Any:
        return self._visible(ctx.namespace, p.id).to_wire()

    async def containers_list(self, ctx: CallContext, p: schema.Paged) -> Any:
        containers = [
            c.to_wire()
            for c in self.store.list_containers(ctx.namespace)
            if not self.removals.hidden(ctx.namespace, c.id)
        ]
        return paged("containers", containers, "id", p.page)

    async def containers_update(self, ctx: CallContext, p: schema.ContainersUpdate) -> Any:
        self._visible(ctx.namespace, p.id)
        container = self.store.update_container(
            ctx.namespace,
            p.id,
            labels=check_labels(p.labels) if p.labels is not None else None,
            spec=p.spec,
            image=p.image,
            extensions=check_extensions(p.extensions) if p.extensions is not None else None,
            snapshot_key=p.snapshot_key,
        )
        self.exchange.publish(
            ctx.namespace,
            "/containers/update",  # containerd's ContainerUpdate: the container as updated
            {
                "id": container.id,
                "image": container.image,
                "labels": container.labels,
                "snapshot_key": container.snapshot_key,
            },
        )
        return container.to_wire()

    async def containers_delete(self, ctx: CallContext, p: schema.ContainersDelete) -> Any:
        namespace = ctx.namespace
        if self.removals.hidden(namespace, p.id):
            # Being removed (or a removal that failed): a delete waits for it, or tries it
            # again, and answers as the delete of a container that was there.
            await self._settle_removal(namespace, p.id)
            return {}
        container = self.store.get_container(namespace, p.id)
        if self.tasks.has_task(namespace, p.id):
            if not p.with_task:
                raise FailedPrecondition(f"container {p.id} has a task; delete it first")
            if not self.tasks.task_stopped(namespace, p.id):
                raise FailedPrecondition(f"container {p.id}: its task has not stopped")
        if p.background:
            if self.networks is not None:  # its ports and addresses are free when it answers
                await self.networks.detach(namespace, p.id)
            await self.removals.mark(namespace, p.id)  # durable: gone for clients from here
            self.removals.start((namespace, p.id), self.removal_of(namespace, p.id))
            return {}
        await self._remove(container, p.with_task)
        return {}

    async def _remove(self, container: Container, with_task: bool) -> None:
        """Delete the container (and its stopped task, if asked), its writable snapshot and
        its network attachment."""
        namespace, container_id = container.namespace, container.id
        if with_task and self.tasks.has_task(namespace, container_id):
            await self.tasks.delete(namespace, container_id, force=True)
        if self.tasks.has_task(namespace, container_id):
            raise FailedPrecondition(f"container {container_id} has a task; delete it first")
        self.storage.freeing(lambda: self.store.delete_container(namespace, container_id))
        if container.snapshot_key:
            # Its writable snapshot goes with it (a client may have removed it already).
            try:
                self.storage.freeing(
                    lambda: self.storage.snapshot_remove(
                        namespace, container.snapshotter or None, container.snapshot_key
                    )
                )
            except (NotFound, FailedPrecondition):
                pass
        if self.networks is not None:
            try:
                await self.networks.detach(namespace, container_id)
            except BerthError as exc:  # the container is gone: its attachment is swept later
                log.warning("container %s deleted; its network attachment: %s", container_id, exc)
        self.exchange.publish(namespace, "/containers/delete", {"id": container_id})

    async def _settle_removal(self, namespace: str, container_id: str) -> None:
        """Before a create or a delete: a removal of that ID under way is waited for; one
        that failed (or that a previous daemon left) is carried out now, once tasks are
        recovered (its task must be known to be deleted with it). The ID is free only once
        it succeeded."""
        await self.removals.settled(namespace, container_id)
        if self.removals.hidden(namespace, container_id):
            await self.recovered.wait()
            await self.removals.run(
                (namespace, container_id), self.removal_of(namespace, container_id)
            )
            if self.removals.hidden(namespace, container_id):
                raise FailedPrecondition(
                    f"container {container_id} is still being removed (see berthd's log)"
                )

    def finish_removals(self) -> int:
        """At start, once tasks are recovered: removals a previous daemon left unfinished."""
        pending = self.removals.pending()
        for key in pending:
            self.removals.start(key, self.removal_of(*key))
        return len(pending)

    def removal_of(self, namespace: str, container_id: str) -> Callable[[], Awaitable[None]]:
        """What finishes a marked removal: the container with its task, as recorded when it
        runs (nothing but the mark, if the record is gone already)."""

        async def remove() -> None:
            try:
                container = self.store.get_container(namespace, container_id)
            except NotFound:
                return
            await self._remove(container, True)

        return remove

    # -- events

    async def events_publish(self, ctx: CallContext, p: schema.EventsPublish) -> Any:
        """A client's own event, to the subscribers of the moment (events.py)."""
        check_topic(p.topic)
        # a forwarded envelope's namespace: any berth takes (as the call's own is checked)
        namespace = ctx.namespace if p.namespace is None else validate(p.namespace, "namespace")
        try:
            base64.b64decode(p.value, validate=True)
        except binascii.Error as exc:
            raise InvalidArgument(f"event value is not base64: {exc}") from None
        self.exchange.publish_for_client(
            namespace, p.topic, {"type_url": p.type_url, "value": p.value}, p.timestamp
        )
        return {}

    async def events_subscribe(self, ctx: CallContext, p: schema.EventsSubscribe) -> Any:
        sub = self.exchange.subscribe(
            p.filters, p.since, p.after_seq, p.epoch, with_published=p.with_published
        )
        try:
            async for envelope in sub.receive:
                await ctx.send_item(envelope)
        finally:
            sub.close()
        if sub.overflowed:
            raise FailedPrecondition("event subscriber fell too far behind and was dropped")
        return STREAM_DONE
