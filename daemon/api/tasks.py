"""The task handlers: tasks and processes, onto the task service (berth.daemon.tasks).

Each one runs only once recovery is complete (schema: after_recovery): before that the
task table does not yet hold every task the state dir holds."""

from __future__ import annotations

from typing import Any

from berth.daemon import logs
from berth.daemon.api import schema
from berth.daemon.api.core import signal_number
from berth.daemon.api.routes import TypedHandler
from berth.daemon.metadata import Store
from berth.daemon.network.service import NetworkService
from berth.daemon.paging import paged
from berth.daemon.removals import Removals
from berth.daemon.rpc import CallContext
from berth.daemon.tasks.service import TaskService
from berth.shim.wire.errors import NotFound


class TaskApi:
    def __init__(
        self,
        tasks: TaskService,
        store: Store | None = None,
        networks: NetworkService | None = None,
        removals: Removals | None = None,
    ) -> None:
        self.tasks = tasks
        self.store = store
        self.networks = networks  # a container's later task gets its attachment again
        self.removals = removals  # a container being removed lists no task

    def handlers(self) -> dict[str, TypedHandler]:
        table: dict[str, TypedHandler] = {
            "tasks.create": self.create,
            "tasks.start": self.start,
            "tasks.kill": self.kill,
            "tasks.delete": self.delete,
            "tasks.delete_process": self.delete_process,
            "tasks.wait": self.wait,
            "tasks.exec": self.exec,
            "tasks.pids": self.pids,
            "tasks.pause": self.pause,
            "tasks.resume": self.resume,
            "tasks.resize": self.resize,
            "tasks.close_io": self.close_io,
            "tasks.metrics": self.metrics,
            "tasks.update": self.update,
            "tasks.get": self.get,
            "tasks.list": self.list,
            "tasks.shim_log": self.shim_log,
        }
        return {name: _about_the_task(self._unless_removed(fn)) for name, fn in table.items()}

    def _unless_removed(self, fn: TypedHandler) -> TypedHandler:
        """The handler, answering not found for the task of a container being removed
        (`run --rm` was told it is gone; berthd deletes the task itself)."""

        async def handler(ctx: CallContext, p: Any) -> Any:
            container_id = getattr(p, "container_id", "")
            removals = self.removals
            if (
                container_id
                and removals is not None
                and removals.hidden(ctx.namespace, container_id)
            ):
                raise NotFound(f"task {container_id} not found")
            return await fn(ctx, p)

        return handler

    async def create(self, ctx: CallContext, p: schema.TasksCreate) -> Any:
        if self.store is not None and self.networks is not None:
            labels = self.store.get_container(ctx.namespace, p.container_id).labels
            await self.networks.ensure(ctx.namespace, p.container_id, labels)
        return await self.tasks.create(ctx.namespace, p.container_id, p)

    async def start(self, ctx: CallContext, p: schema.TaskRef) -> Any:
        return await self.tasks.start(ctx.namespace, p.container_id, p.exec_id or None)

    async def kill(self, ctx: CallContext, p: schema.TasksKill) -> Any:
        signo = signal_number(p.signal)
        await self.tasks.kill(ctx.namespace, p.container_id, signo, p.all, p.exec_id or None)
        return {}

    async def delete(self, ctx: CallContext, p: schema.TasksDelete) -> Any:
        return await self.tasks.delete(ctx.namespace, p.container_id, p.force)

    async def delete_process(self, ctx: CallContext, p: schema.TaskProcess) -> Any:
        return await self.tasks.delete_process(ctx.namespace, p.container_id, p.exec_id)

    async def wait(self, ctx: CallContext, p: schema.TaskRef) -> Any:
        return await self.tasks.wait(ctx.namespace, p.container_id, p.exec_id or None)

    async def exec(self, ctx: CallContext, p: schema.TasksExec) -> Any:
        await self.tasks.exec(ctx.namespace, p.container_id, p.exec_id, p)
        return {}

    async def pids(self, ctx: CallContext, p: schema.ContainerTask) -> Any:
        return await self.tasks.pids(ctx.namespace, p.container_id)

    async def pause(self, ctx: CallContext, p: schema.ContainerTask) -> Any:
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "pause")

    async def resume(self, ctx: CallContext, p: schema.ContainerTask) -> Any:
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "resume")

    async def resize(self, ctx: CallContext, p: schema.TasksResize) -> Any:
        params = {"exec_id": p.exec_id or "", "width": p.width, "height": p.height}
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "resize_pty", params)

    async def close_io(self, ctx: CallContext, p: schema.TasksCloseIO) -> Any:
        params = {"exec_id": p.exec_id or "", "stdin": p.stdin}
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "close_io", params)

    async def metrics(self, ctx: CallContext, p: schema.ContainerTask) -> Any:
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "stats")

    async def update(self, ctx: CallContext, p: schema.TasksUpdate) -> Any:
        params = {"resources": p.resources}
        return await self.tasks.passthrough(ctx.namespace, p.container_id, "update", params)

    async def get(self, ctx: CallContext, p: schema.TaskRef) -> Any:
        return await self.tasks.get(ctx.namespace, p.container_id, p.exec_id or None)

    async def list(self, ctx: CallContext, p: schema.Paged) -> Any:
        tasks = self.tasks.list(ctx.namespace)
        if self.removals is not None:
            removals = self.removals
            tasks = [t for t in tasks if not removals.hidden(ctx.namespace, str(t["id"]))]
        return paged("tasks", tasks, "id", p.page)

    async def shim_log(self, ctx: CallContext, p: schema.TasksShimLog) -> Any:
        return await self.tasks.shim_log(ctx.namespace, p.container_id, p.tail)


def _about_the_task(fn: TypedHandler) -> TypedHandler:
    """The handler, with every line logged during its call (the request's own trio task,
    and the tasks it spawns: a new task's supervision) naming its namespace, container
    and exec."""

    async def handler(ctx: CallContext, p: Any) -> Any:
        container_id = getattr(p, "container_id", "")
        if container_id:
            logs.set_about(ctx.namespace, container_id, getattr(p, "exec_id", None) or "")
        return await fn(ctx, p)

    return handler
