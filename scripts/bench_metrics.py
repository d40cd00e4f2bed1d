"""The metrics figures of the benchmark (scripts/bench --only metrics): how long a scrape of
berthd's `/v1/metrics` takes at 20 and 100 containers, whether a scrape holds up the API
(berthd's loop), and what metrics cost berthd in RSS and CPU: two berthds side by side,
one with `[metrics]` and one without, the same containers and the same light API load,
the first scraped every second (harsher than Prometheus' example 15 s and its default 1 min).

Imported by scripts/bench.py; every process it starts is stopped by pid (through the
bench's Daemon reapers).
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import BERTHD, NS, Bench, Berth, Daemon, _free_port, mem_rollup, sh
from berth.shim.wire.client import Client

TICKS = os.sysconf("SC_CLK_TCK")
SCRAPE_INTERVAL = 1.0  # the steady scrape (Prometheus' default is 1 min, its example 15 s)
LOAD_INTERVAL = 0.1  # the light API load both daemons serve: tasks.list + version


class MeteredBerth(Berth):
    """A berthd of its own for these figures, with metrics on `port` (or off: None)."""

    def __init__(self, work: Path, name: str, port: int | None) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = str(self.dir / "state" / "berthd.sock")
        self.grpc_address = ""
        self.port = port
        config = self.dir / "berthd.toml"
        config.write_text(
            f'root = "{self.dir / "root"}"\nstate = "{self.dir / "state"}"\n'
            'log_level = "warning"\n[runtimes.runc]\nbinary = "runc"\n'
            + (f'[metrics]\naddress = "127.0.0.1:{port}"\n' if port else "")
        )
        self.daemon = Daemon(name, [BERTHD, "--config", str(config)], self.dir / "berthd.log")
        self.env = dict(os.environ, BERTH_ADDRESS=self.address, BERTH_NAMESPACE=NS)


def scrape(port: int) -> tuple[float, bytes]:
    """One GET /v1/metrics: (seconds, body)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/v1/metrics")
        reply = conn.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"scrape answered {reply.status}: {body[:200]!r}")
    finally:
        conn.close()
    return time.perf_counter() - t0, body


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _fill(bench: Bench, system: MeteredBerth, count: int, started: list[str]) -> None:
    """Run sleep containers in `system` until it has `count`."""
    cids = [bench.uid("mx") for _ in range(count - len(started))]
    with ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda cid: sh(
                    system.run_detached(cid, bench.rootfs, ["sleep", "100000"]), env=system.env
                ),
                cids,
            )
        )
    started.extend(cids)


def _load(address: str, stop: threading.Event) -> None:
    """The light API load: tasks.list and version, every LOAD_INTERVAL."""
    with Client(address, namespace=NS) as client:
        while not stop.wait(LOAD_INTERVAL):
            client.call("tasks.list")
            client.call("version")


def _scraper(port: int, stop: threading.Event, took: list[float]) -> None:
    while not stop.wait(SCRAPE_INTERVAL):
        took.append(scrape(port)[0])


