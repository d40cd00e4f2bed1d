"""berth's benchmark: berth vs containerd 1.6 (+ containerd-shim-runc-v2) vs bare runc/crun.

Run through `scripts/bench [--quick]` (it enters a private mount namespace first). Every
comparison is interleaved (A B B A ...) after warm-up, in one run, because these machines
are shared and noisy: only ratios measured side by side mean anything. Results go to
bench/results/<time>.md and .json with the version of every tool. Everything started is
stopped (by pid) at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from berth.daemon.tasks.rootfs import build_busybox_rootfs  # noqa: E402
from berth.shim.wire.client import Client  # noqa: E402
from tests.support.helpers import hybrid_crun_fix_needed, remove_namespace_cgroups  # noqa: E402
from tests.support.images import build_docker_archive, build_oci_archive  # noqa: E402

VENV = REPO / ".venv" / "bin"
BERTH = str(VENV / "berth")
BERTHD = str(VENV / "berthd")
REAPER = str(REPO / "tests" / "support" / "reaper.py")
IMAGE = "docker.io/library/busybox:bench"
NS = "bench"
# the bridges of berthd's default network and of podman 4.3's (CNI backend)
NETWORK_BRIDGES = ("berth0", "cni-podman0")


def sh(
    cmd: list[str], *, check: bool = True, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cmd,
        check=check,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        capture_output=kw.pop("capture_output", True),
        **kw,
    )


def _machine_cpu_seconds() -> float:
    """CPU time every process of the machine used so far (user + nice + system + irq +
    softirq of /proc/stat's `cpu` line): what a batch of starts costs, whoever spent it."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    used = sum(int(fields[i]) for i in (0, 1, 2, 5, 6))
    return used / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], **kw: Any) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        timeout=600,
        stdin=subprocess.DEVNULL,
        stdout=kw.pop("stdout", subprocess.DEVNULL),
        stderr=subprocess.PIPE,
        **kw,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
        )
    return elapsed


