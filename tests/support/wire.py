"""A raw grpcio client of berth's containerd socket for the gRPC tests (test_grpc_api,
test_containerd_compat, test_grpc_storage): calls by method path, message classes from
the same generated stubs berth-grpc serves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from berth.daemon.grpc import convert as capi
from berth.daemon.oci import default_spec
from tests.support.clients import grpc_address, grpc_daemon
from tests.support.helpers import Daemon

C = "/containerd.services.containers.v1.Containers/"
T = "/containerd.services.tasks.v1.Tasks/"


class Wire:
    """Raw calls on berth's containerd socket, message classes from the same stubs."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.namespace = daemon.namespace
        self.t = capi.types()
        self.channel = grpc.insecure_channel(f"unix:{grpc_address(daemon)}")

    def meta(self, namespace: str | None = "") -> list[tuple[str, str]]:
        ns = self.namespace if namespace == "" else namespace
        return [("containerd-namespace", ns)] if ns else []

    def unary(self, path: str, request: Any, response_cls: Any, namespace: str | None = "") -> Any:
        fn = self.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        return fn(request, metadata=self.meta(namespace), timeout=60)

    def subscribe(self, filters: list[str], namespace: str | None = "") -> Any:
        """An Events/Subscribe stream (grpcio's iterator of Envelopes; .cancel() ends it)."""
        fn = self.channel.unary_stream(
            "/containerd.services.events.v1.Events/Subscribe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=self.t.events.Envelope.FromString,
        )
        return fn(self.t.events.SubscribeRequest(filters=filters), metadata=self.meta(namespace))

    def code(self, path: str, request: Any, response_cls: Any, **kw: Any) -> Any:
        with pytest.raises(grpc.RpcError) as info:
            self.unary(path, request, response_cls, **kw)
        return info.value.code()


@contextlib.contextmanager
def served_wire() -> Iterator[Wire]:
    """A berthd with berth-grpc, and a Wire on it; both gone afterwards."""
    daemon = grpc_daemon()
    w = Wire(daemon)
    try:
        yield w
    finally:
        w.channel.close()
        daemon.cleanup()


def container_message(w: Wire, cid: str, args: list[str], spec_any: Any = None) -> Any:
    """A Containers message on berth's default rootfs (or the spec Any given)."""
    spec = default_spec(cid, w.namespace, args, root="")  # "": berth's default rootfs
    return w.t.containers.Container(
        id=cid,
        runtime=w.t.containers.Container.Runtime(name="io.containerd.runc.v2"),
        spec=spec_any or capi.json_any(capi.SPEC_TYPE, spec),
    )
