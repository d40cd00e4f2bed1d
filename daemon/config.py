"""berthd configuration: a TOML file, overridden by command-line flags.

root = "/var/lib/berth"            # persistent: metadata DB, default rootfs
state = "/run/berth"               # volatile: sockets, bundles, shim state, exit files
address = "/run/berth/berthd.sock" # the API socket (mode 0660)
default_runtime = "runc"
log_level = "info"
log_format = "text"                # or "json": one object a line (--log-format; berth-grpc too)
standby = false                    # keep a warm standby berthd behind the active one

[runtimes.runc]
binary = "runc"
[runtimes.crun]
binary = "crun"
args = []                          # extra global arguments
# root = "/run/berth/runtime/crun" # the runtime's --root (default: <state>/runtime/<name>/<ns>)

[shim]
python = ""                        # the interpreter that runs the shims (their zygote): unset,
                                   # the one the installation recorded (scripts/setup picks
                                   # CPython >= 3.12: immortal objects halve a shim's private
                                   # memory), else berthd's own

[content]
ingest_expiry = 3600               # seconds before an ingest no lease holds and nobody
                                   # writes is stale: GC removes it

[container_log]                    # defaults for the shim's log mode
max_size = 16777216
max_files = 4

[grpc]                             # containerd's gRPC API (berth-grpc), for dockerd and ctr
address = "/run/berth/containerd.sock"   # unset: not served
gid = 0                            # the socket's group (mode 0660): root-equivalent access

[ttrpc]                            # the same services over ttrpc, served by berth-grpc
address = "/run/berth/containerd.sock.ttrpc"   # unset: <grpc address>.ttrpc; "": not served

[network]                          # CNI network attachments (berth run --net NAME)
conf_dir = "/etc/cni/net.d"        # network config lists (.conflist, .conf)
plugin_dirs = ["/usr/lib/cni", "/opt/cni/bin"]   # CNI_PATH: where the plugins are
default_subnet = "10.77.0.0/24"    # of `bridge`, berth's network when none is so named
default_bridge = "berth0"

[metrics]                          # Prometheus metrics, as containerd's [metrics] (off by default)
address = "127.0.0.1:1338"         # HOST:PORT ([::1]:PORT for IPv6) serving GET /v1/metrics;
                                   # unset or "": not served (flag: --metrics-address)
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any

from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.names import validate

SHIM_PYTHON_RECORD = "berth-shim-python"  # in the venv (sys.prefix): written by scripts/setup

DEFAULT_ROOT = "/var/lib/berth"
# containerd's names for its runc shim; engines send them, berth runs them with runc.
CONTAINERD_RUNC_NAMES = (
    "io.containerd.runc.v2",
    "io.containerd.runc.v1",
    "io.containerd.runtime.v1.linux",
)
DEFAULT_STATE = "/run/berth"
LOG_FORMATS = ("text", "json")  # logs.py writes them
# Flags that act once: a daemon that re-executes itself or spawns a standby drops them.
ONE_TIME_FLAGS = ("--standby", "--takeover", "--detach")


@dataclass(frozen=True)
class RuntimeEntry:
    name: str
    binary: str
    args: tuple[str, ...] = ()
    root: str = ""
    systemd_cgroup: bool = False


@dataclass
class Config:
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    address: str = ""
    default_runtime: str = "runc"
    log_level: str = "info"
    log_format: str = "text"  # LOG_FORMATS
    runtimes: dict[str, RuntimeEntry] = field(default_factory=dict)
    log_max_size: int = 16 * 1024 * 1024
    log_max_files: int = 4
    socket_group: int | None = None
    default_snapshotter: str = "overlayfs"
    grpc_address: str = ""
    grpc_gid: int = 0
    ttrpc_address_setting: str | None = None  # None: beside the gRPC socket
    shim_python_setting: str = ""  # "": the installation's record, else sys.executable
    ingest_expiry: float = 3600.0
    rebuild_metadata: bool = False  # a command-line flag only: never a standing setting
    standby: bool = False  # keep a warm standby (berthd --standby) behind the active daemon
    mode: str = "active"  # "standby" or "takeover": command-line flags only
    detach: bool = False  # --detach: fork, return once the forked daemon serves (detach.py)
    metrics_address: str = ""  # HOST:PORT of the Prometheus endpoint; "": not served
    network_conf_dir: str = "/etc/cni/net.d"
    network_plugin_dirs: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
    network_default_subnet: str = "10.77.0.0/24"
    network_default_bridge: str = "berth0"

    def __post_init__(self) -> None:
        if not self.runtimes:
            self.runtimes = {
                "runc": RuntimeEntry("runc", "runc"),
                "crun": RuntimeEntry("crun", "crun"),
            }

    @property
    def shim_python(self) -> str:
        """The interpreter of the zygote (and so of every shim): configured, else the
        one the installation recorded beside berthd's (`<prefix>/berth-shim-python`,
        written by scripts/setup), else berthd's own. BERTH_SHIM_PYTHON overrides all."""
        chosen = os.environ.get("BERTH_SHIM_PYTHON") or self.shim_python_setting
        if chosen:
            return chosen
        try:
            with open(os.path.join(sys.prefix, SHIM_PYTHON_RECORD)) as f:
                recorded = f.read(4096).strip()
        except OSError:
            recorded = ""
        if recorded and os.access(recorded, os.X_OK):
            return recorded
        return sys.executable

    @property
    def ttrpc_address(self) -> str:
        """Where berth-grpc serves ttrpc: configured, or beside the gRPC socket as
        containerd's `<address>.ttrpc`; "" when not served."""
        if self.ttrpc_address_setting is not None:
            return self.ttrpc_address_setting
        return f"{self.grpc_address}.ttrpc" if self.grpc_address else ""

    def validate(self) -> None:
        for path_name in ("root", "state", "address", "grpc_address", "ttrpc_address"):
            value = getattr(self, path_name)
            if value and not os.path.isabs(value):
                raise InvalidArgument(f"{path_name} must be an absolute path")
        if self.grpc_address and os.path.abspath(self.grpc_address) == os.path.abspath(
            self.address
        ):
            raise InvalidArgument("[grpc] address must differ from berthd's own address")
        if self.log_format not in LOG_FORMATS:
            raise InvalidArgument(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.default_runtime not in self.runtimes:
            raise InvalidArgument(f"default runtime {self.default_runtime!r} is not configured")
        if self.metrics_address:
            split_host_port(self.metrics_address, "[metrics] address")

    def runtime_entry(self, name: str) -> RuntimeEntry | None:
        """The configured runtime `name`; containerd's runc runtime names resolve to the
        `runc` entry unless configured themselves."""
        entry = self.runtimes.get(name)
        if entry is None and name in CONTAINERD_RUNC_NAMES:
            entry = self.runtimes.get("runc")
        return entry

    def runtime_root(self, entry: RuntimeEntry, namespace: str) -> str:
        if entry.root:
            return os.path.join(entry.root, namespace)
        return os.path.join(self.state, "runtime", entry.name, namespace)

    # Layout of the state dir.
    @property
    def tasks_dir(self) -> str:
        return os.path.join(self.state, "tasks")

    @property
    def sockets_dir(self) -> str:
        return os.path.join(self.state, "s")

    @property
    def logs_dir(self) -> str:
        """Task log files (`<namespace>/<id>/`), in the root dir: on disk, where the state
        dir is a tmpfs whose every byte is RAM."""
        return os.path.join(self.root, "logs")

    @property
    def db_path(self) -> str:
        return os.path.join(self.root, "meta.db")

    @property
    def default_rootfs(self) -> str:
        return os.path.join(self.root, "rootfs", "busybox")


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); InvalidArgument if it is not
    one. The host must be given: a metrics endpoint on every interface is a choice."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{what} must be HOST:PORT (e.g. 127.0.0.1:1338), not {address!r}")
    if any(c.isspace() or c in "[]/" for c in host):
        raise InvalidArgument(f"{what}: bad host {host!r}")
    return host, int(port)


