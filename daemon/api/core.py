"""berthd's API: the handlers behind each method of its socket.

Methods are `service.method`, mirroring containerd's services. Every call is scoped to a
namespace, taken from the request's `namespace` meta field ("default" when absent) and
validated before anything else looks at it.
"""

from __future__ import annotations

import os
import signal as signals
import time
import uuid
from typing import Any

import trio

from berth.daemon import __version__
from berth.daemon.config import Config
from berth.daemon.events import Exchange
from berth.daemon.metadata import Container, Store, check_labels
from berth.daemon.paging import paged
from berth.daemon.rpc import STREAM_DONE, CallContext, Handler
from berth.daemon.storage.service import Storage
from berth.daemon.tasks.service import TaskService
from berth.shim.fs import atomic_write
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from berth.shim.wire.names import validate
from berth.shim.wire.protocol import PROTOCOL_VERSION, Request

VERSION = __version__
DEFAULT_NAMESPACE = "default"


def namespace_of(req: Request) -> str:
    value = req.meta.get("namespace", DEFAULT_NAMESPACE)
    return validate(value, "namespace")


def _str(params: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = params.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArgument(f"{key} is required")
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"{key} must be a string")
    return value


def _int(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{key} must be an integer")
    return value


def _signal(value: Any) -> int:
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

    def handlers(self) -> dict[str, Handler]:
        table: dict[str, Handler] = {
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
        }
        for name in (
            "create",
            "start",
            "kill",
            "delete",
            "delete_process",
            "wait",
            "exec",
            "pids",
            "pause",
            "resume",
            "resize",
            "close_io",
            "metrics",
            "update",
            "get",
            "list",
        ):
            table[f"tasks.{name}"] = self._task_handler(getattr(self, f"task_{name}"))
        return table

    def _task_handler(self, fn: Handler) -> Handler:
        async def handler(ctx: CallContext, params: dict[str, Any]) -> Any:
            await self.recovered.wait()  # the task table is complete only after recovery
            return await fn(ctx, params)

        return handler

    # -- introspection

    async def version(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return {"version": VERSION, "revision": "", "protocol": PROTOCOL_VERSION}

    async def server(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return {
            "uuid": self.server_uuid,
            "pid": os.getpid(),
            "root": self.config.root,
            "state": self.config.state,
            "started_at": self.started_at,
            "recovered": self.recovered.is_set(),
        }

    async def plugins(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        runtimes = [
            {
                "type": "runtime",
                "id": e.name,
                "binary": e.binary,
                "default": e.name == self.config.default_runtime,
            }
            for e in self.config.runtimes.values()
        ]
        return {
            "plugins": [
                {"type": "metadata", "id": "sqlite"},
                {"type": "events", "id": "exchange"},
                {"type": "task", "id": "shim", "shim": "berth-shim"},
                *runtimes,
            ]
        }

    # -- namespaces

    async def namespaces_list(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return paged("namespaces", self.store.list_namespaces(), "name", params)

    async def namespaces_get(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return self.store.get_namespace(_str(params, "name"))

    async def namespaces_create(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        ns = self.store.create_namespace(_str(params, "name"), params.get("labels"))
        self.exchange.publish(
            ns["name"], "/namespaces/create", {"name": ns["name"], "labels": ns["labels"]}
        )
        return ns

    async def namespaces_update(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        ns = self.store.update_namespace(_str(params, "name"), check_labels(params.get("labels")))
        self.exchange.publish(
            ns["name"], "/namespaces/update", {"name": ns["name"], "labels": ns["labels"]}
        )
        return ns

    async def namespaces_delete(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        name = validate(_str(params, "name"), "namespace")
        await self.recovered.wait()
        if self.tasks.namespace_in_use(name):
            raise FailedPrecondition(f"namespace {name} still has tasks")
        self.store.delete_namespace(name)
        self.exchange.publish(name, "/namespaces/delete", {"name": name})
        return {}

    # -- containers

    async def containers_create(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        doc = params.get("container", params)
        if not isinstance(doc, dict):
            raise InvalidArgument("container must be a map")
        container_id = validate(doc.get("id"), "container id")
        spec = doc.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("process"), dict):
            raise InvalidArgument("spec must be an OCI runtime spec with a process")
        runtime = doc.get("runtime") or self.config.default_runtime
        options: dict[str, Any] = {}
        if isinstance(runtime, dict):
            options = runtime.get("options") or {}
            runtime = runtime.get("name") or self.config.default_runtime
        if not isinstance(runtime, str) or self.config.runtime_entry(runtime) is None:
            raise InvalidArgument(
                f"unknown runtime {runtime!r}; configured: {sorted(self.config.runtimes)}"
            )
        if not isinstance(options, dict):
            raise InvalidArgument("runtime options must be a map")
        snapshot_key = _str(doc, "snapshot_key", required=False)
        snapshotter = _str(doc, "snapshotter", required=False)
        if snapshot_key:
            self.storage.snapshotter(snapshotter or None)  # a known snapshotter, or an error
        container = self.store.create_container(
            Container(
                namespace=ctx.namespace,
                id=container_id,
                runtime=runtime,
                runtime_options=options,
                spec=spec,
                labels=check_labels(doc.get("labels")),
                image=_str(doc, "image", required=False),
                snapshotter=_str(doc, "snapshotter", required=False),
                snapshot_key=_str(doc, "snapshot_key", required=False),
            )
        )
        self.exchange.publish(
            ctx.namespace,
            "/containers/create",
            {"id": container.id, "image": container.image, "runtime": {"name": container.runtime}},
        )
        return container.to_wire()

    async def containers_get(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return self.store.get_container(ctx.namespace, _str(params, "id")).to_wire()

    async def containers_list(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        containers = [c.to_wire() for c in self.store.list_containers(ctx.namespace)]
        return paged("containers", containers, "id", params)

    async def containers_update(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        spec = params.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise InvalidArgument("spec must be a map")
        labels = params.get("labels")
        container = self.store.update_container(
            ctx.namespace,
            _str(params, "id"),
            labels=check_labels(labels) if labels is not None else None,
            spec=spec,
        )
        self.exchange.publish(ctx.namespace, "/containers/update", {"id": container.id})
        return container.to_wire()

    async def containers_delete(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        container_id = _str(params, "id")
        await self.recovered.wait()
        if self.tasks.has_task(ctx.namespace, container_id):
            raise FailedPrecondition(f"container {container_id} has a task; delete it first")
        container = self.store.get_container(ctx.namespace, container_id)
        self.storage.freeing(lambda: self.store.delete_container(ctx.namespace, container_id))
        if container.snapshot_key:
            # Its writable snapshot goes with it (a client may have removed it already).
            try:
                self.storage.freeing(
                    lambda: self.storage.snapshot_remove(
                        ctx.namespace, container.snapshotter or None, container.snapshot_key
                    )
                )
            except (NotFound, FailedPrecondition):
                pass
        self.exchange.publish(ctx.namespace, "/containers/delete", {"id": container_id})
        return {}

    # -- events

    async def events_subscribe(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        filters = params.get("filters") or []
        if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
            raise InvalidArgument("filters must be a list of strings")
        since = params.get("since")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
            raise InvalidArgument("since must be a timestamp in nanoseconds")
        sub = self.exchange.subscribe(filters, since)
        try:
            async for envelope in sub.receive:
                await ctx.send_item(envelope)
        finally:
            sub.close()
        if sub.overflowed:
            raise FailedPrecondition("event subscriber fell too far behind and was dropped")
        return STREAM_DONE

    # -- tasks

    def _cid(self, params: dict[str, Any]) -> str:
        return validate(params.get("container_id"), "container id")

    def _exec_id(self, params: dict[str, Any]) -> str | None:
        value = params.get("exec_id")
        if value in (None, ""):
            return None
        return validate(value, "exec id")

    async def task_create(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.create(ctx.namespace, self._cid(params), params)

    async def task_start(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.start(ctx.namespace, self._cid(params), self._exec_id(params))

    async def task_kill(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        await self.tasks.kill(
            ctx.namespace,
            self._cid(params),
            _signal(params.get("signal", 15)),
            bool(params.get("all", False)),
            self._exec_id(params),
        )
        return {}

    async def task_delete(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.delete(ctx.namespace, self._cid(params), bool(params.get("force")))

    async def task_delete_process(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        exec_id = self._exec_id(params)
        if exec_id is None:
            raise InvalidArgument("exec_id is required")
        return await self.tasks.delete_process(ctx.namespace, self._cid(params), exec_id)

    async def task_wait(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.wait(ctx.namespace, self._cid(params), self._exec_id(params))

    async def task_exec(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        exec_id = self._exec_id(params)
        if exec_id is None:
            raise InvalidArgument("exec_id is required")
        if not isinstance(params.get("spec"), dict):
            raise InvalidArgument("spec must be an OCI process")
        await self.tasks.exec(ctx.namespace, self._cid(params), exec_id, params)
        return {}

    async def task_pids(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(ctx.namespace, self._cid(params), "pids")

    async def task_pause(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(ctx.namespace, self._cid(params), "pause")

    async def task_resume(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(ctx.namespace, self._cid(params), "resume")

    async def task_resize(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(
            ctx.namespace,
            self._cid(params),
            "resize_pty",
            {
                "exec_id": self._exec_id(params) or "",
                "width": _int(params, "width", 0),
                "height": _int(params, "height", 0),
            },
        )

    async def task_close_io(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(
            ctx.namespace,
            self._cid(params),
            "close_io",
            {
                "exec_id": self._exec_id(params) or "",
                "stdin": bool(params.get("stdin", True)),
            },
        )

    async def task_metrics(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.simple(ctx.namespace, self._cid(params), "stats")

    async def task_update(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        resources = params.get("resources")
        if not isinstance(resources, dict):
            raise InvalidArgument("resources must be an OCI LinuxResources map")
        return await self.tasks.simple(
            ctx.namespace, self._cid(params), "update", {"resources": resources}
        )

    async def task_get(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return await self.tasks.get(ctx.namespace, self._cid(params), self._exec_id(params))

    async def task_list(self, ctx: CallContext, params: dict[str, Any]) -> Any:
        return paged("tasks", self.tasks.list(ctx.namespace), "id", params)
