"""berth-grpc's binding to containerd's service descriptors, checked without a daemon: every
method of every service it serves is bound to a handler or listed as deliberately
unimplemented, every table entry names a real method, and a mismatch stops start-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from berth.daemon.grpc import convert as capi
from berth.daemon.grpc.calls import StatusCode
from berth.daemon.grpc.services import (
    SERVICES,
    Backend,
    BindingError,
    Service,
    bind,
    descriptors,
    routes,
)
from berth.daemon.grpc.services.tasks import Tasks

# What berth-grpc served before its handlers were bound by explicit tables (computed from
# the old name-formatting binding): the contract this test keeps.
BOUND = {
    "containerd.services.version.v1.Version": {"Version"},
    "containerd.services.introspection.v1.Introspection": {"Plugins", "Server"},
    "containerd.services.namespaces.v1.Namespaces": {"Get", "List", "Create", "Update", "Delete"},
    "containerd.services.events.v1.Events": {"Publish", "Forward", "Subscribe"},
    "containerd.services.leases.v1.Leases": {
        "Create",
        "Delete",
        "List",
        "AddResource",
        "DeleteResource",
        "ListResources",
    },
    "containerd.services.containers.v1.Containers": {
        "Get",
        "List",
        "ListStream",
        "Create",
        "Update",
        "Delete",
    },
    "containerd.services.tasks.v1.Tasks": {
        "Create",
        "Start",
        "Delete",
        "DeleteProcess",
        "Get",
        "List",
        "Kill",
        "Exec",
        "ResizePty",
        "CloseIO",
        "Pause",
        "Resume",
        "ListPids",
        "Update",
        "Metrics",
        "Wait",
    },
    "containerd.services.content.v1.Content": {
        "Info",
        "Update",
        "List",
        "Delete",
        "Read",
        "Status",
        "ListStatuses",
        "Write",
        "Abort",
    },
    "containerd.services.images.v1.Images": {"Get", "List", "Create", "Update", "Delete"},
    "containerd.services.snapshots.v1.Snapshots": {
        "Prepare",
        "View",
        "Mounts",
        "Commit",
        "Remove",
        "Stat",
        "Update",
        "List",
        "Usage",
        "Cleanup",
    },
    "containerd.services.diff.v1.Diff": {"Apply", "Diff"},
    "grpc.health.v1.Health": {"Check"},
}

UNIMPLEMENTED = {
    "containerd.services.tasks.v1.Tasks": {"Checkpoint"},
    "grpc.health.v1.Health": {"List", "Watch"},
}


def _services() -> Iterator[tuple[Any, Service]]:
    backend = Backend("/nonexistent/berthd.sock")  # never dialled: nothing here calls it
    for descriptor, cls in descriptors():
        yield descriptor, cls(backend)


class _Aborted(Exception):
    pass


class _Context:
    """The part of grpc.aio's servicer context a handler touches before it answers."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("containerd-namespace", "contract"),)

    async def abort(self, code: Any, details: str) -> None:
        raise _Aborted(code, details)


def test_served_services_are_containerds_and_health() -> None:
    served = {descriptor.full_name for descriptor, _ in descriptors()}
    assert served == {*SERVICES, "grpc.health.v1.Health"}
    assert served == set(BOUND)


def test_every_descriptor_method_is_bound_or_deliberately_unimplemented() -> None:
    for descriptor, service in _services():
        declared = {method.name for method in descriptor.methods}
        bound = set(service.methods())
        unimplemented = set(service.UNIMPLEMENTED)
        where = descriptor.full_name
        assert bound | unimplemented == declared, where
        assert not bound & unimplemented, where
        assert all(why.strip() for why in service.UNIMPLEMENTED.values()), where


def test_no_table_entry_names_a_method_the_descriptor_lacks() -> None:
    for descriptor, service in _services():
        declared = {method.name for method in descriptor.methods}
        assert set(service.methods()) <= declared, descriptor.full_name
        assert set(service.UNIMPLEMENTED) <= declared, descriptor.full_name


