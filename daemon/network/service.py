"""`NetworkService`: a container's network attachments as berthd keeps them.

An attachment set is an object like a snapshot: created for a container ID (a network
namespace pinned under `<state>/netns/`, then CNI ADD on each network asked for, as eth0,
eth1, ...), listed, deleted (DEL in reverse, the namespace unpinned). Its record,
`<state>/networks/<namespace>/<id>.json`, is written durably before the first plugin runs
and after each network, so whatever a crash interrupts is found again: `reconcile` (run
once recovery is done) releases every attachment whose container has no live task and
every half-made one. The CNI side is berth.daemon.network.cni, the namespaces
berth.daemon.network.netns; this module only orders them and keeps the records.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.daemon.network import cni, links, netns
from berth.shim.fs import atomic_write
from berth.shim.wire.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("berthd.network")

RECORD_VERSION = 1
DEFAULT_NETWORK = "bridge"
MANAGED_PREFIX = "berth-"  # `berth network create NAME` writes <conf_dir>/berth-NAME.conflist
CREATED_SUBNETS = ipaddress.ip_network("10.78.0.0/16")  # /24s for networks made without one
MAX_NETWORKS = 8  # interfaces per container
PROTOCOLS = ("tcp", "udp", "sctp")
ETC_FILES = ("hosts", "hostname", "resolv.conf")
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")  # Docker's, when the host has only local ones


@dataclass(frozen=True)
class NetworkSettings:
    conf_dir: str = "/etc/cni/net.d"
    plugin_dirs: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
    default_subnet: str = "10.77.0.0/24"
    default_bridge: str = "berth0"
    ipam_dir: str = ""  # host-local's dataDir for the default network ("": <state>/cni/networks)


@dataclass
class AttachmentSet:
    namespace: str
    container_id: str
    netns: str
    attachments: list[cni.Attachment] = field(default_factory=list)
    complete: bool = False  # every network ADDed
    releasing: bool = False  # a release began (and, if the record is still here, failed)
    saved_at: float = 0.0  # when the record was last written (time.time())
    labels: dict[str, str] = field(default_factory=dict)  # the client's, as a snapshot's

    def to_doc(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "namespace": self.namespace,
            "container_id": self.container_id,
            "netns": self.netns,
            "complete": self.complete,
            "releasing": self.releasing,
            "saved_at": self.saved_at,
            "labels": self.labels,
            "attachments": [a.to_doc() for a in self.attachments],
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AttachmentSet:
        return cls(
            namespace=str(doc["namespace"]),
            container_id=str(doc["container_id"]),
            netns=str(doc["netns"]),
            attachments=[cni.Attachment.from_doc(a) for a in doc.get("attachments") or []],
            complete=bool(doc.get("complete")),
            releasing=bool(doc.get("releasing")),
            saved_at=float(doc.get("saved_at") or 0.0),
            labels={str(k): str(v) for k, v in (doc.get("labels") or {}).items()},
        )

    def to_wire(self, files_dir: str = "") -> dict[str, Any]:
        """What a client sees: per network its interface, addresses and ports; the
        files to bind-mount at /etc/hosts, /etc/hostname and /etc/resolv.conf."""
        files = {}
        if files_dir and os.path.isdir(files_dir):
            files = {f"/etc/{name}": os.path.join(files_dir, name) for name in ETC_FILES}
        return {
            "container_id": self.container_id,
            "netns": self.netns,
            "complete": self.complete,
            "labels": self.labels,
            "files": files,
            "networks": [
                {
                    "network": a.network["name"],
                    "interface": a.ifname,
                    "addresses": a.addresses(),
                    "gateways": _gateways(a.result),
                    "mac": _mac(a.result, a.ifname),
                    "ports": a.capability_args.get("portMappings") or [],
                }
                for a in self.attachments
            ],
        }


def _gateways(result: dict[str, Any] | None) -> list[str]:
    return [ip["gateway"] for ip in (result or {}).get("ips") or [] if ip.get("gateway")]


def _mac(result: dict[str, Any] | None, ifname: str) -> str:
    for interface in (result or {}).get("interfaces") or []:
        if interface.get("name") == ifname and interface.get("sandbox"):
            return str(interface.get("mac") or "")
    return ""


def resolv_conf(host_text: str, dns: dict[str, Any] | None) -> str:
    """The container's resolv.conf: the host's, without nameservers on loopback (they
    do not answer inside the container's namespace); the network's DNS, or Docker's
    fallback, when none is left."""
    lines, servers = [], []
    for line in host_text.splitlines():
        words = line.split()
        if words[:1] == ["nameserver"] and len(words) > 1:
            if not words[1].startswith(("127.", "::1")):
                servers.append(words[1])
            continue
        lines.append(line)
    servers = servers or list((dns or {}).get("nameservers") or FALLBACK_NAMESERVERS)
    return "\n".join([*lines, *(f"nameserver {s}" for s in servers)]) + "\n"


def check_ips(ips: list[str]) -> list[str]:
    """Addresses a container asks for, as CIDRs (`10.77.0.9/24`; a bare address is not
    enough for host-local, which matches it against its ranges by subnet)."""
    out = []
    for text in ips:
        try:
            interface = ipaddress.ip_interface(text)
        except ValueError:
            raise InvalidArgument(f"ip {text!r} is not an address") from None
        if "/" not in text:
            raise InvalidArgument(f"ip {text!r}: give the prefix length too (e.g. {text}/24)")
        out.append(str(interface))
    return out


def check_ports(mappings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """portmap's `portMappings` from berth's {host_port, container_port, protocol,
    host_ip}; InvalidArgument for anything else."""
    out = []
    for m in mappings:
        host, inner = m.get("host_port"), m.get("container_port")
        protocol = m.get("protocol") or "tcp"
        if not all(isinstance(p, int) and 0 < p < 65536 for p in (host, inner)):
            raise InvalidArgument(f"port mapping {m!r}: ports must be 1-65535")
        if protocol not in PROTOCOLS:
            raise InvalidArgument(f"port mapping {m!r}: protocol must be one of {PROTOCOLS}")
        entry: dict[str, Any] = {"hostPort": host, "containerPort": inner, "protocol": protocol}
        if m.get("host_ip"):
            entry["hostIP"] = str(m["host_ip"])
        out.append(entry)
    return out


Port = tuple[str, int, str]  # (protocol, host port, host IP: "" for every address)
_ANY = ("", "0.0.0.0", "::")


def _ports_clash(a: Port, b: Port) -> bool:
    """Whether two published ports take the same host socket: same protocol and number,
    and the same host address or either one on every address (as Docker decides)."""
    return a[:2] == b[:2] and (a[2] == b[2] or a[2] in _ANY or b[2] in _ANY)


def _port_text(port: Port) -> str:
    return f"{port[2] + ':' if port[2] else ''}{port[1]}/{port[0]}"


def _check_port_free(protocol: str, port: int, host_ip: str) -> None:
    """AlreadyExists when a host socket holds `port` (a listener, or a bound UDP socket):
    a bind that fails with EADDRINUSE says so (SCTP is not checked)."""
    kinds = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}
    if protocol not in kinds:
        return
    family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
    with socket.socket(family, kinds[protocol]) as probe:
        if protocol == "tcp":  # a port whose connections linger in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host_ip or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AlreadyExists(
                    f"host port {port}/{protocol} is in use by a process on the host"
                ) from None
            if exc.errno != errno.EADDRNOTAVAIL:  # an address not (yet) on the host: fine
                raise InvalidArgument(f"host port {host_ip}:{port}/{protocol}: {exc}") from None


def host_routes(path: str = "/proc/net/route") -> list[ipaddress.IPv4Network]:
    """The IPv4 destinations the host routes (not the default route): a subnet berth
    picks must not shadow one of them (another bridge, a VPN, the LAN), as Docker checks."""
    found: list[ipaddress.IPv4Network] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            # the kernel prints the addresses as host-order integers in hex
            destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, sys.byteorder))
            mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, sys.byteorder))
            network = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
        except ValueError:
            continue
        if network.prefixlen:
            found.append(network)
    return found


def _choose_subnet(
    text: str, gateway: str, taken: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The subnet asked for, checked; or the first /24 of CREATED_SUBNETS no network has."""
    if text:
        try:
            subnet = ipaddress.ip_network(text)
        except ValueError as exc:
            raise InvalidArgument(f"subnet {text!r}: {exc}") from None
        if subnet.num_addresses < 4:
            raise InvalidArgument(f"subnet {subnet} is too small for a gateway and a container")
    else:
        taken = [*taken, *host_routes()]
        free = [
            s
            for s in CREATED_SUBNETS.subnets(new_prefix=24)
            if not any(s.overlaps(t) for t in taken if t.version == 4)
        ]
        if not free:
            raise FailedPrecondition(f"no free /24 left in {CREATED_SUBNETS}: give --subnet")
        subnet = free[0]
    if gateway:
        try:
            address = ipaddress.ip_address(gateway)
        except ValueError as exc:
            raise InvalidArgument(f"gateway {gateway!r}: {exc}") from None
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise InvalidArgument(f"gateway {gateway} is not a host address of {subnet}")
    return str(subnet)


Publish = Callable[[str, str, dict[str, Any]], object]  # (namespace, topic, event)
ORPHAN_GRACE = 120.0  # seconds an attachment may wait for its container to be created
# A container's label with the attachment it asked for ({networks, ports, ips}, JSON): its
# later tasks get it again (the first is released when that task exits).
REQUEST_LABEL = "berth.network/request"


@dataclass(frozen=True)
class Usage:
    """What the task service knows, as reconcile asks it."""

    container_exists: Callable[[str, str], bool]
    task_exited: Callable[[str, str], bool]  # it had a task, and that task is stopped


def _why_release(attached: AttachmentSet, usage: Usage) -> str:
    """Why `attached` should go now ("" to keep it)."""
    if attached.releasing:
        return "a release that failed before"
    if not attached.complete:
        return "left half-made"
    namespace, container_id = attached.namespace, attached.container_id
    if usage.container_exists(namespace, container_id):
        return "its task exited" if usage.task_exited(namespace, container_id) else ""
    if time.time() - attached.saved_at > ORPHAN_GRACE:
        return "its container is gone"
    return ""


class NetworkService:
    def __init__(
        self,
        settings: NetworkSettings,
        state_dir: str,
        publish: Publish | None = None,
    ) -> None:
        self.settings = settings
        self.publish: Publish = publish or (lambda namespace, topic, event: None)
        self.plugins = cni.Plugins(list(settings.plugin_dirs))
        self.netns_dir = os.path.join(state_dir, "netns")
        self.records_dir = os.path.join(state_dir, "networks")
        # host-local's leases live beside the records that free them: in the state dir,
        # which a reboot empties together with every namespace and veth they were for.
        self.ipam_dir = settings.ipam_dir or os.path.join(state_dir, "cni", "networks")
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        # Attachment calls wait for the first reconcile: it must not release what a call
        # is making (api/network.py waits on it).
        self.ready = trio.Event()
        self._dir_prepared = False
        self._networks_lock = trio.Lock()  # one network create/delete at a time
        self._attaching: dict[str, int] = {}  # network name -> ADDs under way
        self._claimed_ports: dict[Port, str] = {}  # being published -> by whom

    # -- networks

    def networks(self) -> dict[str, cni.Network]:
        """The configured networks, and `bridge` (berth's default) unless one has that
        name."""
        found = cni.load_networks(self.settings.conf_dir)
        if DEFAULT_NETWORK not in found:
            found[DEFAULT_NETWORK] = cni.default_bridge(
                DEFAULT_NETWORK,
                self.settings.default_bridge,
                self.settings.default_subnet,
                self.ipam_dir,
            )
        return found

    async def create_network(
        self,
        name: str,
        subnet: str = "",
        gateway: str = "",
        labels: dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> cni.Network:
        """A new network, written as `<conf_dir>/berth-NAME.conflist`: the given config
        list, or a bridge like `bridge` on `subnet` (the first free /24 of 10.78.0.0/16
        when none is given). Nothing is written unless every plugin it names exists and
        its subnets overlap no other network's."""
        async with self._networks_lock:
            known = self.networks()
            if name in known:
                raise AlreadyExists(
                    f"network {name} already exists ({known[name].source or 'berthd'})"
                )
            taken = [(n, s) for n in known.values() for s in cni.subnets(n)]
            if config is not None:
                network = cni.parse_network({**config, "berth": {}}, "config")
                if network.name != name:
                    raise InvalidArgument(f"config names network {network.name!r}, not {name!r}")
            else:
                network = cni.default_bridge(
                    name,
                    "br-" + hashlib.sha256(name.encode()).hexdigest()[:12],  # 15: IFNAMSIZ-1
                    _choose_subnet(subnet, gateway, [s for _, s in taken]),
                    self.ipam_dir,
                    gateway,
                )
            for plugin in network.plugins:
                self.plugins.find(str(plugin["type"]))
            for mine in cni.subnets(network):
                for other, theirs in taken:
                    if mine.version == theirs.version and mine.overlaps(theirs):
                        raise InvalidArgument(
                            f"subnet {mine} overlaps network {other.name}'s {theirs}"
                        )
            doc = {**network.to_doc(), "berth": {"labels": dict(labels or {})}}
            path = os.path.join(self.settings.conf_dir, f"{MANAGED_PREFIX}{name}.conflist")
            os.makedirs(self.settings.conf_dir, mode=0o755, exist_ok=True)
            atomic_write(path, json.dumps(doc, indent=2).encode() + b"\n", mode=0o644)
            self.publish("", "/networks/create", {"name": name, "source": path})
            log.info("network: %s created (%s)", name, path)
            return cni.parse_network(doc, path)

    async def delete_network(self, name: str) -> None:
        """Remove a network `create_network` made: refused while any container is
        attached to it (or being attached), for berthd's default and for config files
        berth did not write. Its bridge link goes with it (the bridge plugin leaves it)."""
        async with self._networks_lock:
            network = self.networks().get(name)
            if network is None:
                raise NotFound(f"network {name} not found")
            if not network.source:
                raise FailedPrecondition(
                    f"network {name} is berthd's default; it cannot be removed"
                )
            if not network.managed:
                raise FailedPrecondition(
                    f"network {name} comes from {network.source}, which berth did not "
                    "write: remove that file instead"
                )
            users = [
                f"{a.namespace}/{a.container_id}"
                for a in self._all()
                if any(x.network.get("name") == name for x in a.attachments)
            ]
            if users or self._attaching.get(name):
                raise FailedPrecondition(
                    f"network {name} is in use by {', '.join(users) or 'an attachment being made'}"
                )
            os.unlink(network.source)  # no await since the checks: no attach slips between
            bridges = {
                str(p["bridge"])
                for p in network.plugins
                if p.get("type") == "bridge" and p.get("bridge")
            }
            still_used = {str(p.get("bridge")) for n in self.networks().values() for p in n.plugins}
            for bridge in sorted(bridges - still_used):
                await trio.to_thread.run_sync(links.delete, bridge)
            self.publish("", "/networks/delete", {"name": name})
            log.info("network: %s removed (%s)", name, network.source)

    # -- attachments

    @contextlib.asynccontextmanager
    async def _locked(self, namespace: str, container_id: str) -> AsyncIterator[None]:
        """One operation at a time per container; the lock is dropped once nobody holds
        or waits for it (containers come and go: the table must not grow with them)."""
        key = (namespace, container_id)
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)

    def _record_path(self, namespace: str, container_id: str) -> str:
        return os.path.join(self.records_dir, namespace, f"{container_id}.json")

    def files_dir(self, namespace: str, container_id: str) -> str:
        return os.path.join(self.records_dir, namespace, f"{container_id}.etc")

    def _write_files(self, attached: AttachmentSet) -> None:
        """hosts, hostname and resolv.conf for the container (bind-mounted by the
        client, as Docker and nerdctl do), from its first network's address."""
        directory = self.files_dir(attached.namespace, attached.container_id)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        first = attached.attachments[0]
        address = first.addresses()[0].split("/")[0] if first.addresses() else ""
        name = attached.container_id[:63]
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        if address:
            hosts += f"{address}\t{name}\n"
        try:
            with open("/etc/resolv.conf") as f:
                host_resolv = f.read(1 << 16)
        except OSError:
            host_resolv = ""
        contents = {
            "hosts": hosts,
            "hostname": name + "\n",
            "resolv.conf": resolv_conf(host_resolv, (first.result or {}).get("dns")),
        }
        for filename, text in contents.items():
            atomic_write(os.path.join(directory, filename), text.encode(), mode=0o644)

    def _save(self, attached: AttachmentSet) -> None:
        attached.saved_at = time.time()
        path = self._record_path(attached.namespace, attached.container_id)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, json.dumps(attached.to_doc()).encode())

    def get(self, namespace: str, container_id: str) -> AttachmentSet:
        try:
            with open(self._record_path(namespace, container_id), "rb") as f:
                return AttachmentSet.from_doc(json.loads(f.read(1 << 22)))
        except FileNotFoundError:
            raise NotFound(f"container {container_id} has no network attachment") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(
                f"attachment record of {container_id} is damaged: {exc}"
            ) from None

    def in_namespace(self, namespace: str) -> list[AttachmentSet]:
        directory = os.path.join(self.records_dir, namespace)
        found = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith(".json"):
                try:
                    found.append(self.get(namespace, name[: -len(".json")]))
                except (NotFound, InvalidArgument):
                    continue
        return found

    async def attach(
        self,
        namespace: str,
        container_id: str,
        names: list[str],
        ports: list[dict[str, Any]],
        ips: list[str] | None = None,
        labels: dict[str, str] | None = None,
    ) -> AttachmentSet:
        """Pin a namespace for the container and ADD each network, in order; a failure
        undoes everything (no half-made attachment is left). `ips`: the addresses asked
        for on the first network (CNI's `ips` capability: its plugins must declare it)."""
        names = names or [DEFAULT_NETWORK]
        chosen = check_ips(ips or [])
        if len(names) > MAX_NETWORKS or len(set(names)) != len(names):
            raise InvalidArgument(f"networks {names}: at most {MAX_NETWORKS}, each once")
        mappings = check_ports(ports)
        known = self.networks()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise NotFound(f"unknown network(s) {unknown}; known: {sorted(known)}")
        claimed = self._claim_ports(namespace, container_id, mappings)  # no await before it
        for name in names:  # counted before any await: delete_network sees them
            self._attaching[name] = self._attaching.get(name, 0) + 1
        try:
            return await self._attach(
                namespace, container_id, names, known, mappings, chosen, labels or {}
            )
        finally:
            for port in claimed:
                del self._claimed_ports[port]
            for name in names:
                self._attaching[name] -= 1
                if not self._attaching[name]:
                    del self._attaching[name]

    def _claim_ports(
        self, namespace: str, container_id: str, mappings: list[dict[str, Any]]
    ) -> list[Port]:
        """Refuse a host port another attachment publishes (or is publishing), twice in one
        request, or that a host process holds (the DNAT rule would silently take its
        traffic: Docker's proxy would fail to bind); else claim it until the record that
        publishes it is written. Synchronous: nothing else runs between check and claim."""
        wanted: list[Port] = []
        for m in mappings:
            port = (str(m["protocol"]), int(m["hostPort"]), str(m.get("hostIP") or ""))
            if any(_ports_clash(port, other) for other in wanted):
                raise InvalidArgument(f"host port {_port_text(port)} is published twice")
            wanted.append(port)
        if not wanted:
            return []
        me = f"{namespace}/{container_id}"
        owners = list(self._claimed_ports.items())
        for attached in self._all():
            owner = f"{attached.namespace}/{attached.container_id}"
            if owner == me:  # its own earlier attachment (being released): not a clash
                continue
            for attachment in attached.attachments[:1]:  # ports go with the first network
                for m in attachment.capability_args.get("portMappings") or []:
                    other = (
                        str(m.get("protocol")),
                        int(m.get("hostPort") or 0),
                        str(m.get("hostIP") or ""),
                    )
                    owners.append((other, owner))
        for port in wanted:
            for other, owner in owners:
                if _ports_clash(port, other):
                    raise AlreadyExists(
                        f"host port {_port_text(port)} is already published by {owner}"
                    )
        for protocol, number, host_ip in wanted:
            _check_port_free(protocol, number, host_ip)
        for port in wanted:
            self._claimed_ports[port] = me
        return wanted

    async def _attach(
        self,
        namespace: str,
        container_id: str,
        names: list[str],
        known: dict[str, cni.Network],
        mappings: list[dict[str, Any]],
        chosen: list[str],
        labels: dict[str, str],
    ) -> AttachmentSet:
        async with self._locked(namespace, container_id):
            if os.path.exists(self._record_path(namespace, container_id)):
                previous = self.get(namespace, container_id)
                if not previous.releasing:
                    raise AlreadyExists(f"container {container_id} already has network attachments")
                await self._release(previous, "a release that failed before")
                if os.path.exists(self._record_path(namespace, container_id)):
                    raise AlreadyExists(
                        f"container {container_id}: its previous attachments cannot be "
                        "released yet (see berthd's log)"
                    )
            # The digest names it to the plugins and pins its namespace: IDs may contain
            # `-`, so "namespace-id" could name two containers (host-local's leases and
            # portmap's chains are keyed by it).
            digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()[:24]
            attached = AttachmentSet(
                namespace, container_id, os.path.join(self.netns_dir, digest), labels=labels
            )
            self._save(attached)  # first: a crash from here on is found and undone
            try:
                if not self._dir_prepared:
                    await trio.to_thread.run_sync(netns.prepare_dir, self.netns_dir)
                    self._dir_prepared = True
                await trio.to_thread.run_sync(netns.create, attached.netns)
                for i, name in enumerate(names):
                    capability_args: dict[str, Any] = {}
                    if mappings:
                        capability_args["portMappings"] = mappings
                    if chosen and i == 0:
                        capability_args["ips"] = chosen
                    attachment = cni.Attachment(
                        network=known[name].to_doc(),
                        container_id=digest,
                        netns=attached.netns,
                        ifname=f"eth{i}",
                        capability_args=capability_args,
                    )
                    attached.attachments.append(attachment)
                    self._save(attached)
                    await cni.add(self.plugins, attachment)
                    self._save(attached)
                self._write_files(attached)
                attached.complete = True
                self._save(attached)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._release(attached, "its creation failed")
                raise
            event = attached.to_wire()
            del event["files"]
            self.publish(namespace, "/networks/attach", event)
            log.info(
                "network: %s/%s attached to %s (%s)",
                namespace,
                container_id,
                ", ".join(names),
                attached.netns,
            )
            return attached

    async def ensure(self, namespace: str, container_id: str, labels: dict[str, str]) -> None:
        """Attach a container again, as its REQUEST_LABEL asks, before another task of
        it is created (its namespace path, named by digest, is the one in its spec)."""
        text = labels.get(REQUEST_LABEL)
        if not text:
            return
        try:
            request = json.loads(text)
            names, ports, ips = request["networks"], request["ports"], request.get("ips", [])
            if not all(isinstance(x, list) for x in (names, ports, ips)):
                raise TypeError("not lists")
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"label {REQUEST_LABEL} of {container_id}: {exc}") from None
        await self.ready.wait()
        # The release of the previous task's attachment (on its exit) may be under way:
        # its record stays until the namespace is gone. Decide once it has ended, or the
        # new task would be given the path of a namespace about to be removed (a test saw
        # `runc create`: "namespace path: lstat ...: no such file or directory").
        async with self._locked(namespace, container_id):
            if self._live(namespace, container_id):
                return
        try:
            await self.attach(namespace, container_id, names, ports, ips)
        except AlreadyExists:
            if not os.path.exists(self._record_path(namespace, container_id)):
                raise  # a port another container publishes: the task cannot have it
            # else attached meanwhile

    def _live(self, namespace: str, container_id: str) -> bool:
        """Whether the container has an attachment that is not being released."""
        if not os.path.exists(self._record_path(namespace, container_id)):
            return False
        try:
            return not self.get(namespace, container_id).releasing
        except NotFound:
            return False

    async def detach(self, namespace: str, container_id: str) -> bool:
        """DEL every network and unpin the namespace; False if there was nothing. A
        failed release raises nothing: its record stays, marked, and is retried (by
        `retry_releases` and by the next attach of that ID)."""
        if not os.path.exists(self._record_path(namespace, container_id)):
            return False  # most containers have no network: no lock, no work
        async with self._locked(namespace, container_id):
            try:
                attached = self.get(namespace, container_id)
            except NotFound:
                return False
            await self._release(attached, "detached")
            return True

    async def _release(self, attached: AttachmentSet, why: str) -> None:
        """DEL (reverse order; each DEL runs even if another failed) and unpin; the record
        goes only once everything did (else it stays, marked `releasing`, and is retried)."""
        if not attached.releasing:
            attached.releasing = True
            self._save(attached)
        failed = None
        for attachment in reversed(attached.attachments):
            try:
                await cni.delete(self.plugins, attachment)
            except Exception as exc:  # any failure: kept, reported, retried by reconcile
                failed = failed or exc
        await trio.to_thread.run_sync(netns.remove, attached.netns)
        if failed is not None:
            log.warning(
                "network: releasing %s/%s (%s) failed: %s",
                attached.namespace,
                attached.container_id,
                why,
                failed,
            )
            return
        shutil.rmtree(self.files_dir(attached.namespace, attached.container_id), True)
        try:
            os.unlink(self._record_path(attached.namespace, attached.container_id))
        except FileNotFoundError:
            pass
        self.publish(
            attached.namespace,
            "/networks/detach",
            {"container_id": attached.container_id, "reason": why},
        )
        log.info("network: %s/%s released (%s)", attached.namespace, attached.container_id, why)

    async def _check(self, attached: AttachmentSet) -> None:
        """CNI CHECK of a kept attachment: a problem is logged (the container keeps what
        it has; an operator decides), never acted on blindly."""
        if not netns.is_pinned(attached.netns):
            log.warning(
                "network: %s/%s: its namespace %s is gone",
                attached.namespace,
                attached.container_id,
                attached.netns,
            )
            return
        for attachment in attached.attachments:
            try:
                await cni.check(self.plugins, attachment)
            except Exception as exc:  # reported, never fatal
                log.warning(
                    "network: %s/%s: CHECK of %s: %s",
                    attached.namespace,
                    attached.container_id,
                    attachment.network["name"],
                    exc,
                )

    def _all(self) -> list[AttachmentSet]:
        namespaces = os.listdir(self.records_dir) if os.path.isdir(self.records_dir) else []
        return [a for ns in sorted(namespaces) for a in self.in_namespace(ns)]

    async def reconcile(self, usage: Usage) -> int:
        """Release what nobody needs: what was being released (a release that failed:
        retried), what never finished attaching (a crash mid-ADD), what belongs to a
        task that exited, and what belongs to no container once ORPHAN_GRACE has passed
        (a client attaches before it creates the container: a fresh one is kept). Each
        record is read again under its lock: a stale copy is never released. berthd runs
        it once recovery is complete (`start`) and now and then after."""
        released = 0
        for seen in self._all():
            async with self._locked(seen.namespace, seen.container_id):
                try:
                    attached = self.get(seen.namespace, seen.container_id)
                except NotFound:
                    continue
                why = _why_release(attached, usage)
                if why:
                    await self._release(attached, why)
                    released += 1
        return released

    async def start(self, usage: Usage) -> int:
        """The first reconcile, before any attachment call is served (`ready`), then a
        CHECK of what is kept."""
        try:
            released = await self.reconcile(usage)
        finally:
            self.ready.set()
        for attached in self._all():
            await self._check(attached)
        return released
