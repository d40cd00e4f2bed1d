"""berthd's Prometheus endpoint: `[metrics] address = "HOST:PORT"` (or --metrics-address)
serves `GET /v1/metrics` in Prometheus' text format, as containerd's `[metrics]` does.

- Per container (labels namespace, id, image): CPU (total, user, system), memory (usage,
  limit, RSS, cache, OOM kills), pids and block IO bytes, read at scrape time from the
  cgroup files (v1 or v2) of the task's init, which shim/cgroups.py finds; and, for a
  container in a network namespace of its own (a CNI attachment, or any namespace its
  spec made), bytes and packets per interface from its init's /proc/PID/net/dev (the
  namespace's own counters, read without entering it; `lo` is left out).
- Per daemon: tasks by status, live shims, API calls by method and error code with their
  latency (rpc.ServerConnection reports every answered call), shim deaths, reconnects
  and recovered tasks, event subscribers and events published, replayed and dropped,
  content store size, snapshot counts and bytes, GC runs and what they removed and
  freed, attached standbys,
  and berthd's own process figures (memory, CPU, fds).

The HTTP side is a minimal HTTP/1.1 server on berthd's own trio loop (no thread of its
own): one GET per connection, its head bounded (8 KiB) and timed (10 s), answered and
closed. Anything else is answered 400, 404 or 405 (503 beyond 16 clients at once) and
changes nothing. The slow parts of a
scrape (reading the cgroup files of every container, sizing the content store, writing
the text) run in trio's worker threads, one scrape at a time; the loop only copies the
task table.

Only this module imports prometheus_client, and berthd imports this module only when
metrics are on (import-linter keeps it so): it costs the CLI and the shims nothing.
"""

from __future__ import annotations

import bisect
import collections
import importlib.util
import itertools
import logging
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio


def _bare_package(name: str) -> None:
    """Put package `name` in sys.modules without running its __init__, so that only the
    submodules imported afterwards are loaded.

    prometheus_client's __init__ imports its exposition module, which imports an HTTP
    server, urllib.request, wsgiref and email: 2.2 MiB of berthd's memory (measured, 1.5
    ms of import) for code berthd never runs; it serves /v1/metrics itself and writes the
    text with `exposition` below. The metric types and the registry live in submodules
    that import only each other. If the whole package was imported before (a test, a
    tool), it is used as it is."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed, or not a package: the imports below say so
    sys.modules[name] = importlib.util.module_from_spec(spec)  # __path__ set, not run


_bare_package("prometheus_client")

from prometheus_client import registry  # noqa: E402
from prometheus_client.metrics_core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry  # noqa: E402

from berth.daemon import __version__  # noqa: E402
from berth.daemon.config import split_host_port  # noqa: E402
from berth.daemon.events import Exchange  # noqa: E402
from berth.daemon.metadata import Store  # noqa: E402
from berth.daemon.storage.service import Storage  # noqa: E402
from berth.daemon.storage.snapshots import Snapshotter  # noqa: E402
from berth.daemon.tasks.service import TaskService  # noqa: E402
from berth.shim import cgroups  # noqa: E402
from berth.shim.cgroups import CgroupPaths  # noqa: E402
from berth.shim.wire.errors import NotFound  # noqa: E402

log = logging.getLogger("berthd.metrics")

PATH = "/v1/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format `exposition` writes
MAX_HEAD = 8192  # a request head larger than this is refused
REQUEST_TIMEOUT = 10.0  # to read a request and send its answer
MAX_CONNECTIONS = 16  # at once; more are answered 503
V1_UNLIMITED = 1 << 62  # memory.limit_in_bytes at or above: no limit (reported as 0)
SNAPSHOT_KINDS = ("active", "committed", "view")

# prometheus_client's default histogram buckets (seconds), which Histogram would use
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# --- the text format ----------------------------------------------------------------------

# Prometheus' text exposition format 0.0.4: a `# HELP` and a `# TYPE` line per family, then
# one line per sample, `name{label="value",...} value`. A counter family is named without
# `_total` in prometheus_client and exposed with it; OpenMetrics' types that the text
# format lacks map to the nearest it has.
_TEXT_TYPES = {
    "counter": "counter",
    "gauge": "gauge",
    "histogram": "histogram",
    "summary": "summary",
    "gaugehistogram": "histogram",
    "info": "gauge",
    "stateset": "gauge",
    "unknown": "untyped",
}
_SUFFIXES = {"counter": "_total", "info": "_info"}


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_value(value: float) -> str:
    """A sample value as Go's ParseFloat reads it (Prometheus' parser)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def exposition(families: Iterable[Metric]) -> bytes:
    """The text format of `families` (what prometheus_client's generate_latest writes,
    without importing its exposition module: see _bare_package)."""
    lines: list[str] = []
    for family in families:
        name = family.name + _SUFFIXES.get(family.type, "")
        lines.append(f"# HELP {name} {_escape_help(family.documentation)}\n")
        lines.append(f"# TYPE {name} {_TEXT_TYPES.get(family.type, 'untyped')}\n")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items())
            line = f"{sample.name}{{{labels}}} " if labels else f"{sample.name} "
            line += _sample_value(sample.value)
            if sample.timestamp is not None:
                line += f" {int(float(sample.timestamp) * 1000)}"  # milliseconds
            lines.append(line + "\n")
    return "".join(lines).encode()