def test_bound_and_unimplemented_are_what_berth_served_before() -> None:
    bound = {d.full_name: set(s.methods()) for d, s in _services()}
    unimplemented = {d.full_name: set(s.UNIMPLEMENTED) for d, s in _services()}
    assert bound == BOUND
    assert {name: names for name, names in unimplemented.items() if names} == UNIMPLEMENTED


def test_handlers_answer_as_their_descriptor_says() -> None:
    """A unary handler on a streaming method (or the reverse) is refused at binding."""
    for descriptor, service in _services():
        table = bind(descriptor, service)
        assert set(table) == {method.name for method in descriptor.methods}
        for method in descriptor.methods:
            handler = table[method.name]
            assert handler.client_streaming == method.client_streaming
            assert handler.server_streaming == method.server_streaming


def test_routes_bind_every_method_of_every_service() -> None:
    table = routes(Backend("/nonexistent/berthd.sock"))
    assert {service for service, _ in table} == set(BOUND)
    for descriptor, _ in descriptors():
        for method in descriptor.methods:
            assert (descriptor.full_name, method.name) in table


def test_unimplemented_methods_answer_unimplemented() -> None:
    async def ask(handler: Any) -> tuple[Any, str]:
        with pytest.raises(_Aborted) as info:
            if handler.server_streaming:
                async for _ in handler.handler(None, _Context()):
                    pass
            else:
                await handler.handler(None, _Context())
        code, details = info.value.args
        return code, details

    for descriptor, service in _services():
        table = bind(descriptor, service)
        for name in service.UNIMPLEMENTED:
            code, details = asyncio.run(ask(table[name]))
            assert code == StatusCode.UNIMPLEMENTED
            assert details == f"{descriptor.full_name}/{name} is not implemented by berth"


def _tasks() -> Any:
    return capi.types().tasks.DESCRIPTOR.services_by_name["Tasks"]


def test_a_method_in_neither_table_stops_start_up() -> None:
    descriptor = _tasks()

    class Forgetful(Tasks):
        def methods(self) -> dict[str, Any]:
            table = dict(super().methods())
            del table["Wait"]
            return table

    with pytest.raises(BindingError, match="Wait: neither bound nor listed"):
        bind(descriptor, Forgetful(Backend("unused")))


def test_a_table_entry_naming_no_method_stops_start_up() -> None:
    descriptor = _tasks()

    class Misspelt(Tasks):
        def methods(self) -> dict[str, Any]:
            table = dict(super().methods())
            table["Wiat"] = table.pop("Wait")
            return table

    with pytest.raises(BindingError, match="Wiat: no such method"):
        bind(descriptor, Misspelt(Backend("unused")))

    class Overlisted(Tasks):
        UNIMPLEMENTED = {**Tasks.UNIMPLEMENTED, "Restore": "no such method in containerd"}

    with pytest.raises(BindingError, match="Restore: no such method"):
        bind(descriptor, Overlisted(Backend("unused")))


def test_a_method_both_bound_and_unimplemented_stops_start_up() -> None:
    descriptor = _tasks()

    class Undecided(Tasks):
        UNIMPLEMENTED = {**Tasks.UNIMPLEMENTED, "Wait": "both"}

    with pytest.raises(BindingError, match="Wait: bound and listed as unimplemented"):
        bind(descriptor, Undecided(Backend("unused")))


def test_a_handler_of_the_wrong_shape_stops_start_up() -> None:
    descriptor = _tasks()

    class Confused(Tasks):
        def methods(self) -> dict[str, Any]:
            table = dict(super().methods())
            table["Wait"] = self.stream_of_nothing
            return table

        async def stream_of_nothing(self, request: Any, context: Any) -> AsyncIterator[Any]:
            return
            yield

    with pytest.raises(BindingError, match="Wait: the descriptor answers a single message"):
        bind(descriptor, Confused(Backend("unused")))
