"""containerd's Introspection service: the plugins containerd 1.6 lists for the parts berth
has, so that clients probing for a snapshotter or the task runtime find them as there."""

from __future__ import annotations

import platform
from typing import Any

from berth.daemon.filters import adapt_mapping
from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, object_filters, unary


class Introspection(Service):
    """Serves containerd.services.introspection.v1.Introspection."""

    def methods(self) -> dict[str, Handler]:
        return {
            "Server": self.server,
            "Plugins": self.plugins,
        }

    @unary
    async def server(self, request: Any, call: Call) -> Any:
        info = await self.backend.call("introspection.server", {})
        return capi.types().introspection.ServerResponse(uuid=info.get("uuid", ""))

    @unary
    async def plugins(self, request: Any, call: Call) -> Any:
        t = capi.types()
        info = await self.backend.call("introspection.plugins", {})
        here = [t.platform.Platform(os="linux", architecture=_arch())]
        roots = {(p.get("type"), p.get("id")): p.get("root") for p in info.get("plugins", [])}
        out = []
        for kind, pid, requires, on_platform in PLUGINS:
            exports = {}
            if kind == "io.containerd.content.v1" and roots.get(("content", pid)):
                exports["root"] = roots[("content", pid)]
            if kind == SNAPSHOTTER:
                if ("snapshotter", pid) not in roots:
                    continue  # not one this berthd has
                if pid == "overlayfs":  # containerd's native exports nothing
                    exports["root"] = roots[("snapshotter", pid)]
            plugin = t.introspection.Plugin(
                type=kind,
                id=pid,
                requires=list(requires),
                platforms=here if on_platform else [],
                exports=exports,
            )
            out.append(plugin)
        keep = object_filters(request.filters, adapt_mapping)
        return t.introspection.PluginsResponse(
            plugins=[p for p in out if keep({"type": p.type, "id": p.id})]
        )


SNAPSHOTTER = "io.containerd.snapshotter.v1"
_EVENTS, _METADATA, _SERVICE = (
    "io.containerd.event.v1",
    "io.containerd.metadata.v1",
    "io.containerd.service.v1",
)
# What containerd 1.6 lists (`ctr plugins ls`, in its order) for the parts berth has: type,
# id, the types it requires, and whether it names the platform it runs on. Snapshotters
# are listed only as this berthd has them; overlayfs' and the content store's roots are
# exported as containerd exports its own (clients locate their files by them).
PLUGINS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("io.containerd.content.v1", "content", (), False),
    (SNAPSHOTTER, "native", (), True),
    (SNAPSHOTTER, "overlayfs", (), True),
    (_METADATA, "bolt", ("io.containerd.content.v1", SNAPSHOTTER), False),
    ("io.containerd.differ.v1", "walking", (_METADATA,), True),
    (_EVENTS, "exchange", (), False),
    ("io.containerd.gc.v1", "scheduler", (_METADATA,), False),
    (_SERVICE, "introspection-service", (), False),
    (_SERVICE, "containers-service", (_EVENTS, _METADATA), False),
    (_SERVICE, "content-service", (_EVENTS, _METADATA), False),
    (_SERVICE, "diff-service", ("io.containerd.differ.v1",), False),
    (_SERVICE, "images-service", (_METADATA, "io.containerd.gc.v1"), False),
    (_SERVICE, "leases-service", (_METADATA,), False),
    (_SERVICE, "namespaces-service", (_EVENTS, _METADATA), False),
    (_SERVICE, "snapshots-service", (_EVENTS, _METADATA), False),
    ("io.containerd.runtime.v1", "linux", (_EVENTS, _METADATA), True),  # its runtime name
    ("io.containerd.runtime.v2", "task", (_EVENTS, _METADATA), True),
    ("io.containerd.monitor.v1", "cgroups", (_EVENTS,), True),
    (
        _SERVICE,
        "tasks-service",
        (
            _EVENTS,
            "io.containerd.runtime.v1",
            "io.containerd.runtime.v2",
            _METADATA,
            "io.containerd.monitor.v1",
        ),
        False,
    ),
    *(
        ("io.containerd.grpc.v1", name, (_EVENTS,) if name == "events" else (_SERVICE,), False)
        for name in ("introspection", "containers", "content", "diff", "events")
    ),
    ("io.containerd.grpc.v1", "healthcheck", (), False),
    *(
        ("io.containerd.grpc.v1", name, (_SERVICE,), False)
        for name in ("images", "leases", "namespaces", "snapshots", "tasks")
    ),
    ("io.containerd.grpc.v1", "version", (), False),
)


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
