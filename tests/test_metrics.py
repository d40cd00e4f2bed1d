"""berthd's Prometheus endpoint ([metrics] address, daemon/metrics.py): the exposition a
scrape returns, `promtool check metrics` on it, a real Prometheus (Debian's package)
scraping berthd while containers run, and HTTP input that must change nothing."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from berth.daemon import metrics
from berth.daemon.config import split_host_port
from berth.daemon.oci import default_spec
from berth.shim.cgroups import CgroupPaths
from berth.shim.wire.errors import InvalidArgument, NotFound
from tests.support.helpers import BERTHD, Daemon, is_gone, kill, wait_until
from tests.support.images import build_oci_archive

pytestmark = pytest.mark.container

IMAGE = "docker.io/library/busybox:latest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def metered_daemon(top_config: str = "") -> Iterator[Daemon]:
    """A berthd serving metrics on a free loopback port (`.metrics_port`)."""
    port = free_port()
    d = Daemon(top_config=top_config, extra_config=f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    d.metrics_port = port  # type: ignore[attr-defined]
    try:
        wait_until(lambda: _answers(port), timeout=15, what="the metrics endpoint")
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def metered() -> Iterator[Daemon]:
    with metered_daemon() as d:
        yield d


def _answers(port: int) -> bool:
    try:
        return get(port)[0] == 200
    except OSError:
        return False


def get(port: int, path: str = metrics.PATH, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type") or "", reply.read().decode()
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)], from the exposition (prometheus_client's parser)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The value of the one sample `name` whose labels include `labels`."""
    matching = [v for lab, v in found.get(name, []) if labels.items() <= lab.items()]
    assert len(matching) == 1, (name, labels, found.get(name))
    return matching[0]


def run_task(daemon: Daemon, cid: str, args: list[str], image: str = "") -> int:
    spec = default_spec(cid, daemon.namespace, args, root="", readonly_root=True)
    params: dict[str, Any] = {"id": cid, "spec": spec}
    if image:
        params["image"] = image
    daemon.call("containers.create", params)
    pid = int(daemon.call("tasks.create", {"container_id": cid})["pid"])
    daemon.call("tasks.start", {"container_id": cid})
    return pid


def stop_task(daemon: Daemon, cid: str) -> None:
    daemon.call("tasks.kill", {"container_id": cid, "signal": "SIGKILL"})
    daemon.call("tasks.wait", {"container_id": cid})
    daemon.call("tasks.delete", {"container_id": cid})
    daemon.call("containers.delete", {"id": cid})


# --- units (no daemon) ------------------------------------------------------------------


def test_request_heads_are_parsed_strictly() -> None:
    assert metrics.parse_head(b"GET /v1/metrics HTTP/1.1\r\nHost: x\r\nAccept: */*") == (
        "GET",
        "/v1/metrics",
    )
    assert metrics.parse_head(b"GET /v1/metrics?x=1 HTTP/1.0") == ("GET", "/v1/metrics")
    assert metrics.parse_head(b"POST /v1/metrics HTTP/1.1\nContent-Length: 3") == (
        "POST",
        "/v1/metrics",
    )
    for bad in (
        b"",
        b"garbage",
        b"GET /v1/metrics",
        b"GET  /v1/metrics HTTP/1.1",
        b"GET /v1/metrics HTTP/2.0",
        b"GET v1/metrics HTTP/1.1",
        b"GET http://x/v1/metrics HTTP/1.1",
        b"G(T /v1/metrics HTTP/1.1",
        b"GET /v1/\xffmetrics HTTP/1.1",
        b"GET /v1/metrics HTTP/1.1\r\nno colon here",
        b"GET /v1/metrics HTTP/1.1\r\nbad name: x",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ):
        with pytest.raises(metrics.BadRequest):
            metrics.parse_head(bad)
    assert metrics.route("GET", "/v1/metrics") == 200
    assert metrics.route("GET", "/metrics") == 404
    assert metrics.route("POST", "/nope") == 404
    assert metrics.route("HEAD", "/v1/metrics") == 405
    reply = metrics.response(405, b"x\n")
    assert reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Allow: GET\r\n" in reply and reply.endswith(b"\r\n\r\nx\n")