# --- cgroup files -----------------------------------------------------------------------


@dataclass(slots=True)
class CgroupSample:
    """A container's figures, from its cgroup files; None where a file is missing."""

    cpu_seconds: float | None = None
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    memory_usage: int | None = None
    memory_limit: int | None = None  # 0: unlimited
    memory_rss: int | None = None
    memory_cache: int | None = None
    oom_kills: int | None = None
    pids: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None


def _read(directory: str | None, name: str) -> str | None:
    """A cgroup file's text (they are small: one read), None if missing. os.read, not
    open(): a scrape reads ~10 files per container, and a text file object costs more
    than the kernel's own work for most of them."""
    if directory is None:
        return None
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _number(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _field(text: str | None, key: str) -> int | None:
    """The value of the `key value` line for `key` in a stat file (memory.stat,
    cpuacct.stat, cpu.stat, memory.events, memory.oom_control), None if it has none. Found
    with str.find, without splitting the file: v1's memory.stat has ~35 lines of which a
    scrape wants two, and splitting them all was a fifth of a scrape's CPU (profiled)."""
    if text is None:
        return None
    probe = key + " "
    if text.startswith(probe):
        start = len(probe)
    else:
        found = text.find("\n" + probe)
        if found < 0:
            return None
        start = found + 1 + len(probe)
    end = text.find("\n", start)
    try:
        return int(text[start : end if end >= 0 else len(text)])
    except ValueError:
        return None


def _v1_blkio(text: str | None) -> tuple[int | None, int | None]:
    """Bytes read and written, summed over devices: `MAJ:MIN Read|Write N` lines."""
    if text is None:
        return None, None
    totals = {"Read": 0, "Write": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in totals and parts[2].isdigit():
            totals[parts[1]] += int(parts[2])
    return totals["Read"], totals["Write"]


def _v2_io(text: str | None) -> tuple[int | None, int | None]:
    """Bytes read and written, summed over devices: `MAJ:MIN rbytes=N wbytes=N ...`."""
    if text is None:
        return None, None
    read = written = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if value.isdigit():
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    written += int(value)
    return read, written


Reader = Callable[[str | None, str], str | None]  # (directory, file name) -> text or None


def sample_v1(paths: CgroupPaths, read: Reader = _read) -> CgroupSample:
    usage = _number(read(paths.cpu, "cpuacct.usage"))
    ticks = read(paths.cpu, "cpuacct.stat")
    user, system = _field(ticks, "user"), _field(ticks, "system")
    hz = cgroups.USER_HZ
    memory = read(paths.memory, "memory.stat")
    rss, cache = _field(memory, "total_rss"), _field(memory, "total_cache")
    limit = _number(read(paths.memory, "memory.limit_in_bytes"))
    blkio = read(paths.blkio, "blkio.throttle.io_service_bytes_recursive")
    if blkio is None:
        blkio = read(paths.blkio, "blkio.throttle.io_service_bytes")
    oom = read(paths.memory, "memory.oom_control")
    sample = CgroupSample(
        cpu_seconds=usage / 1e9 if usage is not None else None,
        cpu_user_seconds=user / hz if user is not None else None,
        cpu_system_seconds=system / hz if system is not None else None,
        memory_usage=_number(read(paths.memory, "memory.usage_in_bytes")),
        memory_limit=None if limit is None else 0 if limit >= V1_UNLIMITED else limit,
        memory_rss=rss if rss is not None else _field(memory, "rss"),
        memory_cache=cache if cache is not None else _field(memory, "cache"),
        oom_kills=_count(oom, "oom_kill"),
        pids=_number(read(paths.pids, "pids.current")),
    )
    sample.io_read_bytes, sample.io_write_bytes = _v1_blkio(blkio)
    return sample


def _count(text: str | None, key: str) -> int | None:
    """A counter line of a file that is there: 0 if the kernel does not write that line
    yet (oom_kill: Linux 4.13 on v1, 5.x on v2); None if the file is not there."""
    if text is None:
        return None
    value = _field(text, key)
    return 0 if value is None else value


def sample_v2(paths: CgroupPaths, read: Reader = _read) -> CgroupSample:
    cpu = read(paths.cpu, "cpu.stat")
    memory = read(paths.memory, "memory.stat")
    limit = read(paths.memory, "memory.max")

    def seconds(key: str) -> float | None:
        value = _field(cpu, key)
        return value / 1e6 if value is not None else None

    sample = CgroupSample(
        cpu_seconds=seconds("usage_usec"),
        cpu_user_seconds=seconds("user_usec"),
        cpu_system_seconds=seconds("system_usec"),
        memory_usage=_number(read(paths.memory, "memory.current")),
        memory_limit=0 if limit is not None and limit.strip() == "max" else _number(limit),
        memory_rss=_field(memory, "anon"),
        memory_cache=_field(memory, "file"),
        oom_kills=_count(read(paths.memory, "memory.events"), "oom_kill"),
        pids=_number(read(paths.pids, "pids.current")),
    )
    sample.io_read_bytes, sample.io_write_bytes = _v2_io(read(paths.blkio, "io.stat"))
    return sample


def sample_cgroup(paths: CgroupPaths, read: Reader = _read) -> CgroupSample:
    return sample_v1(paths, read) if paths.version == 1 else sample_v2(paths, read)


class OpenFiles:
    """cgroup files kept open from one scrape to the next, read again with pread at
    offset 0 (the kernel generates a cgroup file's text afresh for a read from offset 0).
    Opening is the dear part: a lookup through the cgroup filesystem costs ~8 us, more
    than the read, for ~9 files a container at every scrape. At most `budget` are kept
    (berthd must never run out of descriptors for this); a file not read in a scrape (its
    task exited) is closed after it. Used by the one thread that renders (one scrape at a
    time)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        # keyed by (directory, name): a path joined at every read was ~10% of a scrape
        self._fds: dict[tuple[str, str], int] = {}
        self._used: set[tuple[str, str]] = set()

    def read(self, directory: str | None, name: str) -> str | None:
        if directory is None:
            return None
        path = (directory, name)
        fd = self._fds.get(path)
        kept = fd is not None
        if fd is None:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            if len(self._fds) < self.budget:
                self._fds[path], kept = fd, True
        try:
            self._used.add(path)
            return os.pread(fd, 1 << 16, 0).decode("ascii", "replace")
        except OSError:  # the cgroup went (ENODEV): forget it
            if not kept:
                return None
            del self._fds[path]
            kept = False
            # A cgroup made again at the same path (a container of the same ID): read it
            # through a new descriptor, kept from the next scrape on.
            return _read(directory, name)
        finally:
            if not kept:
                os.close(fd)

    def sweep(self) -> None:
        """After a scrape: close what it did not read."""
        for path in [p for p in self._fds if p not in self._used]:
            os.close(self._fds.pop(path))
        self._used.clear()


def _fd_budget() -> int:
    """Descriptors metrics may keep open: a quarter of berthd's limit, at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, min(4096, soft // 4 if soft != resource.RLIM_INFINITY else 4096))


# (receive, transmit) bytes and packets of one interface
InterfaceCounters = tuple[int, int, int, int]


def network_counters(pid: int) -> dict[str, InterfaceCounters]:
    """Per interface of the network namespace `pid` is in: /proc/PID/net/dev's counters
    ({} if the process is gone)."""
    text = _read(f"/proc/{pid}/net", "dev")
    out: dict[str, InterfaceCounters] = {}
    for line in (text or "").splitlines()[2:]:  # two header lines
        name, _, numbers = line.partition(":")
        fields = numbers.split()
        name = name.strip()
        if name == "lo" or len(fields) < 10:
            continue
        try:  # receive: bytes packets ... (8 fields), then transmit: bytes packets ...
            out[name] = (int(fields[0]), int(fields[8]), int(fields[1]), int(fields[9]))
        except ValueError:
            continue
    return out


def in_netns(pid: int, netns: int) -> bool | None:
    """Whether `pid` is in network namespace `netns` (an inode), None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == netns
    except OSError:
        return None


# --- what a scrape reports ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A running task whose cgroup a scrape reads."""

    namespace: str
    id: str
    pid: int


@dataclass
class Scrape:
    """One scrape's figures, gathered on the loop (the task table) and in a worker thread
    (files and databases); the collector reports exactly these."""

    targets: list[Target] = field(default_factory=list)
    tasks: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    shims_alive: int = 0
    containers: list[tuple[Target, str, CgroupSample]] = field(default_factory=list)
    networks: list[tuple[Target, str, dict[str, InterfaceCounters]]] = field(default_factory=list)
    content_blobs: int = 0
    content_bytes: int = 0
    snapshots: dict[tuple[str, str], int] = field(default_factory=dict)
    snapshot_bytes: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Sources:
    """The parts of berthd a scrape reads."""

    tasks: TaskService
    store: Store
    exchange: Exchange
    storage: Storage
    standbys: Callable[[], int]


Reading = Callable[[CgroupSample], float | None]

# (name, help, type, what of the sample)
CONTAINER_METRICS: tuple[tuple[str, str, str, Reading], ...] = (
    ("cpu_usage_seconds", "CPU time the container used", "counter", lambda s: s.cpu_seconds),
    ("cpu_user_seconds", "CPU time in user mode", "counter", lambda s: s.cpu_user_seconds),
    ("cpu_system_seconds", "CPU time in kernel mode", "counter", lambda s: s.cpu_system_seconds),
    (
        "memory_usage_bytes",
        "memory charged to the cgroup (cache too)",
        "gauge",
        lambda s: s.memory_usage,
    ),
    (
        "memory_limit_bytes",
        "the cgroup's memory limit (0: unlimited)",
        "gauge",
        lambda s: s.memory_limit,
    ),
    (
        "memory_rss_bytes",
        "anonymous memory (v1 total_rss, v2 anon)",
        "gauge",
        lambda s: s.memory_rss,
    ),
    (
        "memory_cache_bytes",
        "page cache (v1 total_cache, v2 file)",
        "gauge",
        lambda s: s.memory_cache,
    ),
    ("memory_oom_events", "processes the OOM killer killed", "counter", lambda s: s.oom_kills),
    ("pids", "processes and threads in the cgroup", "gauge", lambda s: s.pids),
    ("blkio_read_bytes", "bytes read from block devices", "counter", lambda s: s.io_read_bytes),
    ("blkio_write_bytes", "bytes written to block devices", "counter", lambda s: s.io_write_bytes),
)


# InterfaceCounters' order
NETWORK_METRICS = (
    ("receive_bytes", "bytes received on the interface (its network namespace's own)"),
    ("transmit_bytes", "bytes sent on the interface"),
    ("receive_packets", "packets received on the interface"),
    ("transmit_packets", "packets sent on the interface"),
)


def _labels(target: Target, image: str) -> str:
    """A container's labels in the text format: namespace, id, image."""
    return (
        f'namespace="{_escape_label(target.namespace)}",id="{_escape_label(target.id)}",'
        f'image="{_escape_label(image)}"'
    )


def container_text(scrape: Scrape) -> str:
    """The per-container families in the text format, written straight from the scrape:
    at 100 containers ~1,200 series, for which prometheus_client's family and sample
    objects (a tuple and a labels dict each) took a scrape ~4 ms of CPU, and their garbage
    stayed in berthd's heap. A container's labels are escaped once, not once a series."""
    lines: list[str] = []
    labelled = [(_labels(target, image), sample) for target, image, sample in scrape.containers]
    for name, doc, kind, reading in CONTAINER_METRICS:
        full = f"berth_container_{name}{_SUFFIXES.get(kind, '')}"
        lines.append(f"# HELP {full} {_escape_help(doc)}\n# TYPE {full} {kind}\n")
        for labels, sample in labelled:
            value = reading(sample)
            if value is not None:
                lines.append(f"{full}{{{labels}}} {_sample_value(value)}\n")
    for i, (name, doc) in enumerate(NETWORK_METRICS):
        full = f"berth_container_network_{name}_total"
        lines.append(f"# HELP {full} {_escape_help(doc)}\n# TYPE {full} counter\n")
        for target, image, interfaces in scrape.networks:
            labels = _labels(target, image)
            for interface, counters in sorted(interfaces.items()):
                lines.append(
                    f'{full}{{{labels},interface="{_escape_label(interface)}"}} '
                    f"{_sample_value(counters[i])}\n"
                )
    return "".join(lines)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Collector(registry.Collector):
    """prometheus_client's custom collector: the per-container figures and the daemon's
    counters, as of the scrape under way (`current`)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.current = Scrape()

    def collect(self) -> Iterator[Metric]:
        """The daemon's families; the containers' are written as text (container_text)."""
        yield from self._daemon(self.current)
        yield from self._storage(self.current)

    def _daemon(self, scrape: Scrape) -> Iterator[Metric]:
        s = self.sources
        info = GaugeMetricFamily("berth_build_info", "berthd's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        tasks = GaugeMetricFamily(
            "berth_tasks", "tasks berthd holds, by status", labels=["namespace", "status"]
        )
        for (namespace, status), count in sorted(scrape.tasks.items()):
            tasks.add_metric([namespace, status], count)
        yield tasks
        yield _gauge("berth_shims_alive", "shims berthd supervises", scrape.shims_alive)
        yield _counter(
            "berth_shim_deaths", "shims that died under supervision", s.tasks.shim_deaths
        )
        yield _counter(
            "berth_shim_reconnects",
            "connections to a live shim made again",
            s.tasks.shim_reconnects,
        )
        recovered = CounterMetricFamily(
            "berth_recovered_tasks",
            "tasks found at start-up: reattached to their shim, or reported exited "
            "(shim gone, or alive but unusable and killed)",
            labels=["outcome"],
        )
        for outcome, count in sorted(s.tasks.recovered.items()):
            recovered.add_metric([outcome], count)
        yield recovered
        yield _gauge(
            "berth_recovery_duration_seconds",
            "how long the start-up recovery took",
            s.tasks.recovery_seconds,
        )
        yield _gauge("berth_event_subscribers", "event streams open", s.exchange.subscriber_count)
        yield _counter("berth_events_published", "events published", s.exchange.published)
        yield _counter(
            "berth_events_published_by_clients",
            "events clients published (Events/Publish, Forward)",
            s.exchange.published_by_clients,
        )
        yield _counter(
            "berth_events_published_not_sent",
            "clients' events not sent to a subscriber whose queue held too many",
            s.exchange.published_not_sent,
        )
        yield _counter(
            "berth_events_replayed",
            "events sent again to a client that resubscribed",
            s.exchange.replayed,
        )
        yield _counter(
            "berth_events_dropped",
            "events a subscriber could not take: it fell behind and its stream was ended",
            s.exchange.dropped,
        )
        yield _gauge(
            "berth_standbys_attached",
            "warm standby berthds attached, ready to take over",
            s.standbys(),
        )

    def _storage(self, scrape: Scrape) -> Iterator[Metric]:
        storage = self.sources.storage
        yield _gauge("berth_content_blobs", "blobs in the content store", scrape.content_blobs)
        yield _gauge(
            "berth_content_bytes", "bytes of the content store's blobs", scrape.content_bytes
        )
        snapshots = GaugeMetricFamily(
            "berth_snapshots", "snapshots, by snapshotter and kind", labels=["snapshotter", "kind"]
        )
        for (snapshotter, kind), count in sorted(scrape.snapshots.items()):
            snapshots.add_metric([snapshotter, kind], count)
        yield snapshots
        sizes = GaugeMetricFamily(
            "berth_snapshot_bytes",
            "disk space snapshots use (their own layer: bytes allocated), by snapshotter and kind",
            labels=["snapshotter", "kind"],
        )
        for (snapshotter, kind), size in sorted(scrape.snapshot_bytes.items()):
            sizes.add_metric([snapshotter, kind], size)
        yield sizes
        yield _counter("berth_gc_runs", "garbage collections run", storage.gc_runs)
        yield _counter(
            "berth_gc_duration_seconds", "time spent collecting garbage", storage.gc_seconds
        )
        removed = CounterMetricFamily(
            "berth_gc_removed", "what garbage collections removed, by kind", labels=["kind"]
        )
        for kind, count in sorted(storage.gc_removed.items()):
            removed.add_metric([kind], count)
        yield removed
        freed = CounterMetricFamily(
            "berth_gc_freed_bytes",
            "disk space garbage collections gave back, by kind",
            labels=["kind"],
        )
        for kind, size in sorted(storage.gc_freed_bytes.items()):
            freed.add_metric([kind], size)
        yield freed


def _content_usage(blobs: str) -> tuple[int, int]:
    count = size = 0
    try:
        with os.scandir(blobs) as entries:
            for entry in entries:
                try:
                    size += entry.stat(follow_symlinks=False).st_size
                    count += 1
                except OSError:
                    continue
    except OSError:
        pass
    return count, size


class ProcessFigures(registry.Collector):
    """berthd's own process_* families, as prometheus_client's ProcessCollector writes
    them, but counting open descriptors from the size Linux (6.2+) reports for
    /proc/self/fd rather than by listing it: berthd keeps ~7 cgroup files open a running
    container (OpenFiles), and listing ~1,000 entries was an eighth of a scrape at 100
    containers (profiled). An older kernel reports 0 there: then the listing it is."""

    def __init__(self) -> None:
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._boot = _boot_time()

    def collect(self) -> Iterator[Metric]:
        try:
            with open("/proc/self/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[-1].split()
        except OSError:
            fields = []
        if len(fields) > 21:
            yield _gauge(
                "process_virtual_memory_bytes", "Virtual memory size in bytes.", float(fields[20])
            )
            yield _gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                float(fields[21]) * self._page,
            )
            yield _gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                float(fields[19]) / self._ticks + self._boot,
            )
            yield _counter(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                (float(fields[11]) + float(fields[12])) / self._ticks,
            )
        open_fds = _open_descriptors()
        if open_fds is not None:
            yield _gauge("process_open_fds", "Number of open file descriptors.", open_fds)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY:
            yield _gauge("process_max_fds", "Maximum number of open file descriptors.", soft)


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _open_descriptors() -> int | None:
    try:
        count = os.stat("/proc/self/fd").st_size
        return count if count > 0 else len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _own_netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return -1


ACTIVE_SIZE_TTL = 60.0  # seconds an active snapshot's measured size is reported again


class SnapshotSizes:
    """Snapshots' disk usage for a scrape. A committed snapshot never changes: its size is
    measured once and kept (keyed by snapshotter, key and creation time, dropped when it
    goes); an active one (a container's writable layer, which can hold many files) is
    measured again once its last figure is ACTIVE_SIZE_TTL old, so that no scrape walks
    every writable layer; views hold nothing of their own."""

    def __init__(self) -> None:
        self._committed: dict[tuple[str, str, int], int] = {}
        self._active: dict[tuple[str, str, int], tuple[float, int]] = {}  # -> (when, size)

    def measure(self, name: str, snapshotter: Snapshotter, out: dict[tuple[str, str], int]) -> None:
        seen = set()
        for kind in SNAPSHOT_KINDS:  # every kind has its series, 0 when it has none
            out.setdefault((name, kind), 0)
        for info in snapshotter.walk():
            total = out.setdefault((name, info.kind), 0)
            if info.kind == "view":
                continue
            key = (name, info.key, info.created_at)
            now = time.monotonic()
            if info.kind == "committed":
                size = self._committed.get(key)
            else:
                measured = self._active.get(key)
                size = measured[1] if measured and now - measured[0] < ACTIVE_SIZE_TTL else None
            if size is None:
                try:
                    size = snapshotter.usage(info.key).size
                except (NotFound, OSError):
                    continue
                if info.kind == "committed":
                    self._committed[key] = size
                else:
                    self._active[key] = (now, size)
            seen.add(key)
            out[(name, info.kind)] = total + size
        for cache in (self._committed, self._active):
            for key in [k for k in cache if k[0] == name and k not in seen]:
                del cache[key]


# --- the endpoint ------------------------------------------------------------------------


_BOUNDS = [_sample_value(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]  # `le` labels


class CallFigures(registry.Collector):
    """API calls by method and code, and their latency by method: the families
    prometheus_client's Counter and Histogram would write (no `_created` series), kept in
    plain dicts. Counter and Histogram take a lock at each change and import a
    multiprocess value store: 0.4 MiB of berthd's memory, of the 5% metrics may cost it.
    `observe` runs on the loop; `collect` in the render thread, while the loop may
    observe, so it copies each dict and list before reading it."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}
        # method -> (count per bucket, not cumulative; the last is +Inf), sum of seconds
        self.latency: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.calls[key] = self.calls.get(key, 0) + 1
        figures = self.latency.get(method)
        if figures is None:
            figures = self.latency[method] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        figures[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        figures[1][0] += seconds

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "berth_api_calls",
            "API calls answered, by method and code (ok or the error code)",
            labels=["method", "code"],
        )
        for (method, code), count in list(self.calls.items()):
            calls.add_metric([method, code], count)
        yield calls
        latency = HistogramMetricFamily(
            "berth_api_call_duration_seconds",
            "time to answer an API call (a stream or a wait: its whole life)",
            labels=["method"],
        )
        for method, (counts, total) in list(self.latency.items()):
            cumulative = itertools.accumulate(list(counts))
            latency.add_metric([method], list(zip(_BOUNDS, cumulative, strict=True)), total[0])
        yield latency


class Metrics:
    """The registry berthd's scrapes render, and the API call figures it keeps."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=False)
        self._calls = CallFigures()
        self.registry.register(self._calls)
        self.registry.register(ProcessFigures())
        self.collector = Collector(sources)
        self.registry.register(self.collector)
        self._lock = trio.Lock()
        self._snapshot_sizes = SnapshotSizes()
        self._cgroup_paths: dict[Target, CgroupPaths] = {}  # running tasks' (render only)
        self._host_network: dict[Target, bool] = {}  # whether in berthd's netns (render only)
        self._files = OpenFiles(_fd_budget())  # their cgroup files (render only)

    def observe(self, method: str, code: str, seconds: float) -> None:
        """rpc.Observer: one answered API call."""
        self._calls.observe(method, code, seconds)

    async def render(self) -> bytes:
        """The exposition, one scrape at a time: the task table is copied here, on the
        loop; files and databases are read, and the text written, in a worker thread.
        Measured (scripts/bench --only metrics, 100 containers scraped back to back): a
        `version` call meanwhile takes 0.6 ms (median), against 5.6 ms when the loop did
        the same work itself in steps of 8 containers."""
        async with self._lock:
            scrape = Scrape()
            for handle in self.sources.tasks.handles():
                scrape.tasks[(handle.namespace, handle.init.status)] += 1
                if handle.shim_dead:
                    continue
                scrape.shims_alive += 1
                if handle.init.pid > 0 and not handle.init.exited.is_set():
                    scrape.targets.append(Target(handle.namespace, handle.id, handle.init.pid))
            return await trio.to_thread.run_sync(self._render, scrape)

    def _render(self, scrape: Scrape) -> bytes:
        """In a worker thread: read what the scrape needs, then write the text."""
        images = self.sources.store.container_images()
        mounted: dict[str, str] | None = None
        own_netns = _own_netns()
        known, self._cgroup_paths = self._cgroup_paths, {}
        seen_host, self._host_network = self._host_network, {}
        for target in scrape.targets:
            image = images.get((target.namespace, target.id), "")
            # A task's init stays in the cgroup its shim put it in: looked up once (a
            # read of /proc/PID/cgroup and of the mount table), kept while it runs.
            paths = known.get(target)
            if paths is None:
                mounted = mounted if mounted is not None else cgroups.mounts()
                paths = cgroups.paths_for(target.pid, mounted)
            if paths is not None:
                self._cgroup_paths[target] = paths
                sample = sample_cgroup(paths, self._files.read)
                scrape.containers.append((target, image, sample))
            # Also looked up once: whether the init shares berthd's network namespace (a
            # host-network container, whose interfaces are the host's, not its own).
            # /proc/PID/net/dev is opened afresh each time, not kept as the cgroup files
            # are: an open one holds its network namespace alive (after the task, until
            # the next scrape, or for good if scrapes stop), and a PID taken again by
            # another container's init would read the old namespace through it.
            host = seen_host.get(target)
            if host is None:
                host = in_netns(target.pid, own_netns)
            if host is None:
                continue  # gone
            self._host_network[target] = host
            if host:
                continue
            interfaces = network_counters(target.pid)
            if interfaces:
                scrape.networks.append((target, image, interfaces))
        self._files.sweep()
        storage = self.sources.storage
        scrape.content_blobs, scrape.content_bytes = _content_usage(storage.content.blobs)
        for name, snapshotter in storage.snapshotters.items():
            for kind, count in {**dict.fromkeys(SNAPSHOT_KINDS, 0), **snapshotter.counts()}.items():
                scrape.snapshots[(name, kind)] = count
            self._snapshot_sizes.measure(name, snapshotter, scrape.snapshot_bytes)
        self.collector.current = scrape
        try:
            return container_text(scrape).encode() + exposition(self.registry.collect())
        finally:
            self.collector.current = Scrape()


class BadRequest(Exception):
    pass


HEAD_END = re.compile(rb"\r?\n\r?\n")
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_head(head: bytes) -> tuple[str, str]:
    """The method and the path (without its query) of an HTTP/1.x request head;
    BadRequest if it is not one."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request head is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not TOKEN.fullmatch(method):
        raise BadRequest("malformed method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("only HTTP/1.0 and HTTP/1.1 are served")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest("malformed request target")
    for line in lines[1:]:
        name, colon, _ = line.partition(":")
        if line and (not colon or not TOKEN.fullmatch(name)):
            raise BadRequest("malformed header line")
    return method, target.split("?", 1)[0]


def route(method: str, path: str) -> int:
    """The status of a well-formed request: 200 for GET /v1/metrics."""
    if path != PATH:
        return 404
    if method != "GET":
        return 405
    return 200


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    headers = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


async def read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """The request head (up to the blank line); None if the client left first;
    BadRequest if it outgrows MAX_HEAD."""
    buffer = bytearray()
    while True:
        match = HEAD_END.search(buffer)
        if match is not None:
            return bytes(buffer[: match.start()])
        if len(buffer) > MAX_HEAD:
            raise BadRequest(f"request head larger than {MAX_HEAD} bytes")
        data = await stream.receive_some(4096)
        if not data:
            return None
        buffer += data


async def _linger(stream: trio.SocketStream) -> None:
    """After the answer: end our side, then read what the client still sends (a body, the
    rest of an oversize head) until it closes, for a while. Closing with unread data would
    reset the connection, and a reset can destroy the answer before the client reads it."""
    await stream.send_eof()
    with trio.move_on_after(1.0):
        for _ in range(16):
            if not await stream.receive_some(65536):
                return


class MetricsServer:
    """GET /v1/metrics on `address` (HOST:PORT), served from the loop it runs on."""

    def __init__(self, address: str, metrics: Metrics) -> None:
        self.address = address
        self.host, self.port = split_host_port(address, "[metrics] address")
        self.metrics = metrics
        self._slots = trio.Semaphore(MAX_CONNECTIONS)

    async def serve(self) -> None:
        listeners = await self._bind()
        log.info("serving metrics on http://%s%s", self.address, PATH)
        await trio.serve_listeners(self._connection, listeners)

    async def _bind(self) -> list[trio.SocketListener]:
        """Listen; a port still held (by a predecessor handing over, say) is tried
        again, with a word in the log if that lasts."""
        delay = 0.05
        while True:
            try:
                return await trio.open_tcp_listeners(self.port, host=self.host)
            except OSError as exc:
                if delay >= 1.0:
                    log.error("cannot serve metrics on %s: %s; trying again", self.address, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            try:
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_after(1.0):
                    await stream.send_all(response(503, b"too many scrapes at once\n"))
                    await _linger(stream)
                return
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    answer = await self._answer(stream)
                    if answer:
                        await stream.send_all(answer)
                        await _linger(stream)
            finally:
                self._slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("metrics request failed")
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _answer(self, stream: trio.SocketStream) -> bytes:
        try:
            head = await read_head(stream)
            if head is None:
                return b""
            method, path = parse_head(head)
        except BadRequest as exc:
            return response(400, f"{exc}\n".encode())
        status = route(method, path)
        if status != 200:
            return response(status, f"{REASONS[status].lower()}: {method} {path}\n".encode())
        try:
            body = await self.metrics.render()
        except Exception:
            log.exception("metrics scrape failed")
            return response(500, b"the scrape failed: see berthd's log\n")
        return response(200, body, CONTENT_TYPE)
