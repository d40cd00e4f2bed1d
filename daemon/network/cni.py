"""The runtime side of CNI (container network interface, spec 1.0).

A network is a config list (`.conflist`; a single-plugin `.conf` is read as a list of one)
from a conf dir; its plugins are executables found by `type` in the plugin dirs. For ADD
they run in order, each given the previous one's result as `prevResult`; DEL runs them in
reverse and CHECK in order, both with the final ADD result, which the runtime must keep:
libcni keeps it under /var/lib/cni/results, berth in the attachment record its caller
stores durably (`Attachment`, JSON). A plugin gets its command and the container in the
environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH, CNI_ARGS), its
config on stdin, and answers a result or an error (`code`, `msg`, `details`) as JSON on
stdout. DEL must succeed for what is already gone, so a DEL may always be repeated.

Capabilities (`portMappings`, `ips`, ...) reach only the plugins that declare them, as
`runtimeConfig`. Spec 1.0 has no GC or STATUS (Debian 12's plugins stop at 1.0.0): what
berth attached it remembers itself, and releases on recovery.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from berth.shim.wire.errors import (
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

CNI_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0")
PLUGIN_TIMEOUT = 60.0  # seconds a plugin may take (an ADD can wait on IPAM locks)
MAX_CONFIG = 1 << 20
MAX_OUTPUT = 4 << 20

# CNI's well-known error codes -> berth's kinds (100+ are the plugin's own)
_ERROR_KINDS: dict[int, type[BerthError]] = {
    1: InvalidArgument,  # incompatible CNI version
    2: InvalidArgument,  # unsupported field in network configuration
    3: NotFound,  # container unknown or does not exist
    4: InvalidArgument,  # invalid necessary environment variables
    6: InvalidArgument,  # failed to decode content
    7: InvalidArgument,  # invalid network config
    11: Unavailable,  # try again later
}


@dataclass(frozen=True)
class Network:
    """A network config list as loaded."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: str = ""  # the file it came from ("" for one given inline)
    # Written by `berth network create` (its top-level "berth" key, ignored by libcni and
    # the plugins, as nerdctl keeps "nerdctlLabels"): only such a network is removable.
    managed: bool = False
    labels: dict[str, str] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": list(self.plugins)}


def parse_network(doc: Any, source: str = "") -> Network:
    """A `.conflist` document (or a `.conf`: one plugin), checked; InvalidArgument naming
    the source and the field otherwise."""
    where = source or "network config"
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: not a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"{where}: `name` must be a plain non-empty string")
    version = doc.get("cniVersion", CNI_VERSION)
    if version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(f"{where}: cniVersion {version!r} is not one of {SUPPORTED_VERSIONS}")
    plugins = doc.get("plugins")
    if plugins is None and "type" in doc:  # a .conf: the document is the one plugin
        plugins = [{k: v for k, v in doc.items() if k not in ("name", "cniVersion")}]
    if not isinstance(plugins, list) or not plugins:
        raise InvalidArgument(f"{where}: `plugins` must be a non-empty list")
    for i, plugin in enumerate(plugins):
        kind = plugin.get("type") if isinstance(plugin, dict) else None
        if not isinstance(kind, str) or not kind or "/" in kind:
            raise InvalidArgument(f"{where}: plugins[{i}] needs a plain `type`")
    berth = doc.get("berth")
    managed = isinstance(berth, dict)
    labels = berth.get("labels") if isinstance(berth, dict) else None
    if not isinstance(labels, dict):
        labels = {}
    labels = {str(k): str(v) for k, v in labels.items()}
    return Network(name, version, tuple(plugins), source, managed, labels)


