"""berthd's API contract (daemon/api/schema.py) and its binding (daemon/api/routes.py):
every declared method has exactly one handler, every handler a declared method, and the
edge turns a malformed request into `invalid argument` naming the field. No root needed."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from berth.daemon.api import routes, schema
from berth.daemon.api.core import Api
from berth.daemon.api.network import NetworkApi
from berth.daemon.api.storage import StorageApi
from berth.daemon.api.tasks import TaskApi
from berth.daemon.rpc import CallContext
from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.protocol import Request


def tables() -> list[dict[str, routes.TypedHandler]]:
    # handlers() only names bound methods: the objects need no state for that
    return [
        Api.__new__(Api).handlers(),
        TaskApi.__new__(TaskApi).handlers(),
        StorageApi.__new__(StorageApi).handlers(),
        NetworkApi.__new__(NetworkApi).handlers(),
    ]


def test_every_method_is_bound_once_and_every_handler_declared() -> None:
    bound = routes.bind(tables(), trio.Event())
    assert set(bound) == set(schema.METHODS)
    for name, method in schema.METHODS.items():
        assert issubclass(method.params, schema.Params), name
        assert not (method.stream and method.reply is not None), name


def test_calls_repeated_after_a_dropped_connection_are_declared_and_change_nothing() -> None:
    from berth.shim.wire.client import LONG_CALLS, READ_ONLY_CALLS

    assert set(schema.METHODS) >= READ_ONLY_CALLS
    mutating = ("create", "update", "delete", "remove", "commit", "kill", "start", "exec")
    for name in READ_ONLY_CALLS:
        verb = name.rpartition(".")[2]
        assert not any(word in verb for word in mutating), name
        assert not schema.METHODS[name].stream, name
    assert {"tasks.wait"} <= READ_ONLY_CALLS & LONG_CALLS


def test_a_handler_of_no_method_or_a_method_without_handler_stops_the_binding() -> None:
    async def stray(ctx: CallContext, p: Any) -> Any:
        return {}

    with pytest.raises(RuntimeError, match="unknown"):
        routes.bind([*tables(), {"tasks.teleport": stray}], trio.Event())
    partial = tables()
    del partial[0]["version"]
    with pytest.raises(RuntimeError, match="unbound"):
        routes.bind(partial, trio.Event())
    with pytest.raises(RuntimeError, match="twice"):
        routes.bind([*tables(), {"version": stray}], trio.Event())


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("containers.get", {}, "id"),
        ("containers.get", {"id": "../etc"}, "$.id"),
        ("tasks.kill", {"container_id": "c1", "signal": [9]}, "$.signal"),
        ("content.read", {"digest": "sha256:xyz"}, "$.digest"),
        ("content.write.chunk", {"ref": "r", "data": "not bytes"}, "$.data"),
        ("images.export", {"path": "/x", "names": []}, "$.names"),
        ("leases.create", {"expire_seconds": -1}, "$.expire_seconds"),
        ("tasks.create", {"container_id": "c1", "log": "yes"}, "$.log"),
    ],
)
async def test_the_edge_answers_a_malformed_request_naming_the_field(
    method: str, params: dict[str, Any], field: str
) -> None:
    called = []

    async def handler(ctx: CallContext, p: Any) -> Any:
        called.append(p)
        return {}

    recovered = trio.Event()
    recovered.set()
    edge = routes._edge(method, schema.METHODS[method], handler, recovered)
    ctx = CallContext(Request(1, method, params), "default", 0, _no_items)
    with pytest.raises(InvalidArgument, match=field.replace("$", r"\$").replace(".", r"\.")):
        await edge(ctx, params)
    assert called == []


async def test_valid_requests_reach_the_handler_as_typed_records() -> None:
    seen: list[Any] = []

    async def handler(ctx: CallContext, p: Any) -> Any:
        seen.append(p)
        return {"pid": 1}

    recovered = trio.Event()
    recovered.set()
    edge = routes._edge("tasks.start", schema.METHODS["tasks.start"], handler, recovered)
    ctx = CallContext(Request(1, "tasks.start", {}), "default", 0, _no_items)
    await edge(ctx, {"container_id": "c1", "exec_id": "", "unknown": "ignored"})
    (p,) = seen
    assert isinstance(p, schema.TaskRef) and (p.container_id, p.exec_id) == ("c1", "")


async def _no_items(item: Any) -> None:
    raise AssertionError("no stream here")