async def test_request_heads_are_read_in_bounds() -> None:
    """A head split across reads is put together; one that outgrows MAX_HEAD is refused
    before it is all read; a client leaving first is no error."""
    client, server = trio.testing.memory_stream_pair()
    for piece in (b"GET /v1/met", b"rics HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\nbody"):
        await client.send_all(piece)
    assert await metrics.read_head(server) == b"GET /v1/metrics HTTP/1.1\r\nHost: x"
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\nX: " + b"a" * (metrics.MAX_HEAD + 10))
    with pytest.raises(metrics.BadRequest, match="larger than"):
        await metrics.read_head(server)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\n")
    await client.aclose()
    assert await metrics.read_head(server) is None


def test_only_berthd_loads_prometheus_client() -> None:
    """The CLI, the shim and berthd with metrics off never import prometheus_client."""
    probe = (
        "import sys, berth.daemon.main, berth.daemon.cli.main, berth.shim.main\n"
        "loaded = [m for m in sys.modules if m.startswith('prometheus_client')]\n"
        "assert not loaded, loaded\n"
        "import berth.daemon.metrics\n"
        "assert 'prometheus_client.registry' in sys.modules\n"
        "unused = {'prometheus_client.exposition', 'http.server', 'wsgiref.simple_server',\n"
        "          'urllib.request', 'email'}\n"
        "assert not unused & set(sys.modules), unused & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


def test_the_exposition_reads_as_prometheus_client_s_own() -> None:
    """berthd writes the text format itself (prometheus_client's writer would import an
    HTTP server into berthd): parsed, every family, type, help text and sample equals what
    prometheus_client's generate_latest writes for the same registry, with values at the
    edges and label values that need escaping."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics import disable_created_metrics

    disable_created_metrics()  # berthd writes no `_created` series (CallFigures)
    from prometheus_client.metrics_core import GaugeMetricFamily
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    calls = Counter(
        "x_calls", 'calls "quoted"\\ with a\nnewline', ["method", "code"], registry=registry
    )
    calls.labels('a"b', "c\\d\ne").inc(3)
    calls.labels("", "ok").inc(0.5)
    latency = Histogram("x_seconds", "latency", ["method"], registry=registry)
    for value in (0.0001, 0.3, 7.0, 1e9):
        latency.labels("m").observe(value)
    Gauge("x_plain", "no labels", registry=registry).set(1234567.0)
    ProcessCollector(registry=registry)

    class Edges:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            family = GaugeMetricFamily("x_edges", "edge values", labels=["kind"])
            for kind, value in (
                ("nan", float("nan")),
                ("inf", float("inf")),
                ("-inf", float("-inf")),
                ("big", 2.0**63),
                ("tiny", 5e-324),
                ("negative", -1.5),
                ("unicode", 1.0),
            ):
                family.add_metric([kind if kind != "unicode" else "caf\u00e9 \u2603"], value)
            yield family

    registry.register(Edges())  # type: ignore[arg-type]

    def parsed(text: bytes) -> list[tuple[str, str, str, list[tuple[str, tuple[Any, ...], str]]]]:
        return [
            (
                family.name,
                family.type,
                family.documentation,
                sorted(
                    (s.name, tuple(sorted(s.labels.items())), repr(s.value)) for s in family.samples
                ),
            )
            for family in text_string_to_metric_families(text.decode())
        ]

    class Fixed:  # one collection for both writers (the process' CPU time moves on)
        families = list(registry.collect())

        def collect(self) -> list[Any]:
            return self.families

    fixed = CollectorRegistry(auto_describe=False)
    fixed.register(Fixed())  # type: ignore[arg-type]
    ours = metrics.exposition(fixed.collect())
    theirs = generate_latest(fixed)
    assert parsed(ours) == parsed(theirs)
    assert len(parsed(ours)) >= 5 and b"x_calls_total{" in ours


def test_the_containers_series_are_written_straight_and_read_back_whole() -> None:
    """container_text writes the per-container families without prometheus_client's
    objects: every value and label (escaped where it must be) reads back with
    prometheus_client's parser; a figure a container lacks is left out, not zero."""
    odd = metrics.Target("ns", 'id "with"\\ odd\ncharacters', 42)
    plain = metrics.Target("default", "web", 43)
    full = metrics.CgroupSample(
        cpu_seconds=1.5,
        cpu_user_seconds=1.0,
        cpu_system_seconds=0.5,
        memory_usage=2**40,
        memory_limit=0,
        memory_rss=123456789,
        memory_cache=7,
        oom_kills=2,
        pids=3,
        io_read_bytes=2**63,
        io_write_bytes=0,
    )
    scrape = metrics.Scrape()
    scrape.containers = [(odd, "caf\u00e9:1", full), (plain, "", metrics.CgroupSample(pids=1))]
    scrape.networks = [(odd, "caf\u00e9:1", {"eth0": (1, 2, 3, 4), "e\\1": (5, 6, 7, 8)})]
    families = {f.name: f for f in text_string_to_metric_families(metrics.container_text(scrape))}
    for name, _doc, kind, reading in metrics.CONTAINER_METRICS:
        family = families[f"berth_container_{name}"]
        assert family.type == kind
        got = {s.labels["id"]: (s.labels, s.value) for s in family.samples}
        want = reading(full)
        assert got[odd.id] == ({"namespace": "ns", "id": odd.id, "image": "caf\u00e9:1"}, want)
        if name == "pids":
            assert got["web"] == ({"namespace": "default", "id": "web", "image": ""}, 1)
        else:
            assert "web" not in got
    received = families["berth_container_network_receive_bytes"]
    assert {s.labels["interface"]: s.value for s in received.samples} == {"eth0": 1, "e\\1": 5}
    packets = families["berth_container_network_transmit_packets"]
    assert {s.labels["interface"]: s.value for s in packets.samples} == {"eth0": 4, "e\\1": 8}


def test_metrics_address_is_checked() -> None:
    assert split_host_port("127.0.0.1:1338", "a") == ("127.0.0.1", 1338)
    assert split_host_port("[::1]:9100", "a") == ("::1", 9100)
    assert split_host_port("localhost:80", "a") == ("localhost", 80)
    for bad in ("1338", ":1338", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "h:x", "a b:1"):
        with pytest.raises(InvalidArgument):
            split_host_port(bad, "a")
    # berthd refuses a bad address in one line, before it touches anything.
    with tempfile.TemporaryDirectory(prefix="bt-", dir="/tmp") as directory:
        state = os.path.join(directory, "state")
        r = subprocess.run(
            [BERTHD, "--root", directory, "--state", state, "--metrics-address", "nope"],
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 2
        assert b"[metrics] address must be HOST:PORT" in r.stderr, r.stderr
        assert not os.path.exists(state)


def _files(directory: Path, files: dict[str, str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return str(directory)


def test_cgroup_files_v1_and_v2_are_read(tmp_path: Path) -> None:
    """The parsers on files laid out as the kernel writes them (this machine runs one
    layout; the other is checked here)."""
    hz = os.sysconf("SC_CLK_TCK")
    v1 = CgroupPaths(
        version=1,
        memory=_files(
            tmp_path / "memory",
            {
                "memory.usage_in_bytes": "8192\n",
                "memory.limit_in_bytes": "9223372036854771712\n",
                "memory.stat": "cache 1\nrss 2\ntotal_cache 4096\ntotal_rss 2048\n",
                "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            },
        ),
        cpu=_files(
            tmp_path / "cpuacct",
            {"cpuacct.usage": "2500000000\n", "cpuacct.stat": f"user {2 * hz}\nsystem {hz}\n"},
        ),
        pids=_files(tmp_path / "pids", {"pids.current": "7\n"}),
        blkio=_files(
            tmp_path / "blkio",
            {
                "blkio.throttle.io_service_bytes": "8:0 Read 100\n8:0 Write 50\n8:0 Sync 9\n"
                "8:16 Read 1\n8:16 Write 2\nTotal 153\n"
            },
        ),
    )
    s = metrics.sample_cgroup(v1)
    assert (s.cpu_seconds, s.cpu_user_seconds, s.cpu_system_seconds) == (2.5, 2.0, 1.0)
    assert (s.memory_usage, s.memory_limit, s.memory_rss, s.memory_cache) == (8192, 0, 2048, 4096)
    assert (s.oom_kills, s.pids, s.io_read_bytes, s.io_write_bytes) == (3, 7, 101, 52)

    unified = _files(
        tmp_path / "unified",
        {
            "cpu.stat": "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n",
            "memory.current": "65536\n",
            "memory.max": "1048576\n",
            "memory.stat": "anon 4096\nfile 8192\nkernel 1\n",
            "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
            "pids.current": "3\n",
            "io.stat": "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"
            "8:16 rbytes=5 wbytes=5 rios=1 wios=1 dbytes=0 dios=0\n",
        },
    )
    s = metrics.sample_cgroup(CgroupPaths(2, unified, unified, unified, unified))
    assert (s.cpu_seconds, s.cpu_user_seconds, s.cpu_system_seconds) == (1.5, 1.0, 0.5)
    assert (s.memory_usage, s.memory_limit, s.memory_rss, s.memory_cache) == (
        65536,
        1048576,
        4096,
        8192,
    )
    assert (s.oom_kills, s.pids, s.io_read_bytes, s.io_write_bytes) == (1, 3, 15, 25)
    (tmp_path / "unified" / "memory.max").write_text("max\n")
    (tmp_path / "unified" / "io.stat").unlink()
    s = metrics.sample_cgroup(CgroupPaths(2, unified, unified, unified, unified))
    assert (s.memory_limit, s.io_read_bytes, s.io_write_bytes) == (0, None, None)
    # A cgroup that is gone (the container exited during the scrape): nothing, no error.
    gone = str(tmp_path / "gone")
    s = metrics.sample_cgroup(CgroupPaths(1, gone, gone, gone, gone))
    assert s == metrics.CgroupSample()


# --- berthd -----------------------------------------------------------------------------


def test_a_stat_line_is_found_by_its_whole_key() -> None:
    """_field finds `key value` lines by the whole key: not a longer key it begins
    (oom_kill_disable), nor one that ends with it (total_rss for rss); the first line,
    the last without its newline, and a value that is not a number (None) too."""
    text = "oom_kill_disable 1\nunder_oom 0\ntotal_rss 7\nrss 5\noom_kill 3"
    assert metrics._field(text, "oom_kill") == 3
    assert metrics._field(text, "oom_kill_disable") == 1
    assert metrics._field(text, "rss") == 5
    assert metrics._field(text, "total_rss") == 7
    assert metrics._field(text, "kill") is None
    assert metrics._field("user x\nsystem 2\n", "user") is None
    assert metrics._field(None, "user") is None
    assert metrics._count("under_oom 0\n", "oom_kill") == 0  # an older kernel: no such line
    assert metrics._count(None, "oom_kill") is None


def test_cgroup_files_stay_open_between_scrapes(tmp_path: Path) -> None:
    """OpenFiles: a file is read afresh from offset 0 through the descriptor it keeps,
    within its budget; what a scrape did not read is closed after it."""
    files = metrics.OpenFiles(budget=1)
    (tmp_path / "a").write_text("1\n")
    (tmp_path / "b").write_text("2\n")
    fds_before = len(os.listdir("/proc/self/fd"))
    assert files.read(str(tmp_path), "a") == "1\n"
    assert files.read(str(tmp_path), "b") == "2\n"  # over budget: opened and closed
    assert files.read(str(tmp_path), "missing") is None
    assert files.read(None, "a") is None
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    (tmp_path / "a").write_text("10\n")  # same inode: the kept descriptor sees it
    assert files.read(str(tmp_path), "a") == "10\n"
    files.sweep()
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1  # `a` was read: kept
    files.sweep()  # a scrape that read nothing
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_metrics_are_off_by_default(daemon: Daemon) -> None:
    assert psutil.Process(daemon.pid).net_connections(kind="inet") == []


def test_scrape_reports_containers_and_the_daemon(metered: Daemon, busybox_rootfs: str) -> None:
    port: int = metered.metrics_port  # type: ignore[attr-defined]
    ns = metered.namespace
    archive = os.path.join(metered.dir, "image.tar")
    build_oci_archive(busybox_rootfs, archive, name=IMAGE)
    metered.cli("images", "import", archive, check=True)
    # c1 from the image, as an operator runs it (its record names the image); c2 without.
    busy_loop = "head -c 200000 /dev/zero > /written; while :; do :; done"
    metered.cli("run", "-d", IMAGE, "c1", "sh", "-c", busy_loop, check=True)
    # written before the first scrape measures c1's layer (kept for ACTIVE_SIZE_TTL)
    wait_until(
        lambda: (
            metered.cli(
                "tasks",
                "exec",
                "--exec-id",
                "w",
                "c1",
                "sh",
                "-c",
                "[ $(wc -c < /written) = 200000 ]",
            ).returncode
            == 0
        ),
        what="c1's file written",
    )
    pid = int(metered.call("tasks.get", {"container_id": "c1"})["pid"])
    run_task(metered, "c2", ["sleep", "600"])
    with pytest.raises(NotFound):
        metered.call("containers.get", {"id": "missing"})
    with pytest.raises(Exception, match="unknown method"):
        metered.call("no.such.method", {})
    metered.cli("gc", check=True)

    def busy() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        found = samples(get(port)[2])
        used = value(found, "berth_container_cpu_usage_seconds_total", id="c1")
        return found if used > 0.2 else None

    found = wait_until(busy, timeout=30, what="c1 to use CPU")
    status, content_type, text = get(port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")

    c1 = {"namespace": ns, "id": "c1", "image": IMAGE}
    for name in (
        "berth_container_cpu_usage_seconds_total",
        "berth_container_cpu_user_seconds_total",
        "berth_container_cpu_system_seconds_total",
        "berth_container_memory_usage_bytes",
        "berth_container_memory_limit_bytes",
        "berth_container_memory_rss_bytes",
        "berth_container_memory_cache_bytes",
        "berth_container_memory_oom_events_total",
        "berth_container_pids",
        "berth_container_blkio_read_bytes_total",
        "berth_container_blkio_write_bytes_total",
    ):
        assert [labels for labels, _ in found[name] if labels["id"] == "c1"] == [c1], name
    assert value(found, "berth_container_memory_usage_bytes", id="c1") > 0
    assert value(found, "berth_container_pids", id="c1") >= 1
    assert value(found, "berth_container_pids", id="c2", image="") == 1
    # The figures are the cgroup's own: the same files the shim reads for tasks.metrics.
    with open(f"/proc/{pid}/cgroup") as f:
        assert f"/berth/{ns}/c1" in f.read()

    assert value(found, "berth_tasks", namespace=ns, status="running") == 2
    assert value(found, "berth_shims_alive") == 2
    assert value(found, "berth_api_calls_total", method="containers.get", code="not_found") == 1
    assert value(found, "berth_api_calls_total", method="unknown", code="unimplemented") == 1
    # c1, c2 and the exec that checked c1s file
    assert value(found, "berth_api_calls_total", method="tasks.start", code="ok") == 3
    assert value(found, "berth_api_call_duration_seconds_count", method="tasks.create") == 2
    assert value(found, "berth_content_blobs") >= 3  # index or manifest, config, layer
    assert value(found, "berth_content_bytes") > 500_000  # busybox-static, compressed
    assert value(found, "berth_snapshots", snapshotter="overlayfs", kind="committed") == 1
    assert value(found, "berth_snapshots", snapshotter="overlayfs", kind="active") == 1
    # busybox-static unpacked is ~1-2 MiB; c1's writable layer holds what it wrote
    layer = value(found, "berth_snapshot_bytes", snapshotter="overlayfs", kind="committed")
    assert layer > 900_000
    assert value(found, "berth_snapshot_bytes", snapshotter="overlayfs", kind="active") >= 200_000
    assert value(found, "berth_api_call_duration_seconds_bucket", method="gc", le="+Inf") == 1
    assert value(found, "berth_events_published_total") >= 6  # 2 x containers, create, start
    assert value(found, "berth_gc_runs_total") >= 1
    assert value(found, "berth_standbys_attached") == 0
    assert value(found, "process_resident_memory_bytes") > 0
    assert "berth_event_subscribers" in found

    # promtool (Debian's prometheus package) finds no problem in the exposition.
    check = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    # An exited task is no longer read; it is counted as stopped.
    metered.call("tasks.kill", {"container_id": "c2", "signal": "SIGKILL"})
    metered.call("tasks.wait", {"container_id": "c2"})
    found = samples(get(port)[2])
    assert [lab["id"] for lab, _ in found["berth_container_pids"]] == ["c1"]
    assert value(found, "berth_tasks", namespace=ns, status="stopped") == 1
    metered.call("tasks.delete", {"container_id": "c2"})
    metered.cli("tasks", "rm", "-f", "c1", check=True)
    metered.cli("containers", "rm", "c1", check=True)
    # What a collection gives back is counted in bytes, by kind, and `berth gc` says so.
    metered.cli("images", "rm", IMAGE, check=True)
    out = metered.cli("gc", check=True).stdout.decode()
    assert "freed " in out and " MiB" in out, out
    found = samples(get(port)[2])
    assert value(found, "berth_gc_freed_bytes_total", kind="snapshots") >= layer
    assert value(found, "berth_gc_freed_bytes_total", kind="blobs") > 500_000
    assert value(found, "berth_snapshot_bytes", snapshotter="overlayfs", kind="committed") == 0


def test_bad_requests_change_nothing(metered: Daemon) -> None:
    port: int = metered.metrics_port  # type: ignore[attr-defined]
    pid = metered.pid
    assert raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert get(port, "/")[0] == 404
    assert get(port, method="POST")[0] == 405
    assert raw(port, b"DELETE /v1/metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").startswith(
        b"HTTP/1.1 405 "
    )
    for bad in (
        b"garbage\r\n\r\n",
        b"GET /v1/metrics HTTP/3\r\n\r\n",
        b"GET /v1/metrics HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET /v1/\xc3\xa9 HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # an HTTP/2 preface
        b"GET /v1/metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",  # oversize head
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64) + b"\n\n",  # TLS
    ):
        assert raw(port, bad).startswith(b"HTTP/1.1 400 Bad Request\r\n"), bad[:40]
    # Clients that leave early, send nothing, or send half a head and wait.
    for data in (b"", b"GET /v1/met"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(data)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics.MAX_CONNECTIONS)]
    try:
        for s in idle:
            s.sendall(b"GET /v1/metrics HTTP/1.1\r\n")
        time.sleep(1)  # let berthd take them all in (not a measurement)
        # One too many at once: refused with 503 at once, never queued.
        assert raw(port, b"GET /v1/metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
        assert select.select(idle, [], [], 0)[0] == []  # those wait for the rest of a head
        # The API is not held up by them.
        assert metered.call("version")["version"]
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: _answers(port), timeout=15, what="the endpoint after the idle clients")
    # A slow client's half head is answered once it is complete.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /v1/metrics HTTP/1.0\r\n")
        assert select.select([s], [], [], 0.5)[0] == []
        s.sendall(b"Host: x\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 200 OK\r\n")
    assert metered.pid == pid and not is_gone(pid)
    assert metered.call("version")["version"]
    assert "Traceback" not in metered.log_text()


def test_metrics_follow_a_takeover(metered: Daemon) -> None:
    """The successor of an upgrade serves the same endpoint (the port passes when the
    predecessor stops its services) and counts the task it adopted."""
    port: int = metered.metrics_port  # type: ignore[attr-defined]
    run_task(metered, "c1", ["sleep", "600"], image=IMAGE)
    found = samples(get(port)[2])
    assert value(found, "berth_recovered_tasks_total", outcome="reattached") == 0
    metered.take_over()

    def adopted() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        with contextlib.suppress(OSError):
            found = samples(get(port)[2])
            if value(found, "berth_recovered_tasks_total", outcome="reattached") == 1:
                return found
        return None

    found = wait_until(adopted, timeout=30, what="the successor's metrics")
    assert value(found, "berth_container_pids", id="c1", image=IMAGE) == 1
    assert value(found, "berth_tasks", namespace=metered.namespace, status="running") == 1
    stop_task(metered, "c1")


def test_metrics_follow_a_standby_takeover() -> None:
    """The active daemon counts its warm standby; killed (-9), the standby takes over and
    serves the same endpoint, with the task it adopted, and a fresh standby behind it."""
    with metered_daemon(top_config="standby = true\n") as d:
        port: int = d.metrics_port  # type: ignore[attr-defined]
        run_task(d, "c1", ["sleep", "600"], image=IMAGE)

        def standbys() -> float:
            with contextlib.suppress(OSError):
                return value(samples(get(port)[2]), "berth_standbys_attached")
            return -1

        wait_until(lambda: standbys() == 1, timeout=30, what="a standby counted")
        first = d.active_pid()
        kill(first)
        wait_until(lambda: d.active_pid() not in (0, first), timeout=15, what="the takeover")
        d.adopt_active()

        def adopted() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            with contextlib.suppress(OSError):
                found = samples(get(port)[2])
                reattached = value(found, "berth_recovered_tasks_total", outcome="reattached")
                # the container's series come with the first scrape that finds its cgroup
                if reattached == 1 and any(
                    labels.get("id") == "c1" for labels, _ in found.get("berth_container_pids", [])
                ):
                    return found
            return None

        found = wait_until(adopted, timeout=30, what="the successor's metrics")
        assert value(found, "berth_container_pids", id="c1", image=IMAGE) == 1
        wait_until(lambda: standbys() == 1, timeout=30, what="a fresh standby counted")
        stop_task(d, "c1")


class Prometheus:
    """Debian's prometheus, started by a test on loopback with its own config and storage,
    scraping one target every second; stopped by pid."""

    def __init__(self, target: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="bt-prom-", dir="/tmp")
        self.port = free_port()
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: berth\n    metrics_path: /v1/metrics\n"
                f"    static_configs:\n      - targets: ['{target}']\n"
            )
        self.log = open(os.path.join(self.dir, "prometheus.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as reply:
            doc = json.load(reply)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def series(self, promql: str) -> list[dict[str, Any]]:
        """The query's result, or [] while Prometheus starts or has no sample yet."""
        assert self.proc.poll() is None, self.log_text()
        try:
            return self.query(promql)
        except OSError:
            return []

    def log_text(self) -> str:
        return Path(self.dir, "prometheus.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            kill(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill(self.proc.pid)
                self.proc.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_a_real_prometheus_scrapes_berthd(metered: Daemon) -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (scripts/setup installs it)")
    port: int = metered.metrics_port  # type: ignore[attr-defined]
    ns = metered.namespace
    run_task(metered, "web", ["sh", "-c", "while :; do :; done"], image=IMAGE)
    run_task(metered, "idle", ["sleep", "600"])
    prometheus = Prometheus(f"127.0.0.1:{port}")
    try:
        up = wait_until(
            lambda: prometheus.series('up{job="berth"} == 1'), timeout=60, what="up == 1"
        )
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        cpu = wait_until(
            lambda: prometheus.series(
                f'rate(berth_container_cpu_usage_seconds_total{{namespace="{ns}"}}[5s]) > 0.1'
            ),
            timeout=60,
            what="web's CPU rate",
        )
        assert [r["metric"] for r in cpu] == [
            {"namespace": ns, "id": "web", "image": IMAGE, "instance": f"127.0.0.1:{port}"}
            | {"job": "berth"}
        ]
        memory = prometheus.series(f'berth_container_memory_usage_bytes{{namespace="{ns}"}}')
        by_id = {r["metric"]["id"]: r for r in memory}
        assert sorted(by_id) == ["idle", "web"]
        assert by_id["web"]["metric"]["image"] == IMAGE
        assert "image" not in by_id["idle"]["metric"]  # not known: no label
        assert all(float(r["value"][1]) > 0 for r in memory)
        tasks = prometheus.series(f'berth_tasks{{namespace="{ns}",status="running"}}')
        assert [r["value"][1] for r in tasks] == ["2"]
        assert prometheus.series('berth_api_calls_total{method="tasks.start",code="ok"}')
    finally:
        prometheus.stop()
    assert is_gone(prometheus.proc.pid)
    stop_task(metered, "web")
    stop_task(metered, "idle")


def test_own_process_figures_are_prometheus_client_s_families() -> None:
    """berthd's process_* families (counted without listing /proc/self/fd) carry the same
    names, types, help texts and values as prometheus_client's ProcessCollector."""
    from prometheus_client.process_collector import ProcessCollector

    keep = [os.open("/dev/null", os.O_RDONLY) for _ in range(50)]  # a count that moves
    try:
        ours = {m.name: m for m in metrics.ProcessFigures().collect()}
        theirs = {m.name: m for m in ProcessCollector(registry=None).collect()}
    finally:
        for fd in keep:
            os.close(fd)
    assert ours.keys() == theirs.keys()
    assert len(ours) == 6
    for name, family in ours.items():
        other = theirs[name]
        assert (family.type, family.documentation) == (other.type, other.documentation)
        assert [s.name for s in family.samples] == [s.name for s in other.samples]
        mine, reference = family.samples[0].value, other.samples[0].value
        if name in ("process_resident_memory_bytes", "process_virtual_memory_bytes"):
            assert abs(mine - reference) <= 4 << 20  # both read /proc/self/stat, a moment apart
        elif name == "process_cpu_seconds":
            assert abs(mine - reference) <= 0.1
        elif name == "process_open_fds":
            assert abs(mine - reference) <= 1  # the listing holds one of its own
            assert mine >= 50
        else:
            assert mine == reference, name


def test_call_figures_write_what_counter_and_histogram_would() -> None:
    """berthd counts API calls in plain dicts (CallFigures): the same families, samples and
    values as prometheus_client's Counter and Histogram given the same calls, boundary
    latencies included (a bucket's bound counts as inside it)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics import disable_created_metrics

    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=False)
    ours = metrics.CallFigures()
    families = {m.name: m for m in ours.collect()}
    calls = Counter(
        "berth_api_calls",
        families["berth_api_calls"].documentation,
        ["method", "code"],
        registry=registry,
    )
    latency = Histogram(
        "berth_api_call_duration_seconds",
        families["berth_api_call_duration_seconds"].documentation,
        ["method"],
        registry=registry,
    )
    observed = [
        ("tasks.start", "ok", 0.0),
        ("tasks.start", "ok", 0.005),
        ("tasks.start", "not_found", 0.0050001),
        ("gc", "ok", 10.0),
        ("gc", "ok", 10.5),
        ("events.subscribe", "cancelled", 3600.0),
        ("version", "ok", 0.25),
    ]
    for method, code, seconds in observed:
        ours.observe(method, code, seconds)
        calls.labels(method, code).inc()
        latency.labels(method).observe(seconds)

    def parsed(text: bytes) -> list[tuple[str, str, str, list[tuple[str, Any, float]]]]:
        return [
            (
                family.name,
                family.type,
                family.documentation,
                sorted((s.name, sorted(s.labels.items()), s.value) for s in family.samples),
            )
            for family in text_string_to_metric_families(text.decode())
        ]

    assert parsed(metrics.exposition(ours.collect())) == parsed(generate_latest(registry))
    assert len(parsed(generate_latest(registry))[1][3]) == 4 * 17  # 15 buckets, count, sum
