"""The network handlers: CNI networks and containers' attachments to them, onto
berth.daemon.network (primitives a CLI or a CRI layer composes: attach before the
container is created, put the returned namespace path in its spec, delete with it)."""

from __future__ import annotations

from typing import Any

import msgspec

from berth.daemon.api import schema
from berth.daemon.api.routes import TypedHandler
from berth.daemon.metadata import check_labels
from berth.daemon.network.cni import Network, subnets
from berth.daemon.network.service import NetworkService
from berth.daemon.paging import paged
from berth.daemon.removals import Removals
from berth.daemon.rpc import CallContext
from berth.shim.wire.errors import FailedPrecondition


def _network_doc(network: Network) -> dict[str, Any]:
    return {
        **network.to_doc(),
        "source": network.source or "berthd's default",
        "managed": network.managed,
        "labels": network.labels,
        "subnets": [str(subnet) for subnet in subnets(network)],
    }


class NetworkApi:
    def __init__(self, networks: NetworkService, removals: Removals | None = None) -> None:
        self.service = networks
        self.removals = removals  # an attachment for an ID being removed waits for it

    def handlers(self) -> dict[str, TypedHandler]:
        return {
            "networks.list": self.networks,
            "networks.create": self.create_network,
            "networks.delete": self.delete_network,
            "attachments.create": self.create,
            "attachments.get": self.get,
            "attachments.list": self.list,
            "attachments.delete": self.delete,
        }

    async def networks(self, ctx: CallContext, p: schema.Empty) -> Any:
        found = self.service.networks()
        return {"networks": [_network_doc(n) for _, n in sorted(found.items())]}

    async def create_network(self, ctx: CallContext, p: schema.NetworksCreate) -> Any:
        made = await self.service.create_network(p.name, p.subnet, p.gateway, p.labels, p.config)
        return _network_doc(made)

    async def delete_network(self, ctx: CallContext, p: schema.NetworkRef) -> Any:
        await self.service.delete_network(p.name)
        return {}

    async def create(self, ctx: CallContext, p: schema.AttachmentsCreate) -> Any:
        await self.service.ready.wait()  # the first reconcile must not release it
        if self.removals is not None:  # the removal's detach must not release this one
            await self.removals.settled(ctx.namespace, p.container_id)
            if self.removals.hidden(ctx.namespace, p.container_id):
                raise FailedPrecondition(
                    f"container {p.container_id} is still being removed (see berthd's log)"
                )
        ports = [msgspec.structs.asdict(m) for m in p.ports]
        attached = await self.service.attach(
            ctx.namespace, p.container_id, p.networks, ports, p.ips, check_labels(p.labels)
        )
        return attached.to_wire(self.service.files_dir(ctx.namespace, p.container_id))

    async def get(self, ctx: CallContext, p: schema.AttachmentRef) -> Any:
        attached = self.service.get(ctx.namespace, p.container_id)
        return attached.to_wire(self.service.files_dir(ctx.namespace, p.container_id))

    async def list(self, ctx: CallContext, p: schema.Paged) -> Any:
        items = [
            a.to_wire(self.service.files_dir(ctx.namespace, a.container_id))
            for a in self.service.in_namespace(ctx.namespace)
        ]
        return paged("attachments", items, "container_id", p.page)

    async def delete(self, ctx: CallContext, p: schema.AttachmentRef) -> Any:
        return {"released": await self.service.detach(ctx.namespace, p.container_id)}