def load_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def from_mapping(doc: dict[str, Any]) -> Config:
    """A Config from a parsed TOML document; InvalidArgument names what is wrong."""
    config = Config()
    for key in (
        "root",
        "state",
        "address",
        "default_runtime",
        "log_level",
        "log_format",
        "default_snapshotter",
    ):
        if key in doc:
            setattr(config, key, _typed(doc, key, str, "config"))
    if not config.address:  # the default: berthd.sock in the state dir (set or default)
        config.address = os.path.join(config.state, "berthd.sock")
    if "runtimes" in doc:
        config.runtimes = _runtimes(_table(doc, "runtimes"))
    log = _table(doc, "container_log")
    config.log_max_size = int(log.get("max_size", config.log_max_size))
    config.log_max_files = int(log.get("max_files", config.log_max_files))
    expiry = _table(doc, "content").get("ingest_expiry", config.ingest_expiry)
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool) or expiry <= 0:
        raise InvalidArgument("[content] ingest_expiry must be a positive number of seconds")
    config.ingest_expiry = float(expiry)
    grpc = _table(doc, "grpc")
    config.grpc_address = _typed(grpc, "address", str, "[grpc]", "")
    config.grpc_gid = _typed(grpc, "gid", int, "[grpc]", 0)
    if config.grpc_gid < 0:
        raise InvalidArgument("[grpc] gid must be a group id")
    config.shim_python_setting = _typed(_table(doc, "shim"), "python", str, "[shim]", "")
    if config.shim_python_setting and not os.path.isabs(config.shim_python_setting):
        raise InvalidArgument("[shim] python must be an absolute path")
    ttrpc = _table(doc, "ttrpc")
    if "address" in ttrpc:
        config.ttrpc_address_setting = _typed(ttrpc, "address", str, "[ttrpc]", "")
    config.metrics_address = _typed(_table(doc, "metrics"), "address", str, "[metrics]", "")
    _network(config, _table(doc, "network"))
    if "socket_group" in doc:
        config.socket_group = int(doc["socket_group"])
    config.standby = _typed(doc, "standby", bool, "config", False)
    return config