def _probe_loop(address: str, port: int, count: int) -> dict[str, list[float]]:
    """`version` round trips (in-process, every 5 ms) while another process scrapes back to
    back, and while nothing scrapes: what a scrape holds berthd's loop up by."""
    out: dict[str, list[float]] = {"while scraping": [], "not scraping": []}
    n = 200 if count <= 20 else 400
    with Client(address, namespace=NS) as client:
        for case in ("not scraping", "while scraping", "not scraping", "while scraping"):
            scraper = None
            if case == "while scraping":  # a process of its own: not this one's GIL
                scraper = subprocess.Popen(
                    [sys.executable, "-c", SCRAPE_LOOP, str(port)], stdin=subprocess.DEVNULL
                )
                scrape(port)
            try:
                for _ in range(n // 2):
                    t0 = time.perf_counter()
                    client.call("version")
                    out[case].append(time.perf_counter() - t0)
                    time.sleep(0.005)
            finally:
                if scraper is not None:
                    scraper.kill()
                    scraper.wait()
    return out


SCRAPE_LOOP = """
import http.client, sys
while True:
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
    c.request("GET", "/v1/metrics")
    c.getresponse().read()
    c.close()
"""


def _window(on: MeteredBerth, off: MeteredBerth, seconds: float) -> dict[str, float]:
    """Both daemons under the same API load for `seconds`, `on` scraped every second:
    CPU seconds each used, and how many scrapes."""
    assert on.port is not None
    pids = {"on": on.daemon.pid, "off": off.daemon.pid}
    assert all(pids.values())
    stop = threading.Event()
    took: list[float] = []
    threads = [
        threading.Thread(target=_load, args=(on.address, stop)),
        threading.Thread(target=_load, args=(off.address, stop)),
        threading.Thread(target=_scraper, args=(on.port, stop, took)),
    ]
    before = {k: cpu_seconds(p) for k, p in pids.items() if p}
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    after = {k: cpu_seconds(p) for k, p in pids.items() if p}
    return {"on": after["on"] - before["on"], "off": after["off"] - before["off"], "n": len(took)}


def fig_metrics(bench: Bench) -> None:
    port = _free_port()
    on = MeteredBerth(bench.work, "berth-metrics-on", port)
    off = MeteredBerth(bench.work, "berth-metrics-off", None)
    started: dict[str, list[str]] = {"on": [], "off": []}
    counts = [20] if bench.quick else [20, 100]
    try:
        on.start()
        off.start()
        for count in counts:
            _fill(bench, on, count, started["on"])
            _fill(bench, off, count, started["off"])
            for _ in range(5):
                scrape(port)  # warm-up
            n = 20 if bench.quick else 50
            took, body = [], b""
            for _ in range(n):
                seconds, body = scrape(port)
                took.append(seconds)
                time.sleep(0.05)
            series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
            bench.record(
                f"metrics_scrape_{count}",
                f"GET /v1/metrics with {count} containers ({series} series, "
                f"{len(body) // 1024} KiB)",
                "ms",
                {"berth": took},
                scale=1000,
            )
            bench.record(
                f"metrics_loop_{count}",
                f"`version` round trip (in-process) while scrapes of {count} containers run "
                "back to back, and while nothing scrapes",
                "ms",
                _probe_loop(on.address, port, count),
                ("while scraping", "not scraping"),
                1000,
            )
        _cost(bench, on, off, counts[-1])
    finally:
        for system, key in ((on, "on"), (off, "off")):
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(system.remove, started[key]))
            system.daemon.stop_everything()


def _cost(bench: Bench, on: MeteredBerth, off: MeteredBerth, count: int) -> None:
    """RSS and CPU of berthd with metrics on (scraped every second) vs off."""
    rounds, seconds = (2, 15.0) if bench.quick else (3, 40.0)
    cpu: dict[str, list[float]] = {"metrics on": [], "metrics off": []}
    rss: dict[str, list[float]] = {"metrics on": [], "metrics off": []}
    scrapes = 0
    for _ in range(rounds):
        window = _window(on, off, seconds)
        scrapes += int(window["n"])
        cpu["metrics on"].append(window["on"] / seconds * 100)
        cpu["metrics off"].append(window["off"] / seconds * 100)
        for name, system in (("metrics on", on), ("metrics off", off)):
            pid = system.daemon.pid
            rss[name].append(mem_rollup(pid)["rss"] if pid else 0.0)
    bench.record(
        "metrics_cpu",
        f"berthd CPU (% of a core) with {count} containers and a light API load (tasks.list + "
        f"version every {LOAD_INTERVAL * 1000:.0f} ms), metrics scraped every "
        f"{SCRAPE_INTERVAL:.0f} s vs off; {seconds:.0f} s windows",
        "%",
        cpu,
        ("metrics on", "metrics off"),
    )
    bench.record(
        "metrics_rss",
        f"berthd RSS with {count} containers, metrics on (scraped) vs off",
        "MiB",
        rss,
        ("metrics on", "metrics off"),
    )
    extra = (sum(cpu["metrics on"]) - sum(cpu["metrics off"])) / 100 * seconds
    per_scrape = extra / scrapes * 1000 if scrapes else 0.0
    off = sum(cpu["metrics off"]) / len(cpu["metrics off"])  # % of a core
    at = {interval: (off + per_scrape / interval / 10) / off for interval in (15, 60)}
    bench.results["notes"].append(
        f"metrics at {count} containers: {scrapes} scrapes cost berthd {per_scrape:.1f} ms of "
        f"CPU each (the CPU difference on - off over the windows, API calls counted too). "
        f"Scraped every 15 s (Prometheus' example configuration) berthd's CPU would be "
        f"{at[15]:.3f}x that with metrics off, every 60 s (Prometheus' built-in default) "
        f"{at[60]:.3f}x"
    )
    print(bench.results["notes"][-1], flush=True)
