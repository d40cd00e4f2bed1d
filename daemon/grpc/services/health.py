"""grpc.health.v1.Health, as engines probe containerd: SERVING while berthd answers."""

from __future__ import annotations

from typing import Any

from berth.daemon.grpc.services.base import Handler, Service


def _installed_methods() -> set[str]:
    from grpc_health.v1 import health_pb2

    return {m.name for m in health_pb2.DESCRIPTOR.services_by_name["Health"].methods}


class Health(Service):
    """Serves grpc.health.v1.Health."""

    # grpcio-health-checking's descriptor grew List in a recent release: list only the
    # unimplemented methods the installed one has (the binding checks the rest).
    UNIMPLEMENTED = {
        name: why
        for name, why in {
            "List": "berth-grpc has a single status, the whole server's, which Check answers",
            "Watch": "berth pushes no status changes: clients poll Check",
        }.items()
        if name in _installed_methods()
    }

    def methods(self) -> dict[str, Handler]:
        return {
            "Check": self.check,
        }

    async def check(self, request: Any, context: Any) -> Any:
        from grpc_health.v1 import health_pb2

        serving = await self.backend.healthy()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)
