"""containerd's Introspection service: the plugins containerd would list for what berth does,
so that clients probing for a snapshotter or the task runtime find them."""

from __future__ import annotations

import platform
from typing import Any

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.services.base import Call, Handler, Service, filters, unary


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
        platform = t.platform.Platform(os="linux", architecture=_arch())
        plugins = [
            ("io.containerd.content.v1", "content"),
            ("io.containerd.snapshotter.v1", "overlayfs"),
            ("io.containerd.snapshotter.v1", "native"),
            ("io.containerd.differ.v1", "walking"),
            ("io.containerd.metadata.v1", "bolt"),
            ("io.containerd.runtime.v2", "task"),
            ("io.containerd.grpc.v1", "containers"),
            ("io.containerd.grpc.v1", "content"),
            ("io.containerd.grpc.v1", "diff"),
            ("io.containerd.grpc.v1", "events"),
            ("io.containerd.grpc.v1", "images"),
            ("io.containerd.grpc.v1", "leases"),
            ("io.containerd.grpc.v1", "namespaces"),
            ("io.containerd.grpc.v1", "snapshots"),
            ("io.containerd.grpc.v1", "tasks"),
            ("io.containerd.grpc.v1", "version"),
            ("io.containerd.grpc.v1", "introspection"),
        ]
        docs = [{"type": kind, "id": pid, "platforms": [platform]} for kind, pid in plugins] + [
            {"type": "io.containerd.runc.v1", "id": p["id"]}
            for p in info.get("plugins", [])
            if p.get("type") == "runtime"
        ]
        keep = filters(request.filters)
        out = [
            t.introspection.Plugin(type=d["type"], id=d["id"], platforms=d.get("platforms", []))
            for d in docs
            if keep({"type": d["type"], "id": d["id"]})
        ]
        return t.introspection.PluginsResponse(plugins=out)


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