def mem_rollup(pid: int) -> dict[str, float]:
    """RSS, PSS, USS in MiB from /proc/PID/smaps_rollup (USS = private clean + dirty)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                with contextlib.suppress(ValueError):
                    values[parts[0][:-1]] = int(parts[1])
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return {
        "rss": values.get("Rss", 0) / 1024,
        "pss": values.get("Pss", 0) / 1024,
        "uss": uss / 1024,
    }


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p99": p99,
        "n": len(ordered),
    }


# --- the systems -----------------------------------------------------------------------


class Daemon:
    """A daemon under tests/support/reaper.py (it reaps orphaned shims: no zombies)."""

    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.reapers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.reapers.append(
                subprocess.Popen(
                    [sys.executable, REAPER, *self.command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    @property
    def pid(self) -> int | None:
        reaper = self.reapers[-1]
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(
                Path(f"/proc/{reaper.pid}/task/{reaper.pid}/children").read_text().split()[0]
            )
        return None

    def kill9(self) -> None:
        pid = self.pid
        if pid:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                        break
                time.sleep(0.005)

    def descendants(self) -> list[int]:
        out: list[int] = []
        for reaper in self.reapers:
            stack = [reaper.pid]
            while stack:
                pid = stack.pop()
                with contextlib.suppress(OSError):
                    for task in Path(f"/proc/{pid}/task").iterdir():
                        children = (task / "children").read_text().split()
                        stack.extend(int(c) for c in children)
                        out.extend(int(c) for c in children)
        return out

    def stop_everything(self) -> None:
        for pid in self.descendants():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for reaper in self.reapers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(timeout=15)
            if reaper.poll() is None:
                reaper.kill()
                reaper.wait()


class Berth:
    name = "berth"

    def __init__(self, work: Path, runtime: str = "runc") -> None:
        self.dir = work / "berth"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = str(self.dir / "state" / "berthd.sock")
        self.grpc_address = str(self.dir / "state" / "containerd.sock")
        config = self.dir / "berthd.toml"
        config.write_text(
            f'root = "{self.dir / "root"}"\nstate = "{self.dir / "state"}"\nlog_level = "warning"\n'
            '[runtimes.runc]\nbinary = "runc"\n[runtimes.crun]\nbinary = "crun"\n'
            f'[grpc]\naddress = "{self.grpc_address}"\n'
        )
        self.daemon = Daemon("berthd", [BERTHD, "--config", str(config)], self.dir / "berthd.log")
        self.env = dict(os.environ, BERTH_ADDRESS=self.address, BERTH_NAMESPACE=NS)

    def start(self) -> None:
        self.daemon.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception), Client(self.address) as c:
                c.call("version")
                return
            time.sleep(0.005)
        raise RuntimeError(f"berthd did not start; see {self.daemon.log}")

    def wait_grpc(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh(["ctr", "-a", self.grpc_address, "version"], check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"berth-grpc did not start; see {self.daemon.log}")

    def frontend_pid(self) -> int | None:
        for pid in self.daemon.descendants():
            with contextlib.suppress(OSError):
                if b"berth.daemon.grpc.main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    def cli(self, *args: str) -> list[str]:
        return [BERTH, *args]

    def run_rm(self, cid: str, rootfs: str, runtime: str, args: list[str]) -> list[str]:
        return self.cli(
            "run", "--rm", "--read-only", "--rootfs", rootfs, "--runtime", runtime, cid, *args
        )

    def run_detached(self, cid: str, rootfs: str, args: list[str]) -> list[str]:
        return self.cli("run", "-d", "--read-only", "--rootfs", rootfs, cid, *args)

    def exec(self, cid: str, exec_id: str) -> list[str]:
        return self.cli("tasks", "exec", "--exec-id", exec_id, cid, "/bin/true")

    def remove(self, cid: str) -> None:
        sh(self.cli("tasks", "rm", "-f", cid), check=False, env=self.env)
        sh(self.cli("containers", "rm", cid), check=False, env=self.env)

    def version_cmd(self) -> list[str]:
        return self.cli("version")

    def tasks_cmd(self) -> list[str]:
        return self.cli("tasks", "ls")

    def shim_pids(self) -> list[int]:
        pids = []
        for path in (self.dir / "state" / "tasks").glob("*/*/shim.json"):
            with contextlib.suppress(Exception):
                pids.append(json.loads(path.read_text())["pid"])
        return pids


class Containerd:
    name = "containerd"

    def __init__(self, work: Path) -> None:
        self.dir = work / "containerd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = str(self.dir / "containerd.sock")
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\nstate = "{self.dir / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.address}"\n'
            f'[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '[debug]\n  level = "warn"\n'
        )
        self.daemon = Daemon(
            "containerd", ["containerd", "--config", str(config)], self.dir / "containerd.log"
        )
        self.env = dict(os.environ)

    def start(self) -> None:
        self.daemon.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sh(self.cli("version"), check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.01)
        raise RuntimeError(f"containerd did not start; see {self.daemon.log}")

    def cli(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.address, "-n", NS, *args]

    def run_rm(self, cid: str, rootfs: str, runtime: str, args: list[str]) -> list[str]:
        extra = ["--runc-binary", runtime] if runtime != "runc" else []
        return self.cli("run", "--rm", *extra, IMAGE, cid, *args)

    def run_detached(self, cid: str, rootfs: str, args: list[str]) -> list[str]:
        return self.cli("run", "-d", IMAGE, cid, *args)

    def exec(self, cid: str, exec_id: str) -> list[str]:
        return self.cli("tasks", "exec", "--exec-id", exec_id, cid, "/bin/true")

    def remove(self, cid: str) -> None:
        sh(self.cli("tasks", "kill", "-s", "SIGKILL", cid), check=False)
        for _ in range(100):
            if sh(self.cli("tasks", "rm", cid), check=False).returncode == 0:
                break
            time.sleep(0.05)
        sh(self.cli("containers", "rm", cid), check=False)

    def version_cmd(self) -> list[str]:
        return self.cli("version")

    def tasks_cmd(self) -> list[str]:
        return self.cli("tasks", "ls")

    def shim_pids(self) -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                if (
                    cmdline
                    and cmdline[0].endswith(b"containerd-shim-runc-v2")
                    and self.address.encode() in b" ".join(cmdline)
                ):
                    pids.append(int(proc.name))
        return pids


# --- the figures ------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool, work: Path) -> None:
        self.quick = quick
        self.work = work
        self.results: dict[str, Any] = {"figures": {}, "notes": []}
        self.rootfs = str(work / "rootfs")
        self.bundle = work / "bundle"
        self.berth = Berth(work)
        self.containerd = Containerd(work)
        self.dockerds: list[Daemon] = []
        self.seq = 0

    def uid(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    # -- set-up

    def prepare(self) -> None:
        build_busybox_rootfs(self.rootfs)
        self.bundle.mkdir()
        sh(["runc", "spec"], cwd=self.bundle)
        spec = json.loads((self.bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = ["/bin/true"]
        spec["root"] = {"path": self.rootfs, "readonly": True}  # runc refuses a symlinked rootfs
        (self.bundle / "config.json").write_text(json.dumps(spec))
        archive = str(self.work / "image.tar")
        build_oci_archive(self.rootfs, archive, name=IMAGE)
        self.berth.start()
        self.containerd.start()
        sh(self.containerd.cli("images", "import", archive), timeout=300)
        # the same import into berth, by the same client, so that both daemons have done
        # the same work before any figure (their memory above all)
        self.berth.wait_grpc()
        ctr_berth = ["ctr", "-a", self.berth.grpc_address, "-n", NS]
        sh([*ctr_berth, "images", "import", archive], timeout=300)

    def versions(self) -> dict[str, str]:
        def first(cmd: list[str]) -> str:
            with contextlib.suppress(Exception):
                return sh(cmd).stdout.decode().splitlines()[0].strip()
            return "?"

        from berth.daemon import __version__
        from berth.daemon.config import Config

        return {
            "berth": __version__,
            "python": platform.python_version(),
            "shim python": first([Config().shim_python, "--version"]),
            "containerd": first(["containerd", "--version"]),
            "runc": first(["runc", "--version"]),
            "crun": first(["crun", "--version"]),
            "kernel": platform.release(),
            "cpus": str(os.cpu_count()),
        }

    # -- helpers

    def interleave(
        self, cases: dict[str, Callable[[int], float]], n: int, warmup: int = 2
    ) -> dict[str, list[float]]:
        """Run each case n times, alternating the order (A B B A ...) after warm-up."""
        names = list(cases)
        for i in range(warmup):
            for name in names:
                cases[name](-1 - i)
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(n):
            order = names if i % 2 == 0 else list(reversed(names))
            for name in order:
                samples[name].append(cases[name](i))
        return samples

    def record(
        self,
        key: str,
        title: str,
        unit: str,
        samples: dict[str, list[float]],
        ratio_of: tuple[str, str] | None = None,
        scale: float = 1.0,
    ) -> None:
        figure: dict[str, Any] = {"title": title, "unit": unit, "systems": {}}
        for name, values in samples.items():
            figure["systems"][name] = summary([v * scale for v in values])
        if ratio_of:
            a, b = samples[ratio_of[0]], samples[ratio_of[1]]
            pairs = [x / y for x, y in zip(a, b, strict=False) if y]
            figure["ratio"] = {
                "of": list(ratio_of),
                "median_of_pairs": statistics.median(pairs) if pairs else None,
                "of_medians": statistics.median(a) / statistics.median(b),
            }
        self.results["figures"][key] = figure
        print(self.figure_markdown(key), flush=True)

    def figure_markdown(self, key: str) -> str:
        fig = self.results["figures"][key]
        lines = [
            f"\n### {fig['title']}\n",
            "| system | median | min | max | n |",
            "|---|---|---|---|---|",
        ]
        for name, s in fig["systems"].items():
            lines.append(
                f"| {name} | {s['median']:.1f} {fig['unit']} | {s['min']:.1f} "
                f"| {s['max']:.1f} | {s['n']} |"
            )
        if "ratio" in fig:
            r = fig["ratio"]
            lines.append(
                f"\nratio {r['of'][0]}/{r['of'][1]}: {r['median_of_pairs']:.2f} (median of pairs), "
                f"{r['of_medians']:.2f} (of medians)"
            )
        return "\n".join(lines)

    # -- 1. run --rm /bin/true

    def fig_run_rm(self, runtime: str) -> None:
        n = 8 if self.quick else 30
        bare = ["runc"] if runtime == "runc" else ["crun"]

        def berth(i: int) -> float:
            return timed(
                self.berth.run_rm(self.uid("r"), self.rootfs, runtime, ["/bin/true"]),
                env=self.berth.env,
            )

        def containerd(i: int) -> float:
            return timed(self.containerd.run_rm(self.uid("r"), self.rootfs, runtime, ["/bin/true"]))

        def bare_run(i: int) -> float:
            return timed(
                [
                    *bare,
                    "--root",
                    str(self.work / f"bare-{runtime}"),
                    "run",
                    "--bundle",
                    str(self.bundle),
                    self.uid("b"),
                ]
            )

        samples = self.interleave(
            {"berth": berth, "containerd": containerd, f"bare {runtime}": bare_run}, n
        )
        self.record(
            f"run_rm_{runtime}",
            f"run --rm of /bin/true ({runtime})",
            "ms",
            samples,
            ("berth", "containerd"),
            1000,
        )
        fig = self.results["figures"][f"run_rm_{runtime}"]
        fig["berth_minus_bare_ms"] = (
            fig["systems"]["berth"]["median"] - fig["systems"][f"bare {runtime}"]["median"]
        )

    # -- 2. memory per container

    def fig_memory(self, count: int) -> None:
        started: dict[str, list[str]] = {"berth": [], "containerd": []}
        systems = {"berth": self.berth, "containerd": self.containerd}
        try:
            for _i in range(count):
                for name, system in systems.items():
                    cid = self.uid("m")
                    sh(system.run_detached(cid, self.rootfs, ["sleep", "3600"]), env=system.env)
                    started[name].append(cid)
            time.sleep(5)
            out: dict[str, Any] = {}
            for name, system in systems.items():
                shims = [mem_rollup(p) for p in system.shim_pids()]
                daemon_pid = system.daemon.pid
                out[name] = {
                    "shims": len(shims),
                    "shim_rss": statistics.mean(s["rss"] for s in shims),
                    "shim_pss": statistics.mean(s["pss"] for s in shims),
                    "shim_uss": statistics.mean(s["uss"] for s in shims),
                    "daemon_rss": mem_rollup(daemon_pid)["rss"] if daemon_pid else 0,
                }
            zygotes = [
                p
                for p in self.berth.daemon.descendants()
                if b"zygote" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            if zygotes:
                out["berth"]["zygote_pss"] = mem_rollup(zygotes[0])["pss"]
            front = self.berth.frontend_pid()
            if front:
                out["berth"]["frontend_rss"] = mem_rollup(front)["rss"]
                out["berth"]["frontend_pss"] = mem_rollup(front)["pss"]
            self.results["figures"][f"memory_{count}"] = {
                "title": f"memory with {count} sleep containers",
                "values": out,
            }
            if "frontend_rss" in out["berth"]:
                print(f"berth-grpc RSS {out['berth']['frontend_rss']:.1f} MiB")
            print(f"\n### memory with {count} containers (MiB, mean per shim)\n")
            print("| system | shim RSS | shim PSS | shim USS | daemon RSS |\n|---|---|---|---|---|")
            for name, v in out.items():
                print(
                    f"| {name} | {v['shim_rss']:.2f} | {v['shim_pss']:.2f} "
                    f"| {v['shim_uss']:.2f} | {v['daemon_rss']:.1f} |"
                )
            # -- 3. restart with `count` running
            self.fig_restart(count, started)
        finally:
            for name, system in systems.items():
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(system.remove, started[name]))

    def fig_restart(self, count: int, started: dict[str, list[str]]) -> None:
        out: dict[str, Any] = {}
        rounds = 2 if self.quick else 3
        for name, system in (("berth", self.berth), ("containerd", self.containerd)) * rounds:
            system.daemon.kill9()
            t0 = time.perf_counter()
            system.daemon.start()
            first = None
            while first is None:
                if (
                    sh(system.version_cmd(), check=False, env=system.env, timeout=10).returncode
                    == 0
                ):
                    first = time.perf_counter() - t0
            running = None
            while running is None:
                r = sh(system.tasks_cmd(), check=False, env=system.env, timeout=10)
                if r.returncode == 0 and r.stdout.decode().count("RUNNING") >= count:
                    running = time.perf_counter() - t0
                else:
                    time.sleep(0.005)
            out.setdefault(name, {"first_answer": [], "all_running": []})
            out[name]["first_answer"].append(first)
            out[name]["all_running"].append(running)
        # berth, polled in-process every 5 ms (no CLI start-up in the figure)
        precise = []
        for _ in range(rounds):
            self.berth.daemon.kill9()
            t0 = time.perf_counter()
            self.berth.daemon.start()
            while True:
                with contextlib.suppress(Exception), Client(self.berth.address, namespace=NS) as c:
                    tasks = c.call("tasks.list")["tasks"]
                    if sum(t["status"] == "running" for t in tasks) >= count:
                        break
                time.sleep(0.005)
            precise.append(time.perf_counter() - t0)
        for key, title in (
            ("first_answer", "first API answer"),
            ("all_running", f"all {count} RUNNING"),
        ):
            self.record(
                f"restart_{count}_{key}",
                f"kill -9 daemon with {count} running, restart: {title} (CLI polling)",
                "ms",
                {n: v[key] for n, v in out.items()},
                ("berth", "containerd"),
                1000,
            )
        self.record(
            f"restart_{count}_precise",
            f"berth: restart to all {count} RUNNING, in-process 5 ms polling",
            "ms",
            {"berth": precise},
            None,
            1000,
        )

    # -- 4. stdout throughput

    def fig_throughput(self) -> None:
        blocks = 4096 if self.quick else 16384  # x 64 KiB
        size = blocks * 65536
        n = 3 if self.quick else 7
        dd = f"dd if=/dev/zero bs=64k count={blocks} 2>/dev/null"

        def berth(i: int) -> float:
            return timed(
                self.berth.run_rm(self.uid("t"), self.rootfs, "runc", ["sh", "-c", dd]),
                env=self.berth.env,
            )

        def berth_log(i: int) -> float:
            cid = self.uid("tl")
            start = time.perf_counter()
            sh(self.berth.run_detached(cid, self.rootfs, ["sh", "-c", dd]), env=self.berth.env)
            sh(self.berth.cli("tasks", "wait", cid), env=self.berth.env, timeout=600)
            elapsed = time.perf_counter() - start
            self.berth.remove(cid)
            return elapsed

        def containerd(i: int) -> float:
            return timed(
                self.containerd.run_rm(self.uid("t"), self.rootfs, "runc", ["sh", "-c", dd])
            )

        def host(i: int) -> float:
            return timed(["sh", "-c", f"{dd} | cat > /dev/null"])

        samples = self.interleave(
            {
                "berth": berth,
                "containerd": containerd,
                "berth log file": berth_log,
                "host dd|cat": host,
            },
            n,
            warmup=1,
        )
        rates = {k: [size / v / 1e6 for v in vals] for k, vals in samples.items()}
        self.record(
            "stdout_throughput",
            f"{size >> 20} MiB through container stdout (MB/s, higher is better)",
            "MB/s",
            rates,
            ("berth", "containerd"),
        )

    # -- 5. concurrent starts

    def fig_concurrent(self) -> None:
        count = 40 if self.quick else 100
        out: dict[str, list[float]] = {}
        walls: dict[str, float] = {}
        cpu: dict[str, float] = {}  # ms of CPU per start, every process of the machine
        for name, system in (("berth", self.berth), ("containerd", self.containerd)):
            ids = [self.uid("cc") for _ in range(count)]

            def start(cid: str, system: Any = system) -> float:
                return timed(
                    system.run_detached(cid, self.rootfs, ["sleep", "3600"]), env=system.env
                )

            t0, cpu0 = time.perf_counter(), _machine_cpu_seconds()
            with ThreadPoolExecutor(8) as pool:
                out[name] = list(pool.map(start, ids))
            walls[name] = time.perf_counter() - t0
            cpu[name] = (_machine_cpu_seconds() - cpu0) / count * 1000
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(system.remove, ids))
        self.record(
            "concurrent_starts",
            f"{count} starts, 8 at a time: per start",
            "ms",
            out,
            ("berth", "containerd"),
            1000,
        )
        self.results["figures"]["concurrent_starts"]["wall_s"] = walls
        self.results["figures"]["concurrent_starts"]["cpu_ms_per_start"] = cpu
        print(
            f"wall: berth {walls['berth']:.2f} s, containerd {walls['containerd']:.2f} s, "
            f"ratio {walls['berth'] / walls['containerd']:.2f}"
        )
        print(
            f"CPU per start (CLI + daemon + shim + runtime: every process, /proc/stat): berth "
            f"{cpu['berth']:.1f} ms, containerd {cpu['containerd']:.1f} ms, ratio "
            f"{cpu['berth'] / cpu['containerd']:.2f}"
        )

    # -- cold start: exec of the daemon until it answers its API

    def fig_coldstart(self) -> None:
        """Each daemon stopped (nothing running), then started again and again: from the
        exec to the first answered call, both polled in-process every millisecond (berthd's
        `version`; containerd's gRPC health check, which it answers once it serves)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def containerd_ready() -> bool:
            with grpc.insecure_channel(f"unix://{self.containerd.address}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                except grpc.RpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        def berth_ready() -> bool:
            try:
                with Client(self.berth.address, timeout=0.5) as c:
                    c.call("version")
                    return True
            except Exception:
                return False

        n = 3 if self.quick else 10
        out: dict[str, list[float]] = {"berth": [], "containerd": []}
        systems = {
            "berth": (self.berth, berth_ready),
            "containerd": (self.containerd, containerd_ready),
        }
        for _ in range(n):
            for name, (system, ready) in systems.items():
                system.daemon.stop_everything()
                t0 = time.perf_counter()
                system.daemon.start()
                deadline = t0 + 30
                while not ready():
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"{name} did not start; see {system.daemon.log}")
                    time.sleep(0.001)
                out[name].append(time.perf_counter() - t0)
        self.berth.wait_ready()
        self.containerd.wait_ready()
        self.record(
            "cold_start",
            "cold start: daemon exec to its first answered call (nothing running)",
            "ms",
            out,
            ("berth", "containerd"),
            1000,
        )

    # -- 6. exec

    def fig_exec(self) -> None:
        n = 8 if self.quick else 30
        ids = {"berth": self.uid("x"), "containerd": self.uid("x")}
        sh(
            self.berth.run_detached(ids["berth"], self.rootfs, ["sleep", "3600"]),
            env=self.berth.env,
        )
        sh(self.containerd.run_detached(ids["containerd"], self.rootfs, ["sleep", "3600"]))
        try:
            samples = self.interleave(
                {
                    "berth": lambda i: timed(
                        self.berth.exec(ids["berth"], self.uid("e")), env=self.berth.env
                    ),
                    "containerd": lambda i: timed(
                        self.containerd.exec(ids["containerd"], self.uid("e"))
                    ),
                },
                n,
            )
            self.record(
                "exec",
                "exec of /bin/true into a running container",
                "ms",
                samples,
                ("berth", "containerd"),
                1000,
            )
        finally:
            self.berth.remove(ids["berth"])
            self.containerd.remove(ids["containerd"])

    # -- network attachments: `run --rm /bin/true` with and without a CNI bridge network

    def fig_network(self) -> None:
        """The cost of an attachment: berth's `run --rm --net bridge` minus its run without
        a network, against podman's (`--network podman`, its CNI bridge: podman 4.3 with
        the CNI backend where netavark is not installed) minus podman's `--network none`.
        Both leave their bridge on the host when their last container goes (as docker0
        stays): removed after, if this run made them."""
        made = [b for b in NETWORK_BRIDGES if not Path("/sys/class/net", b).exists()]
        try:
            self._network_figures()
        finally:
            for bridge in made:
                if Path("/sys/class/net", bridge).exists():
                    sh(["ip", "link", "delete", bridge], check=False)

    def _network_figures(self) -> None:
        n = 5 if self.quick else 20
        rootfs = self.rootfs
        limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

        def berth(net: list[str]) -> Callable[[int], float]:
            def one(i: int) -> float:
                command = self.berth.cli(
                    "run",
                    "--rm",
                    "--read-only",
                    "--rootfs",
                    rootfs,
                    *net,
                    self.uid("n"),
                    "/bin/true",
                )
                return timed(command, env=self.berth.env)

            return one

        def podman(network: str) -> Callable[[int], float]:
            def one(i: int) -> float:
                command = ["podman", "run", "--rm", *limits, "--network", network]
                return timed([*command, "--rootfs", rootfs, "/bin/true"])

            return one

        cases = {"berth bridge": berth(["--net", "bridge"]), "berth none": berth([])}
        if shutil.which("podman"):
            cases.update({"podman bridge": podman("podman"), "podman none": podman("none")})
        samples = self.interleave(cases, n)
        self.record(
            "net_run_rm",
            "`run --rm /bin/true`, with and without a bridge network",
            "ms",
            samples,
            None,
            1000,
        )
        self._networked_starts(limits)
        if "podman bridge" in samples:
            cost = {
                "berth": [
                    b - o
                    for b, o in zip(samples["berth bridge"], samples["berth none"], strict=True)
                ],
                "podman": [
                    b - o
                    for b, o in zip(samples["podman bridge"], samples["podman none"], strict=True)
                ],
            }
            self.record(
                "net_attach_cost",
                "the cost of a network attachment (bridge run minus none run)",
                "ms",
                cost,
                ("berth", "podman"),
                1000,
            )

    def _networked_starts(self, limits: list[str]) -> None:
        """50 networked containers started 8 at a time (berth `run -d --net bridge`,
        podman `run -d --network podman`): per start, then all removed."""
        count = 20 if self.quick else 50
        rootfs = self.rootfs
        out: dict[str, list[float]] = {}

        def berth(cid: str) -> float:
            command = self.berth.cli(
                "run",
                "-d",
                "--read-only",
                "--rootfs",
                rootfs,
                "--net",
                "bridge",
                cid,
                "sleep",
                "600",
            )
            return timed(command, env=self.berth.env)

        def podman(cid: str) -> float:
            command = ["podman", "run", "-d", *limits, "--name", cid, "--network", "podman"]
            return timed([*command, "--rootfs", rootfs, "sleep", "600"])

        def podman_remove(cid: str) -> None:
            sh(["podman", "rm", "-f", "-t", "0", cid], check=False)

        systems = [("berth", berth, self.berth.remove)]
        if shutil.which("podman"):
            systems.append(("podman", podman, podman_remove))
        for name, start, remove in systems:
            ids = [self.uid("nc") for _ in range(count)]
            try:
                with ThreadPoolExecutor(8) as pool:
                    out[name] = list(pool.map(start, ids))
            finally:
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(remove, ids))
        self.record(
            "net_concurrent_starts",
            f"{count} networked starts (bridge), 8 at a time: per start",
            "ms",
            out,
            ("berth", "podman") if "podman" in out else None,
            1000,
        )

    # -- the CLI's start: `version` (one round trip), wall time and the CPU it costs

    def fig_cli(self) -> None:
        n = 10 if self.quick else 40
        commands = {
            "berth": (self.berth.version_cmd(), self.berth.env),
            "containerd": (self.containerd.version_cmd(), None),
        }
        cpu: dict[str, list[float]] = {name: [] for name in commands}

        def case(name: str) -> Callable[[int], float]:
            command, env = commands[name]

            def one(i: int) -> float:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)  # us, not os.times' ticks
                elapsed = timed(command, env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(
                    after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                )
                return elapsed

            return one

        samples = self.interleave({name: case(name) for name in commands}, n)
        self.record(
            "cli_version",
            "`version` through each one's CLI (start-up + one call), wall",
            "ms",
            samples,
            ("berth", "containerd"),
            1000,
        )
        self.record(
            "cli_version_cpu",
            "`version` through each one's CLI: CPU of the CLI process",
            "ms",
            {name: values[-n:] for name, values in cpu.items()},  # not the warm-up's
            ("berth", "containerd"),
            1000,
        )

    # -- 7. images: import + unpack, pull from a loopback registry

    def fig_images(self) -> None:
        n = 3 if self.quick else 7
        mib = 8 if self.quick else 32
        layers = []
        for i in range(2):
            d = self.work / f"layer{i}"
            d.mkdir(exist_ok=True)
            (d / f"data{i}").write_bytes(os.urandom(mib << 20))  # incompressible
            layers.append(str(d))
        archive = str(self.work / "big.tar")
        name = "docker.io/library/big:bench"
        build_oci_archive([self.rootfs, *layers], archive, name=name)
        size = os.path.getsize(archive)
        port = _free_port()
        registry = self._registry(port)
        try:
            ref = f"127.0.0.1:{port}/bench/big:v1"
            sh(self.berth.cli("images", "import", archive), env=self.berth.env, timeout=600)
            sh(
                self.berth.cli("images", "push", "--plain-http", ref, name),
                env=self.berth.env,
                timeout=600,
            )
            sh(self.berth.cli("images", "rm", "--sync", name), env=self.berth.env)

            def berth_import(i: int) -> float:
                t = timed(self.berth.cli("images", "import", archive), env=self.berth.env)
                sh(self.berth.cli("images", "rm", "--sync", name), env=self.berth.env)
                return t

            def ctr_import(i: int) -> float:
                t = timed(self.containerd.cli("images", "import", archive))
                sh(self.containerd.cli("images", "rm", "--sync", name))
                return t

            def berth_pull(i: int) -> float:
                t = timed(self.berth.cli("images", "pull", "--plain-http", ref), env=self.berth.env)
                sh(self.berth.cli("images", "rm", "--sync", ref), env=self.berth.env)
                return t

            def ctr_pull(i: int) -> float:
                t = timed(self.containerd.cli("images", "pull", "--plain-http", ref))
                sh(self.containerd.cli("images", "rm", "--sync", ref))
                return t

            samples = self.interleave(
                {"berth": berth_import, "containerd": ctr_import}, n, warmup=1
            )
            self.record(
                "image_import",
                f"import + unpack of a {size >> 20} MiB image archive",
                "ms",
                samples,
                ("berth", "containerd"),
                1000,
            )
            samples = self.interleave({"berth": berth_pull, "containerd": ctr_pull}, n, warmup=1)
            self.record(
                "image_pull",
                "pull + unpack of the same image from a loopback registry",
                "ms",
                samples,
                ("berth", "containerd"),
                1000,
            )
        finally:
            registry.terminate()
            registry.wait(timeout=10)

    # -- 8. the real clients: ctr and dockerd, on berth (via berth-grpc) and on containerd

    def fig_clients(self) -> None:
        n = 6 if self.quick else 20
        archive = str(self.work / "image.tar")
        fifo = self.work / "ctr-fifo"
        fifo.mkdir(exist_ok=True)
        self.berth.wait_grpc()
        ctr_berth = ["ctr", "-a", self.berth.grpc_address, "-n", NS]
        sh([*ctr_berth, "images", "import", archive], timeout=300)

        def berth_ctr(i: int) -> float:
            return timed(
                [
                    *ctr_berth,
                    "run",
                    "--rm",
                    "--fifo-dir",
                    str(fifo),
                    IMAGE,
                    self.uid("c"),
                    "/bin/true",
                ]
            )

        def containerd_ctr(i: int) -> float:
            return timed(self.containerd.run_rm(self.uid("c"), self.rootfs, "runc", ["/bin/true"]))

        samples = self.interleave({"berth": berth_ctr, "containerd": containerd_ctr}, n)
        self.record(
            "ctr_run_rm",
            "ctr run --rm of /bin/true (containerd's CLI; berth through berth-grpc)",
            "ms",
            samples,
            ("berth", "containerd"),
            1000,
        )
        if not Path("/usr/sbin/dockerd").exists():
            self.results["notes"].append("dockerd not installed: no docker run figure")
            return
        docker_archive = str(self.work / "docker-image.tar")
        build_docker_archive(self.rootfs, docker_archive, tag="busybox:bench")
        engines = {
            "berth": self._dockerd("berth", self.berth.grpc_address),
            "containerd": self._dockerd("containerd", self.containerd.address),
        }
        try:
            for docker in engines.values():
                sh([*docker, "load", "-i", docker_archive], timeout=300)

            def runner(docker: list[str]) -> Callable[[int], float]:
                return lambda i: timed([*docker, "run", "--rm", "busybox:bench", "/bin/true"])

            samples = self.interleave({k: runner(v) for k, v in engines.items()}, n)
            self.record(
                "docker_run_rm",
                "docker run --rm of /bin/true (dockerd 20.10 on each, live-restore)",
                "ms",
                samples,
                ("berth", "containerd"),
                1000,
            )
        finally:
            for daemon in self.dockerds:
                daemon.stop_everything()
            for name in engines:
                for group in Path("/sys/fs/cgroup").glob(f"*/berth-bench-{name}"):
                    for sub in sorted(group.glob("**/"), key=lambda p: -len(p.parts)):
                        with contextlib.suppress(OSError):
                            sub.rmdir()

    def _dockerd(self, name: str, containerd_address: str) -> list[str]:
        base = self.work / f"dockerd-{name}"
        base.mkdir(exist_ok=True)
        host = f"unix://{base / 'docker.sock'}"
        daemon = Daemon(
            f"dockerd-{name}",
            [
                "/usr/sbin/dockerd",
                "--containerd",
                containerd_address,
                "--containerd-namespace",
                f"bench-{name}",
                "--containerd-plugins-namespace",
                f"bench-{name}-plugins",
                "--data-root",
                str(base / "data"),
                "--exec-root",
                str(base / "exec"),
                "--pidfile",
                str(base / "dockerd.pid"),
                "-H",
                host,
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--live-restore",
                "--storage-driver",
                "overlay2",
                "--cgroup-parent",
                f"/berth-bench-{name}",
            ],
            base / "dockerd.log",
        )
        daemon.start()
        self.dockerds.append(daemon)
        docker = ["/usr/bin/docker", "-H", host]
        deadline = time.monotonic() + 60
        while sh([*docker, "version"], check=False, timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd on {name} did not start; see {base}/dockerd.log")
            time.sleep(0.2)
        return docker

    def _registry(self, port: int) -> subprocess.Popen[bytes]:
        data = self.work / "registry"
        data.mkdir(exist_ok=True)
        config = self.work / "registry.yml"
        config.write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {data}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import socket

        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.02)
        proc.kill()
        raise RuntimeError("the registry did not start")

    # -- report

    def write(self, out_dir: Path, versions: dict[str, str]) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H%M%S") + ("-quick" if self.quick else "")
        self.results["versions"] = versions
        self.results["quick"] = self.quick
        (out_dir / f"{stamp}.json").write_text(json.dumps(self.results, indent=2, sort_keys=True))
        lines = [
            f"# berth benchmark {stamp}\n",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            "",
        ]
        lines.append("Every comparison interleaved (A B B A ...) after warm-up, in this one run.\n")
        for key, fig in self.results["figures"].items():
            if "systems" in fig:
                lines.append(self.figure_markdown(key))
            elif "load" in fig:
                from bench_upgrade import upgrade_markdown

                lines.append(upgrade_markdown(fig))
            elif "values" in fig:
                lines.append(f"\n### {fig['title']} (MiB, mean per shim)\n")
                lines.append(
                    "| system | shims | shim RSS | shim PSS | shim USS | daemon RSS |\n"
                    "|---|---|---|---|---|---|"
                )
                for name, v in fig["values"].items():
                    lines.append(
                        f"| {name} | {v['shims']} | {v['shim_rss']:.2f} | {v['shim_pss']:.2f} | "
                        f"{v['shim_uss']:.2f} | {v['daemon_rss']:.1f} |"
                    )
                if "zygote_pss" in fig["values"].get("berth", {}):
                    lines.append(
                        "\nberth's zygote (shared by all shims): PSS "
                        f"{fig['values']['berth']['zygote_pss']:.2f} MiB"
                    )
                if "frontend_rss" in fig["values"].get("berth", {}):
                    b = fig["values"]["berth"]
                    lines.append(
                        "\nberth-grpc (containerd's gRPC API: own HTTP/2 + protobuf; "
                        "a process of its own): "
                        f"RSS {b['frontend_rss']:.1f} MiB, PSS {b['frontend_pss']:.1f} MiB. "
                        f"berthd + berth-grpc RSS: {b['daemon_rss'] + b['frontend_rss']:.1f} MiB"
                    )
        for note in self.results["notes"]:
            lines.append(f"\nNote: {note}")
        path = out_dir / f"{stamp}.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_workdir() -> Iterator[Path]:
    work = Path(
        tempfile.mkdtemp(prefix="berth-bench-", dir="/run" if os.path.isdir("/run") else "/tmp")
    )
    sh(["mount", "-t", "tmpfs", "-o", "mode=0711", "tmpfs", str(work)])
    try:
        yield work
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def run_figures(bench: Bench, only: set[str], quick: bool) -> None:
    if "run_rm" in only:
        bench.fig_run_rm("runc")
        bench.fig_run_rm("crun")
    if "memory" in only:
        for count in [20] if quick else [20, 100]:
            bench.fig_memory(count)
    simple: dict[str, Callable[[], None]] = {
        "throughput": bench.fig_throughput,
        "concurrent": bench.fig_concurrent,
        "exec": bench.fig_exec,
        "images": bench.fig_images,
        "clients": bench.fig_clients,
        "cli": bench.fig_cli,
        "network": bench.fig_network,
        "coldstart": bench.fig_coldstart,
    }
    for name, figure in simple.items():
        if name in only:
            figure()
    if only & {"takeover", "upgrade"}:
        import bench_upgrade  # scripts/bench_upgrade.py: the figures of in-place upgrades

        if "takeover" in only:
            for count in [20] if quick else [20, 100]:
                bench_upgrade.fig_takeover(bench, count)
        if "upgrade" in only:
            bench_upgrade.fig_upgrade_load(bench)
    if "metrics" in only:
        import bench_metrics  # scripts/bench_metrics.py: the cost of berthd's [metrics]

        bench_metrics.fig_metrics(bench)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs and smaller sizes (< 5 min)"
    )
    parser.add_argument(
        "--only",
        action="append",
        help="run_rm, memory, throughput, concurrent, exec, images, clients, cli, coldstart, "
        "takeover, upgrade, metrics",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 2
    if hybrid_crun_fix_needed():
        os.makedirs("/sys/fs/cgroup/hugetlb", exist_ok=True)
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", "hugetlb", "hugetlb", "/sys/fs/cgroup/hugetlb"],
            check=True,
        )
    only = set(
        args.only
        or [
            "run_rm",
            "memory",
            "throughput",
            "concurrent",
            "exec",
            "images",
            "clients",
            "cli",
            "coldstart",
            "network",
            "takeover",
            "upgrade",
            "metrics",
        ]
    )
    with private_workdir() as work:
        bench = Bench(args.quick, work)
        try:
            bench.prepare()
            versions = bench.versions()
            print("versions:", versions, flush=True)
            run_figures(bench, only, args.quick)
            path = bench.write(Path(args.out), versions)
            print(f"\nwrote {path}")
        finally:
            for dockerd in bench.dockerds:
                dockerd.stop_everything()
            bench.berth.daemon.stop_everything()
            bench.containerd.daemon.stop_everything()
            remove_namespace_cgroups(NS)  # berth's /berth/bench/*
            for group in Path("/sys/fs/cgroup").glob(f"*/{NS}"):  # ctr's /bench/<id>
                for sub in sorted(group.glob("**/"), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            for runtime in ("runc", "crun"):
                root = work / f"bare-{runtime}"
                if root.is_dir():
                    for cid in root.iterdir():
                        subprocess.run(
                            [runtime, "--root", str(root), "delete", "--force", cid.name],
                            capture_output=True,
                            check=False,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