def _network(config: Config, table: dict[str, Any]) -> None:
    config.network_conf_dir = _typed(table, "conf_dir", str, "[network]", config.network_conf_dir)
    dirs = table.get("plugin_dirs", list(config.network_plugin_dirs))
    if not isinstance(dirs, list) or not all(isinstance(d, str) and os.path.isabs(d) for d in dirs):
        raise InvalidArgument("[network] plugin_dirs must be a list of absolute paths")
    config.network_plugin_dirs = tuple(dirs)
    config.network_default_subnet = _typed(
        table, "default_subnet", str, "[network]", config.network_default_subnet
    )
    config.network_default_bridge = _typed(
        table, "default_bridge", str, "[network]", config.network_default_bridge
    )
    if not 0 < len(config.network_default_bridge) < 16:  # IFNAMSIZ
        raise InvalidArgument("[network] default_bridge must be 1-15 characters")


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"[{name}] must be a table")
    return table


def _typed(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{where} {key} must be a {kind.__name__}")
    return value


def _runtimes(tables: dict[str, Any]) -> dict[str, RuntimeEntry]:
    entries = {}
    for name, table in tables.items():
        validate(name, "runtime name")
        if not isinstance(table, dict) or not isinstance(table.get("binary", name), str):
            raise InvalidArgument(f"[runtimes.{name}] needs a binary string")
        args = table.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f"[runtimes.{name}] args must be a list of strings")
        entries[name] = RuntimeEntry(
            name=name,
            binary=str(table.get("binary", name)),
            args=tuple(args),
            root=str(table.get("root", "")),
            systemd_cgroup=bool(table.get("systemd_cgroup", False)),
        )
    return entries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="berthd", description="berth's container daemon")
    parser.add_argument("--config", "-c", help="TOML config file")
    parser.add_argument("--root", help=f"persistent state directory (default {DEFAULT_ROOT})")
    parser.add_argument("--state", help=f"volatile state directory (default {DEFAULT_STATE})")
    parser.add_argument("--address", "-a", help="API socket path (default <state>/berthd.sock)")
    parser.add_argument("--default-runtime", help="runtime for containers that name none")
    parser.add_argument("--log-level", help="debug, info, warning, error")
    parser.add_argument("--log-format", help="text (the default) or json: one JSON object per line")
    parser.add_argument(
        "--grpc-address", help="serve containerd's gRPC API on this socket (berth-grpc)"
    )
    parser.add_argument(
        "--metrics-address", help="serve Prometheus metrics on HOST:PORT at /v1/metrics"
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--standby",
        action="store_true",
        help="wait, warm, as a standby: take over the moment the active berthd dies",
    )
    modes.add_argument(
        "--takeover",
        action="store_true",
        help="take over from the running berthd (an upgrade): it hands over and exits",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="fork; exit 0 printing the new daemon's pid once it serves, or 1 with its error "
        "(with --takeover: a synchronous upgrade, as berthd.service's ExecReload)",
    )
    parser.add_argument(
        "--rebuild-metadata",
        action="store_true",
        help="start although the metadata database is missing or broken: rebuild what the "
        "disk holds (containers of running tasks; blobs and snapshots held by a lease)",
    )
    return parser.parse_args(argv)


def load(argv: list[str] | None = None) -> Config:
    args = parse_args(argv)
    doc: dict[str, Any] = load_file(args.config) if args.config else {}
    for key in ("root", "state", "address", "default_runtime", "log_level", "log_format"):
        value = getattr(args, key)
        if value:
            doc[key] = os.path.abspath(value) if key in ("root", "state", "address") else value
    if args.grpc_address:
        doc.setdefault("grpc", {})["address"] = os.path.abspath(args.grpc_address)
    if args.metrics_address is not None:
        doc["metrics"] = {**_table(doc, "metrics"), "address": args.metrics_address}
    config = from_mapping(doc)
    config.rebuild_metadata = args.rebuild_metadata
    config.mode = "standby" if args.standby else "takeover" if args.takeover else "active"
    if args.detach and args.standby:
        raise InvalidArgument("--detach goes with --takeover or alone, not with --standby")
    config.detach = args.detach
    config.validate()
    return config
