"""containerd's v1 gRPC services on top of berthd's own API: one module per service, each a
class translating containerd's messages into calls to berthd and back; `base` holds what
they share (the berthd backend, the caller's headers, the error-code wrappers). Nothing
keeps state beyond open streams, so both sockets show the same objects.

The service modules may import `base`, `convert`, `client` and berth's pure leaves, never
each other; only this file imports them all, to bind them by each class's literal tables.
A descriptor method in neither `methods()` nor `UNIMPLEMENTED`, or an entry naming no
method, stops start-up: a silent UNIMPLEMENTED would hide a typo.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import message_factory

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.calls import Route, StatusCode
from berth.daemon.grpc.services.base import Backend, Handler, Service
from berth.daemon.grpc.services.containers import Containers
from berth.daemon.grpc.services.content import Content
from berth.daemon.grpc.services.diff import Diff
from berth.daemon.grpc.services.events import Events
from berth.daemon.grpc.services.health import Health
from berth.daemon.grpc.services.images import Images
from berth.daemon.grpc.services.introspection import Introspection
from berth.daemon.grpc.services.leases import Leases
from berth.daemon.grpc.services.namespaces import Namespaces
from berth.daemon.grpc.services.snapshots import Snapshots
from berth.daemon.grpc.services.tasks import Tasks
from berth.daemon.grpc.services.version import Version

__all__ = [
    "SERVICES",
    "Backend",
    "BindingError",
    "Service",
    "bind",
    "descriptors",
    "routes",
]

SERVICES: dict[str, tuple[str, type[Service]]] = {
    # service full name -> (its stubs' module attribute on capi.types(), the class serving it)
    "containerd.services.version.v1.Version": ("version", Version),
    "containerd.services.introspection.v1.Introspection": ("introspection", Introspection),
    "containerd.services.namespaces.v1.Namespaces": ("namespaces", Namespaces),
    "containerd.services.events.v1.Events": ("events", Events),
    "containerd.services.leases.v1.Leases": ("leases", Leases),
    "containerd.services.containers.v1.Containers": ("containers", Containers),
    "containerd.services.tasks.v1.Tasks": ("tasks", Tasks),
    "containerd.services.content.v1.Content": ("content", Content),
    "containerd.services.images.v1.Images": ("images", Images),
    "containerd.services.snapshots.v1.Snapshots": ("snapshots", Snapshots),
    "containerd.services.diff.v1.Diff": ("diff", Diff),
}


class BindingError(Exception):
    """A service's tables and its descriptor disagree: a bug of berth, found at start-up."""


def descriptors() -> list[tuple[Any, type[Service]]]:
    """Every service berth-grpc serves: its descriptor, and the class serving it."""
    from grpc_health.v1 import health_pb2

    t = capi.types()
    found = [
        (getattr(t, module).DESCRIPTOR.services_by_name[full_name.rpartition(".")[2]], cls)
        for full_name, (module, cls) in SERVICES.items()
    ]
    found.append((health_pb2.DESCRIPTOR.services_by_name["Health"], Health))
    return found


def bind(descriptor: Any, service: Service) -> dict[str, Route]:
    """containerd's method name -> its route, for one service; a `BindingError` if the
    service's tables and the descriptor disagree."""
    return {method.name: _route(method, fn) for method, fn in _checked(descriptor, service)}


def _checked(descriptor: Any, service: Service) -> list[tuple[Any, Handler]]:
    """Each method of the descriptor with the function that answers it (its handler, or
    an UNIMPLEMENTED answer); a `BindingError` if the tables and the descriptor disagree."""
    implemented = service.methods()
    unimplemented = service.UNIMPLEMENTED
    named = implemented.keys() | unimplemented.keys()
    declared = {method.name for method in descriptor.methods}
    both = implemented.keys() & unimplemented.keys()
    problems = [f"{n}: bound and listed as unimplemented" for n in both]
    problems += [f"{n}: no such method in the descriptor" for n in named - declared]
    problems += [f"{n}: neither bound nor listed as unimplemented" for n in declared - named]
    table = []
    for method in descriptor.methods:
        fn = implemented.get(method.name)
        if fn is None:
            fn = _unimplemented(descriptor.full_name, method.name, method.server_streaming)
        elif inspect.isasyncgenfunction(fn) != method.server_streaming:
            shape = "a stream" if method.server_streaming else "a single message"
            problems.append(f"{method.name}: the descriptor answers {shape}, its handler does not")
        table.append((method, fn))
    if problems:
        raise BindingError(f"{descriptor.full_name}: " + "; ".join(sorted(problems)))
    return table


def routes(backend: Backend, server_uuid: str = "") -> dict[tuple[str, str], Route]:
    """(service, method) -> its route, for every service: what both the gRPC socket and
    the ttrpc socket serve, so they answer alike."""
    table = {}
    for descriptor, cls in descriptors():
        for name, route in bind(descriptor, cls(backend, server_uuid)).items():
            table[(descriptor.full_name, name)] = route
    return table


def _unimplemented(service: str, method: str, streaming_response: bool) -> Handler:
    message = f"{service}/{method} is not implemented by berth"

    if streaming_response:

        async def stream_handler(request: Any, context: Any) -> AsyncIterator[Any]:
            await context.abort(StatusCode.UNIMPLEMENTED, message)
            yield None  # pragma: no cover - abort raises

        return stream_handler

    async def handler(request: Any, context: Any) -> Any:
        await context.abort(StatusCode.UNIMPLEMENTED, message)

    return handler


def _route(method: Any, fn: Handler) -> Route:
    return Route(
        request_cls=message_factory.GetMessageClass(method.input_type),
        handler=fn,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )
