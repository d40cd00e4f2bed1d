"""berthd configuration: a TOML file, overridden by command-line flags. A key berth does
not know (a typo) is refused, as is a value of the wrong type or range, and every path
must be absolute: `berthd: bad configuration: ...`, exit 2.

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
import ipaddress
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
CONTAINERD_RUNC_SHIMS = ("containerd-shim-runc-v2", "containerd-shim-runc-v1")
DEFAULT_STATE = "/run/berth"
LOG_FORMATS = ("text", "json")  # logs.py writes them
# logs.setup takes a level by name: anything else silently logged at info. "warn" is
# containerd's spelling, taken as well.
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical")
MAX_SOCKET_NAME = 107 - len("/proc/self/fd/9999999/")  # sun_path's bytes, less a dir fd's
MAX_ID = 2**32 - 2  # a uid or gid: (gid_t)-1 means "leave it" to chown(2)
# The shim's bounds on its log files (shim/io.py refuses the rest at every start of a
# task); the upper bound is what the wire's int64 carries.
MIN_LOG_SIZE, MAX_LOG_SIZE = 4096, 2**63 - 1
MAX_LOG_FILES = 1000
MAX_INGEST_EXPIRY = 10 * 365 * 86400.0  # seconds; GC counts in int64 nanoseconds

# The keys of berth's config, table by table ("runtimes.*": each runtime's table). A key
# that is not here is refused: the config is berth's alone (no plugin tables belong to
# anyone else, as in containerd's, which can only warn), and a misspelt key silently left
# its default in force: `[container_log] max_sise` kept 16 MiB log files, `[grpc] adress`
# left containerd's API off, `sokcet_group` the socket root's alone. A key a release
# drops stays here (ignored), so that a config written for it still loads.
# The top-level keys that are plain strings, set on Config as they are.
TOP_STRINGS = (
    "root",
    "state",
    "address",
    "default_runtime",
    "log_level",
    "log_format",
    "default_snapshotter",
)
KEYS: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            *TOP_STRINGS,
            "socket_group",
            "standby",
            "runtimes",
            "shim",
            "content",
            "container_log",
            "grpc",
            "ttrpc",
            "network",
            "metrics",
        }
    ),
    "runtimes.*": frozenset({"binary", "args", "root", "systemd_cgroup"}),
    "shim": frozenset({"python"}),
    "content": frozenset({"ingest_expiry"}),
    "container_log": frozenset({"max_size", "max_files"}),
    "grpc": frozenset({"address", "gid"}),
    "ttrpc": frozenset({"address"}),
    "network": frozenset({"conf_dir", "plugin_dirs", "default_subnet", "default_bridge"}),
    "metrics": frozenset({"address"}),
}
# A berthd resuming after a failed handover (main.py's RESUME_FD_ENV) re-reads the config
# its successor may have been given: a key only the successor knows is a warning there,
# since refusing it would leave no daemon serving at all.
RESUMING_ENV = "BERTH_RESUME"
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
            if value or path_name in ("root", "state"):
                _check_path(value, path_name)
        for socket_name in ("address", "grpc_address", "ttrpc_address"):
            name = os.path.basename(getattr(self, socket_name))
            # A long path is bound through its directory's descriptor (unixsock.py), but
            # the name itself must fit in sun_path beside /proc/self/fd/<n>/.
            if len(name.encode()) > MAX_SOCKET_NAME:
                raise InvalidArgument(
                    f"{socket_name}: the socket's name may be {MAX_SOCKET_NAME} bytes at "
                    f"most, not {len(name.encode())}"
                )
        if self.log_level.lower() not in LOG_LEVELS:
            raise InvalidArgument(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        from berth.daemon.storage.snapshots import SNAPSHOTTERS

        if self.default_snapshotter not in SNAPSHOTTERS:
            raise InvalidArgument(
                f"default_snapshotter must be one of {', '.join(SNAPSHOTTERS)}, "
                f"not {self.default_snapshotter!r}"
            )
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
        `runc` entry unless configured themselves, and so does the path of containerd's
        runc shim (containerd runs a shim named by its absolute path; berth's own shim
        runs runc in its place)."""
        entry = self.runtimes.get(name)
        if entry is None and (
            name in CONTAINERD_RUNC_NAMES
            or (name.startswith("/") and os.path.basename(name) in CONTAINERD_RUNC_SHIMS)
        ):
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
    """The parsed file; a syntax error names the file (tomllib says only where in it)."""
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path}: {exc}") from None


def from_mapping(doc: dict[str, Any]) -> Config:
    """A Config from a parsed TOML document; InvalidArgument names what is wrong."""
    config = Config()
    _known(doc, "")
    for key in TOP_STRINGS:
        if key in doc:
            setattr(config, key, _typed(doc, key, str, "config"))
    if not config.address:  # the default: berthd.sock in the state dir (set or default)
        config.address = os.path.join(config.state, "berthd.sock")
    if "runtimes" in doc:
        runtimes = doc["runtimes"]
        if not isinstance(runtimes, dict):
            raise InvalidArgument("[runtimes] must be a table")
        config.runtimes = _runtimes(runtimes)
    log = _table(doc, "container_log")
    config.log_max_size = _integer(
        log, "max_size", "[container_log]", config.log_max_size, MIN_LOG_SIZE, MAX_LOG_SIZE
    )
    config.log_max_files = _integer(
        log, "max_files", "[container_log]", config.log_max_files, 1, MAX_LOG_FILES
    )
    expiry = _table(doc, "content").get("ingest_expiry", config.ingest_expiry)
    if (
        not isinstance(expiry, (int, float))
        or isinstance(expiry, bool)
        or not 0 < expiry <= MAX_INGEST_EXPIRY  # also refuses nan; inf is above it
    ):
        raise InvalidArgument(
            "[content] ingest_expiry must be a positive number of seconds, at most "
            f"{MAX_INGEST_EXPIRY:.0f}"
        )
    config.ingest_expiry = float(expiry)
    grpc = _table(doc, "grpc")
    config.grpc_address = _typed(grpc, "address", str, "[grpc]", "")
    config.grpc_gid = _integer(grpc, "gid", "[grpc]", 0, 0, MAX_ID)
    config.shim_python_setting = _path(_table(doc, "shim"), "python", "[shim]", "")
    ttrpc = _table(doc, "ttrpc")
    if "address" in ttrpc:
        config.ttrpc_address_setting = _typed(ttrpc, "address", str, "[ttrpc]", "")
    config.metrics_address = _typed(_table(doc, "metrics"), "address", str, "[metrics]", "")
    _network(config, _table(doc, "network"))
    if "socket_group" in doc:
        config.socket_group = _integer(doc, "socket_group", "config", 0, 0, MAX_ID)
    config.standby = _typed(doc, "standby", bool, "config", False)
    return config


def _network(config: Config, table: dict[str, Any]) -> None:
    config.network_conf_dir = _path(table, "conf_dir", "[network]", config.network_conf_dir)
    dirs = table.get("plugin_dirs", list(config.network_plugin_dirs))
    if not isinstance(dirs, list) or not all(isinstance(d, str) and os.path.isabs(d) for d in dirs):
        raise InvalidArgument("[network] plugin_dirs must be a list of absolute paths")
    config.network_plugin_dirs = tuple(dirs)
    subnet = _typed(table, "default_subnet", str, "[network]", config.network_default_subnet)
    try:
        if "/" not in subnet:
            raise ValueError("no prefix length")
        ipaddress.ip_network(subnet, strict=False)
    except ValueError as exc:
        raise InvalidArgument(
            f"[network] default_subnet must be a subnet (e.g. 10.77.0.0/24), not {subnet!r}: {exc}"
        ) from None
    config.network_default_subnet = subnet
    bridge = _typed(table, "default_bridge", str, "[network]", config.network_default_bridge)
    # IFNAMSIZ; and what the kernel refuses in an interface name (dev_valid_name)
    if (
        not 0 < len(bridge.encode()) < 16
        or bridge in (".", "..")
        or any(c in "/:" or c.isspace() for c in bridge)
    ):
        raise InvalidArgument(
            "[network] default_bridge must be an interface name: 1-15 bytes, no '/', ':' or spaces"
        )
    config.network_default_bridge = bridge


def _table(doc: dict[str, Any], name: str, where: str = "") -> dict[str, Any]:
    """The table `name` of `doc` (empty if absent), its keys checked (see KEYS)."""
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"[{where or name}] must be a table")
    _known(table, where or name)
    return table


def _known(table: dict[str, Any], where: str) -> None:
    """Refuse a key berth does not know in the table `where` (see KEYS): one line naming
    it, or a warning on stderr for a berthd resuming after a failed handover."""
    unknown = sorted(set(table) - KEYS["runtimes.*" if where.startswith("runtimes.") else where])
    if not unknown:
        return
    what = f"[{where}]" if where else "the config's top level"
    message = f"unknown key(s) in {what}: {', '.join(unknown)}"
    if os.environ.get(RESUMING_ENV):
        print(f"berthd: warning: {message} (ignored)", file=sys.stderr)
        return
    raise InvalidArgument(message)


def _typed(table: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{where} {key} must be a {kind.__name__}, not {value!r:.60}")
    return value


def _integer(table: dict[str, Any], key: str, where: str, default: int, low: int, high: int) -> int:
    """An integer setting within [low, high]: where TOML gave a list, a float or a huge
    number, int() raised a TypeError or OverflowError later (a traceback)."""
    value = table.get(key, default)
    if type(value) is not int or not low <= value <= high:
        raise InvalidArgument(
            f"{where} {key} must be an integer from {low} to {high}, not {value!r:.60}"
        )
    return value


def _path(table: dict[str, Any], key: str, where: str, default: str) -> str:
    """A path setting: an absolute string ("" for none, where that is allowed by the
    default)."""
    value: str = _typed(table, key, str, where, default)
    if value:
        _check_path(value, f"{where} {key}")
    return value


def _check_path(value: str, what: str) -> None:
    """Absolute (a relative path was resolved against berthd's working directory) and
    without NUL (TOML allows one; the OS calls raised ValueError at start: a traceback)."""
    if not os.path.isabs(value) or "\0" in value:
        raise InvalidArgument(f"{what} must be an absolute path, not {value!r}")


def _runtimes(tables: dict[str, Any]) -> dict[str, RuntimeEntry]:
    entries = {}
    for name in tables:
        validate(name, "runtime name")
        where = f"[runtimes.{name}]"
        table = _table(tables, name, f"runtimes.{name}")
        binary = _typed(table, "binary", str, where, name)
        # a name looked up on PATH, or an absolute path: a relative path depended on
        # berthd's working directory
        if not binary or "\0" in binary or ("/" in binary and not os.path.isabs(binary)):
            raise InvalidArgument(
                f"{where} binary must be a command name or an absolute path, not {binary!r}"
            )
        args = table.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument(f"{where} args must be a list of strings")
        entries[name] = RuntimeEntry(
            name=name,
            binary=binary,
            args=tuple(args),
            root=_path(table, "root", where, ""),
            systemd_cgroup=_typed(table, "systemd_cgroup", bool, where, False),
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