def subnets(network: Network) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The subnets a network's IPAM hands out (host-local's `ranges`, or its older
    `subnet`); what cannot be read is skipped (a plugin of its own may say it otherwise)."""
    found = []
    for plugin in network.plugins:
        ipam = plugin.get("ipam")
        if not isinstance(ipam, dict):
            continue
        texts = [ipam.get("subnet")]
        for range_set in ipam.get("ranges") or []:
            for item in range_set if isinstance(range_set, list) else []:
                texts.append(item.get("subnet") if isinstance(item, dict) else None)
        for text in texts:
            if isinstance(text, str):
                try:
                    found.append(ipaddress.ip_network(text, strict=False))
                except ValueError:
                    continue
    return found


def load_networks(conf_dir: str) -> dict[str, Network]:
    """Every network of a conf dir by name: files in lexical order, the first of a name
    wins (as libcni reads them); an unreadable or malformed file is an error naming it."""
    networks: dict[str, Network] = {}
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return networks
    for filename in names:
        if not filename.endswith((".conflist", ".conf", ".json")):
            continue
        path = os.path.join(conf_dir, filename)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG + 1)
        except OSError as exc:
            raise InvalidArgument(f"{path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG:
            raise InvalidArgument(f"{path}: larger than {MAX_CONFIG} bytes")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise InvalidArgument(f"{path}: not JSON: {exc}") from None
        network = parse_network(doc, path)
        networks.setdefault(network.name, network)
    return networks


def default_bridge(
    name: str = "bridge",
    bridge: str = "berth0",
    subnet: str = "10.77.0.0/24",
    data_dir: str = "",
    gateway: str = "",
) -> Network:
    """The network berth creates when none is configured (as nerdctl's `bridge`), and the
    shape of those `berth network create` makes: a Linux bridge with the host as gateway
    and NAT out, host-local addresses, published ports."""
    address_range: dict[str, Any] = {"subnet": subnet}
    if gateway:
        address_range["gateway"] = gateway
    ipam: dict[str, Any] = {"type": "host-local", "ranges": [[address_range]]}
    ipam["routes"] = [{"dst": "0.0.0.0/0"}]
    if data_dir:
        ipam["dataDir"] = data_dir
    plugins = (
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": True,
            "ipam": ipam,
            "capabilities": {"ips": True},  # a chosen address (host-local reads it)
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    )
    return Network(name, CNI_VERSION, plugins)


@dataclass
class Attachment:
    """One container's attachment to one network: what DEL and CHECK need, kept by the
    caller durably before the first plugin runs (a crash mid-ADD is then undone)."""

    network: dict[str, Any]  # the config list as used (the conf file may change later)
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str] = field(default_factory=dict)  # CNI_ARGS
    capability_args: dict[str, Any] = field(default_factory=dict)  # e.g. portMappings
    result: dict[str, Any] | None = None  # the final ADD result, once ADD completed

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Attachment:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    def addresses(self) -> list[str]:
        """The CIDR addresses the ADD result gave (empty before it completes)."""
        ips = (self.result or {}).get("ips") or []
        return [ip["address"] for ip in ips if isinstance(ip, dict) and "address" in ip]


class Plugins:
    """The plugin executables: found by `type` in `dirs` (CNI_PATH)."""

    def __init__(self, dirs: list[str]) -> None:
        self.dirs = dirs

    def find(self, kind: str) -> str:
        for directory in self.dirs:
            path = os.path.join(directory, kind)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        raise InvalidArgument(f"CNI plugin {kind!r} not found in {':'.join(self.dirs)}")

    async def run(
        self, command: str, plugin: dict[str, Any], attachment: Attachment, prev: Any
    ) -> dict[str, Any] | None:
        """One plugin invocation; its result (ADD), None (DEL, CHECK), or a typed error."""
        network = attachment.network
        conf = dict(plugin)
        conf["name"], conf["cniVersion"] = network["name"], network["cniVersion"]
        if prev is not None:
            conf["prevResult"] = prev
        wanted = plugin.get("capabilities") or {}
        runtime = {k: v for k, v in attachment.capability_args.items() if wanted.get(k)}
        if runtime:
            conf["runtimeConfig"] = runtime
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": attachment.container_id,
            "CNI_NETNS": attachment.netns,
            "CNI_IFNAME": attachment.ifname,
            "CNI_PATH": ":".join(self.dirs),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        if attachment.args:
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in attachment.args.items())
        binary = self.find(str(plugin["type"]))
        try:
            with trio.fail_after(PLUGIN_TIMEOUT):
                done = await trio.run_process(
                    [binary],
                    stdin=json.dumps(conf).encode(),
                    capture_stdout=True,
                    capture_stderr=True,
                    env=env,
                    check=False,
                )
        except trio.TooSlowError:  # typed like every other failure: DEL goes on, ADD undoes
            raise Unavailable(
                f"network {network['name']}: plugin {plugin['type']} {command} did not answer "
                f"within {PLUGIN_TIMEOUT:g}s"
            ) from None
        return _answer(network["name"], str(plugin["type"]), command, done)


def _answer(network: str, kind: str, command: str, done: Any) -> dict[str, Any] | None:
    out = bytes(done.stdout[:MAX_OUTPUT])
    if done.returncode != 0:
        raise _plugin_error(network, kind, command, out, bytes(done.stderr[-2000:]))
    if command != "ADD":
        return None
    try:
        result = json.loads(out)
    except ValueError:
        raise FailedPrecondition(
            f"network {network}: plugin {kind} {command} answered no JSON result"
        ) from None
    if not isinstance(result, dict):
        raise FailedPrecondition(f"network {network}: plugin {kind} answered {result!r}")
    return result


def _plugin_error(network: str, kind: str, command: str, out: bytes, err: bytes) -> BerthError:
    try:
        doc = json.loads(out)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "msg" in doc:
        code = doc.get("code")
        details = f" ({doc['details']})" if doc.get("details") else ""
        message = f"network {network}: plugin {kind} {command}: {doc['msg']}{details}"
        cls = _ERROR_KINDS.get(code, FailedPrecondition) if isinstance(code, int) else None
        return (cls or FailedPrecondition)(message)
    text = (err or out).decode(errors="replace").strip() or "no message"
    return FailedPrecondition(f"network {network}: plugin {kind} {command} failed: {text}")


async def add(plugins: Plugins, attachment: Attachment) -> Attachment:
    """ADD every plugin in order; on a failure, DEL what may have been done and raise.
    The caller has recorded `attachment` durably before, and records it again after."""
    prev: dict[str, Any] | None = None
    try:
        for plugin in attachment.network["plugins"]:
            prev = await plugins.run("ADD", plugin, attachment, prev)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await delete(plugins, attachment)
            except BerthError:
                pass  # the ADD's error is the one to report; the record keeps the rest
        raise
    attachment.result = prev
    return attachment


async def delete(plugins: Plugins, attachment: Attachment) -> None:
    """DEL every plugin in reverse order, each even if an earlier one failed (the first
    error is raised after: the record stays, and DEL is repeated later)."""
    first: BerthError | None = None
    for plugin in reversed(attachment.network["plugins"]):
        try:
            await plugins.run("DEL", plugin, attachment, attachment.result)
        except BerthError as exc:
            first = first or exc
    if first is not None:
        raise first


async def check(plugins: Plugins, attachment: Attachment) -> None:
    """CHECK every plugin in order (the attachment is as ADD left it, or an error)."""
    if attachment.result is None:
        raise FailedPrecondition(f"network {attachment.network['name']}: ADD never completed")
    for plugin in attachment.network["plugins"]:
        await plugins.run("CHECK", plugin, attachment, attachment.result)
