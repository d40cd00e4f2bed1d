"""The upgrade figures of the benchmark (scripts/bench --only takeover,upgrade): berthd with
a warm standby killed (-9) against containerd killed and restarted, and 20 in-place
upgrades of berthd under load against 20 kill + start of containerd under the same load.

Imported by scripts/bench.py; everything here is side by side with containerd in the one
run, and every process it starts is stopped by pid (through the bench's Daemon reapers).
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import BERTH, BERTHD, IMAGE, NS, Bench, Berth, Containerd, Daemon, sh
from berth.shim.wire.client import Client
from tests.support.helpers import container_log_lines, handover_windows

COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
STUCK = 30.0  # a CLI call this long is looked at (its stack, its fds) while it hangs


def _diagnose(pid: int) -> str:
    """What a hanging process is doing: its state, kernel wait channel and fds, and its
    Python stack if py-spy is installed (BERTH_PY_SPY or on PATH)."""
    lines = []
    with contextlib.suppress(OSError):
        lines.append(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0])
        lines.append("wchan " + Path(f"/proc/{pid}/wchan").read_text())
        fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        lines.append(f"fds {fds}")
    spy = os.environ.get("BERTH_PY_SPY") or shutil.which("py-spy")
    if spy:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
        lines.append(dump.stdout + dump.stderr)
    return "\n".join(lines)


class UpgradableBerth(Berth):
    """A berthd of its own for these figures: INFO logs (the handover windows are read
    from them), optionally a warm standby (`standby = true`)."""

    def __init__(self, work: Path, name: str, standby: bool) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = str(self.dir / "state" / "berthd.sock")
        self.grpc_address = ""
        self.config = self.dir / "berthd.toml"
        self.config.write_text(
            f'root = "{self.dir / "root"}"\nstate = "{self.dir / "state"}"\nlog_level = "info"\n'
            + ("standby = true\n" if standby else "")
            + '[runtimes.runc]\nbinary = "runc"\n'
        )
        self.daemon = Daemon(name, [BERTHD, "--config", str(self.config)], self.dir / "berthd.log")
        self.env = dict(os.environ, BERTH_ADDRESS=self.address, BERTH_NAMESPACE=NS)

    def active_pid(self) -> int:
        with contextlib.suppress(OSError, ValueError):
            text = (self.dir / "state" / "berthd.lock").read_text()
            return int(json.loads(text or "{}").get("pid", 0))
        return 0

    def log(self) -> str:
        return self.daemon.log.read_text(errors="replace")

    def take_over(self) -> float:
        """`berthd --takeover` (the tree's, in place of the running one), until the new
        one serves and the old one has exited; how long that took (s)."""
        old = self.active_pid()
        began = time.perf_counter()
        self.daemon.command = [BERTHD, "--config", str(self.config), "--takeover"]
        self.daemon.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = self.active_pid()
            if new not in (0, old) and not _alive(old):
                with contextlib.suppress(Exception), Client(self.address) as client:
                    client.call("version")
                    return time.perf_counter() - began
            time.sleep(0.005)
        raise RuntimeError(f"the takeover did not finish; see {self.daemon.log}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _count_refusals(path: str, attempts: Any, refused: Any, stop: Any) -> None:
    """In a process of its own (no GIL shared with the pollers): connect in a tight
    loop, count the refused connects."""
    while not stop.is_set():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            refused.value += 1
        except OSError:
            pass
        finally:
            sock.close()
        attempts.value += 1


class Refusals:
    def __init__(self, path: str) -> None:
        context = multiprocessing.get_context("fork")
        self.attempts, self.refused = context.Value("q", 0), context.Value("q", 0)
        self._stop = context.Event()
        self._proc = context.Process(
            target=_count_refusals, args=(path, self.attempts, self.refused, self._stop)
        )
        self._proc.start()

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        return int(self.attempts.value), int(self.refused.value)


def _probe(path: str, out: str, stop: Any) -> None:
    """In a process of its own: `version` over the wire client in a loop (each on a new
    connection, as a CLI call makes one), every call's wall-clock times and outcome."""
    from berth.shim.wire.errors import Reconnect

    with open(out, "w") as record:
        while not stop.is_set():
            began, ok = time.time(), "ok"
            for _attempt in range(10):  # as berth's clients do: Reconnect means "again"
                try:
                    with Client(path, timeout=30) as client:
                        client.call("version", {})
                    break
                except Reconnect:
                    continue
                except Exception as exc:  # every failure is reported
                    ok = repr(exc).replace("\n", " ")[:200]
                    break
            record.write(f"{began} {time.time()} {ok}\n")
            time.sleep(0.002)


def _probe_grpc(path: str, out: str, stop: Any) -> None:
    """The same against containerd: Version/Version over gRPC, a channel per call."""
    import grpc

    from berth.daemon.grpc import convert as capi

    t = capi.types()
    with open(out, "w") as record:
        while not stop.is_set():
            began, ok = time.time(), "ok"
            try:
                with grpc.insecure_channel(f"unix:{path}") as channel:
                    channel.unary_unary(
                        "/containerd.services.version.v1.Version/Version",
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=lambda b: b,
                    )(t.Empty(), timeout=30)
            except grpc.RpcError as exc:
                ok = f"{exc.code().name}"
            record.write(f"{began} {time.time()} {ok}\n")
            time.sleep(0.002)


class Prober:
    def __init__(self, path: str, out: Path, grpc: bool = False) -> None:
        context = multiprocessing.get_context("fork")
        self.out = out
        self._stop = context.Event()
        target = _probe_grpc if grpc else _probe
        self._proc = context.Process(target=target, args=(path, str(out), self._stop))
        self._proc.start()

    def stop(self) -> tuple[list[tuple[str, float, float]], list[str]]:
        self._stop.set()
        self._proc.join(60)
        calls, failures = [], []
        for line in self.out.read_text().splitlines():
            began, ended, outcome = line.split(" ", 2)
            calls.append(("(API) version", float(began), float(ended)))
            if outcome != "ok":
                failures.append(f"(API) version: {outcome}")
        return calls, failures


def _running(cmd: list[str], env: dict[str, str]) -> int:
    result = sh(cmd, check=False, env=env, timeout=10)
    return result.stdout.decode().count("RUNNING") if result.returncode == 0 else -1


# -- kill -9 with a warm standby vs containerd's restart ---------------------------------


def fig_takeover(bench: Bench, count: int) -> None:
    berth = UpgradableBerth(bench.work, f"berth-standby-{count}", standby=True)
    containerd = bench.containerd
    berth.start()
    started: dict[str, list[str]] = {"berth": [], "containerd": []}
    try:
        for _ in range(count):
            cid = bench.uid("tk")
            sh(berth.run_detached(cid, bench.rootfs, ["sleep", "100000"]), env=berth.env)
            started["berth"].append(cid)
            cid = bench.uid("tk")
            sh(containerd.run_detached(cid, bench.rootfs, ["sleep", "100000"]))
            started["containerd"].append(cid)
        rounds = 2 if bench.quick else 5
        samples: dict[str, list[float]] = {"berth": [], "containerd": []}
        precise: dict[str, list[float]] = {"berth": [], "containerd": []}
        refusals: dict[str, list[tuple[int, int]]] = {"berth": [], "containerd": []}
        for _ in range(rounds):  # polled with each one's CLI, as an operator would
            _await_standby(berth)
            samples["berth"].append(_kill_active(berth, count))
            samples["containerd"].append(_restart(containerd, count))
        for _ in range(rounds):  # polled in-process, every 5 ms: no CLI start-up in it
            _await_standby(berth)
            precise["berth"].append(_kill_active(berth, count, in_process=True))
            precise["containerd"].append(_restart(containerd, count, in_process=True))
        for _ in range(rounds):  # a client connecting in a tight loop through the kill
            _await_standby(berth)
            _kill_active(berth, count, refusals["berth"])
            _restart(containerd, count, refusals["containerd"])
        bench.record(
            f"takeover_{count}",
            f"kill -9 with {count} running: berthd's warm standby takes over vs containerd "
            "restarted; until all RUNNING (CLI polling)",
            "ms",
            samples,
            ("berth", "containerd"),
            1000,
        )
        bench.record(
            f"takeover_{count}_precise",
            "the same, polled in-process every 5 ms (berth's API; containerd's Tasks/List "
            "over gRPC)",
            "ms",
            precise,
            ("berth", "containerd"),
            1000,
        )
        for name, counts in refusals.items():
            attempts = sum(a for a, _ in counts)
            refused = sum(r for _, r in counts)
            bench.results["figures"][f"takeover_{count}"].setdefault("refused", {})[name] = {
                "attempts": attempts,
                "refused": refused,
            }
        figure = bench.results["figures"][f"takeover_{count}"]
        note = ", ".join(
            f"{name} {v['refused']} of {v['attempts']}" for name, v in figure["refused"].items()
        )
        bench.results["notes"].append(
            f"takeover at {count} tasks: refused connections of a client connecting in a tight "
            f"loop through every kill ({rounds} rounds): {note}"
        )
        print(f"refused connections at {count}: {note}", flush=True)
    finally:
        for cid in started["containerd"]:
            containerd.remove(cid)
        for cid in started["berth"]:
            berth.remove(cid)
        berth.daemon.stop_everything()


def _await_standby(berth: UpgradableBerth) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        active = berth.active_pid()
        if active and f"standing by for berthd pid {active}" in berth.log():
            time.sleep(0.2)  # attached and settled
            return
        time.sleep(0.02)
    raise RuntimeError(f"no standby behind berthd; see {berth.daemon.log}")


def _kill_active(
    berth: UpgradableBerth,
    count: int,
    refusals: list[tuple[int, int]] | None = None,
    in_process: bool = False,
) -> float:
    active = berth.active_pid()
    counter = Refusals(berth.address) if refusals is not None else None
    try:
        t0 = time.perf_counter()
        os.kill(active, signal.SIGKILL)
        while True:
            if in_process:
                with contextlib.suppress(Exception), Client(berth.address, namespace=NS) as c:
                    tasks = c.call("tasks.list")["tasks"]
                    if sum(t["status"] == "running" for t in tasks) >= count:
                        break
                time.sleep(0.005)
            elif _running(berth.tasks_cmd(), berth.env) >= count:
                break
        elapsed = time.perf_counter() - t0
    finally:
        if counter is not None and refusals is not None:
            refusals.append(counter.stop())
    return elapsed


def _restart(
    containerd: Containerd,
    count: int,
    refusals: list[tuple[int, int]] | None = None,
    in_process: bool = False,
) -> float:
    counter = Refusals(containerd.address) if refusals is not None else None
    try:
        containerd.daemon.kill9()
        t0 = time.perf_counter()
        containerd.daemon.start()
        while True:
            if in_process:
                if _running_grpc(containerd.address) >= count:
                    break
                time.sleep(0.005)
            elif _running(containerd.tasks_cmd(), containerd.env) >= count:
                break
        elapsed = time.perf_counter() - t0
    finally:
        if counter is not None and refusals is not None:
            refusals.append(counter.stop())
    return elapsed


def _running_grpc(address: str) -> int:
    """Tasks RUNNING, by containerd's Tasks/List over gRPC (-1 while it does not answer)."""
    import grpc

    from berth.daemon.grpc import convert as capi

    t = capi.types()
    try:
        with grpc.insecure_channel(f"unix:{address}") as channel:
            listing = channel.unary_unary(
                "/containerd.services.tasks.v1.Tasks/List",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=t.tasks.ListTasksResponse.FromString,
            )(t.tasks.ListTasksRequest(), metadata=[("containerd-namespace", NS)], timeout=5)
    except grpc.RpcError:
        return -1
    return sum(1 for task in listing.tasks if task.status == 2)  # RUNNING


# -- 20 upgrades under load ----------------------------------------------------------------


class Load:
    """Clients calling in loops, each call a CLI run whose exit status (and output, where
    known) is checked; (verb, began, ended) wall-clock times kept for the latency figures."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.calls: list[tuple[str, float, float]] = []
        self.expected_exits: dict[str, int] = {}
        self.stuck: list[str] = []  # calls that took over STUCK seconds, with what they did
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._n = 0
        self._lock = threading.Lock()

    def name(self, prefix: str) -> str:
        with self._lock:
            self._n += 1
            return f"{prefix}{self._n}"

    def call(
        self, verb: str, argv: list[str], env: dict[str, str], expect: bytes | None = None
    ) -> None:
        began = time.time()
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(timeout=STUCK)
        except subprocess.TimeoutExpired:
            self.stuck.append(f"{verb} (pid {proc.pid}, {STUCK:.0f} s):\n{_diagnose(proc.pid)}")
            out, err = proc.communicate()  # and wait on: how long it stays stuck is the figure
        failed = proc.returncode != 0 or (expect is not None and out != expect)
        detail = f"{proc.returncode} {err.decode(errors='replace').strip()[:200]}"
        with self._lock:  # the report is read under the same lock
            self.calls.append((verb, began, time.time()))
            if failed:
                self.failures.append(f"{verb}: {detail}")

    def loop(self, step: Callable[[], None]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                step()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)


def fig_upgrade_load(bench: Bench) -> None:
    upgrades = 5 if bench.quick else 20
    writers = 10 if bench.quick else 50
    berth = UpgradableBerth(bench.work, "berth-upgrade", standby=False)
    berth.start()
    try:
        report = {
            "berth": _berth_under_load(bench, berth, upgrades, writers),
            "containerd": _containerd_under_load(bench, upgrades, writers),
        }
    finally:
        berth.daemon.stop_everything()
    bench.results["figures"]["upgrade_load"] = {
        "title": f"{upgrades} upgrades under load ({writers} containers writing, 4 clients, "
        "containers exiting, an events subscriber)",
        "load": report,
    }
    print(upgrade_markdown(bench.results["figures"]["upgrade_load"]), flush=True)


def _client_steps(
    load: Load,
    call: Callable[..., None],
    image: tuple[list[str], list[str]],
    busy: str,
    prefix: str,
) -> list[Callable[[], None]]:
    """The calls of one client, the same verbs for `berth` and `ctr` (`image`: what a
    container is made from, for `containers create` and for `run`; `busy`: a running
    container to exec in)."""

    def create_rm() -> None:
        cid = load.name(prefix + "c")
        call("containers create", "containers", "create", *image[0], cid, "true")
        call("containers rm", "containers", "rm", cid)

    def run_rm() -> None:
        cid = load.name(prefix + "r")
        call("run --rm", "run", "--rm", *image[1], cid, "echo", "hi", expect=b"hi\n")

    def exec_() -> None:
        exec_id = load.name(prefix + "e")
        call(
            "tasks exec", "tasks", "exec", "--exec-id", exec_id, busy, "echo", "in", expect=b"in\n"
        )

    return [
        lambda: call("version", "version"),
        lambda: call("tasks ls", "tasks", "ls"),
        create_rm,
        run_rm,
        exec_,
    ]


def _client_loop(load: Load, client: int, steps: list[Callable[[], None]]) -> None:
    def step() -> None:
        for one in steps:
            one()

    load.loop(step)


def _berth_under_load(
    bench: Bench, berth: UpgradableBerth, upgrades: int, writers: int
) -> dict[str, Any]:
    env = berth.env
    names = [f"w{i}" for i in range(writers)]
    for name in names:
        sh(berth.run_detached(name, bench.rootfs, ["sh", "-c", COUNTER]), env=env)
    events = subprocess.Popen(
        [BERTH, "events", "--filter", 'topic=="/tasks/exit"'],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    load = Load()

    def cli(verb: str, *args: str, expect: bytes | None = None) -> None:
        load.call(verb, [BERTH, *args], env, expect)

    def exiter() -> None:
        cid = load.name("x")
        status = len(load.expected_exits) % 200 + 1
        load.expected_exits[cid] = status
        cli(
            "run -d",
            "run",
            "-d",
            "--read-only",
            "--rootfs",
            bench.rootfs,
            cid,
            "sh",
            "-c",
            f"sleep 0.3; exit {status}",
        )
        cli("tasks wait", "tasks", "wait", cid, expect=f"{status}\n".encode())
        cli("tasks rm", "tasks", "rm", cid)
        cli("containers rm", "containers", "rm", cid)

    image = (["--rootfs", bench.rootfs], ["--read-only", "--rootfs", bench.rootfs])
    steps = _client_steps(load, cli, image, names[0], "")
    for client in range(4):
        _client_loop(load, client, steps[client:] + steps[:client])
    load.loop(exiter)
    prober = Prober(berth.address, berth.dir / "probe.txt")
    durations = []
    try:
        time.sleep(2)
        for _ in range(upgrades):
            durations.append(berth.take_over())
            time.sleep(0.5)
        time.sleep(2)
    finally:
        load.stop()
        probed, probe_failures = prober.stop()
        load.calls.extend(probed)
        load.failures.extend(probe_failures)
    # log lines: every writer's numbers, once, in order
    for name in names:
        sh(berth.cli("tasks", "kill", "-s", "SIGKILL", name), env=env, check=False)
    lost_lines = 0
    for name in names:
        sh(berth.cli("tasks", "wait", name), env=env, check=False)
        numbers = [
            int(x) for x in container_log_lines(str(berth.dir / "state"), NS, name) if x.isdigit()
        ]
        lost_lines += sum(1 for i, n in enumerate(numbers) if n != i)
        berth.remove(name)
    time.sleep(0.5)
    events.terminate()
    out, _ = events.communicate(timeout=30)
    seen: collections.Counter[str] = collections.Counter()
    statuses: dict[str, int] = {}
    for line in out.decode().splitlines():
        with contextlib.suppress(ValueError, IndexError):
            event = json.loads(line.split(" ", 3)[3])
            if event.get("id") == event.get("container_id"):
                seen[event["container_id"]] += 1
                statuses[event["container_id"]] = event["exit_status"]
    exits = load.expected_exits
    lost = sum(1 for cid in exits if seen[cid] == 0)
    duplicated = sum(1 for cid in exits if seen[cid] > 1)
    wrong = sum(1 for cid, status in exits.items() if seen[cid] and statuses.get(cid) != status)
    if load.stuck:
        kept = Path(__file__).resolve().parent.parent / "bench" / "tmp"
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(berth.daemon.log, kept / f"berthd-{int(time.time())}.log")
    windows = handover_windows([berth.log()])
    drains = [float(x) for x in re.findall(r"drained in ([\d.]+) ms", berth.log())]
    releases = [float(x) for x in re.findall(r"released in ([\d.]+) ms", berth.log())]
    return {
        "restarts": upgrades,
        "calls": len(load.calls),
        "failed_calls": len(load.failures),
        "stuck_calls": load.stuck,
        "failed_by_verb": dict(collections.Counter(f.split(":")[0] for f in load.failures)),
        "failures": load.failures[:5],
        "exits": len(exits),
        "lost_exit_events": lost,
        "duplicated_exit_events": duplicated,
        "wrong_exit_statuses": wrong,
        "lost_or_misplaced_log_lines": lost_lines,
        "takeover_s_median": statistics.median(durations),
        "handover_window_ms_max": max((e - b) * 1e3 for b, e in windows) if windows else None,
        "drain_ms_max": max(drains, default=None),
        "release_ms_max": max(releases, default=None),
        "latency": _latency(load.calls, windows),
    }


def _containerd_under_load(bench: Bench, restarts: int, writers: int) -> dict[str, Any]:
    containerd = bench.containerd
    names = [bench.uid("cw") for _ in range(writers)]
    for name in names:
        sh(containerd.run_detached(name, bench.rootfs, ["sh", "-c", COUNTER]))
    load = Load()
    env = containerd.env

    def ctr(verb: str, *args: str, expect: bytes | None = None) -> None:
        load.call(verb, containerd.cli(*args), env, expect)

    def exiter() -> None:
        cid = load.name("cx")
        status = len(load.expected_exits) % 200 + 1
        load.expected_exits[cid] = status
        # ctr run (attached) returns the container's exit status
        began = time.time()
        result = subprocess.run(
            containerd.cli("run", "--rm", IMAGE, cid, "sh", "-c", f"sleep 0.3; exit {status}"),
            capture_output=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        load.calls.append(("run (exit status)", began, time.time()))
        if result.returncode != status:
            load.failures.append(f"run (exit status): {result.returncode} != {status}")

    steps = _client_steps(load, ctr, ([IMAGE], [IMAGE]), names[0], "c")
    for client in range(4):
        _client_loop(load, client, steps[client:] + steps[:client])
    load.loop(exiter)
    prober = Prober(containerd.address, containerd.dir / "probe.txt", grpc=True)
    try:
        time.sleep(2)
        for _ in range(restarts):
            containerd.daemon.kill9()
            containerd.start()
            time.sleep(0.5)
        time.sleep(2)
    finally:
        load.stop()
        probed, probe_failures = prober.stop()
        load.calls.extend(probed)
        load.failures.extend(probe_failures)
        for name in names:
            containerd.remove(name)
    return {
        "restarts": restarts,
        "calls": len(load.calls),
        "failed_calls": len(load.failures),
        "stuck_calls": load.stuck,
        "failed_by_verb": dict(collections.Counter(f.split(":")[0] for f in load.failures)),
        "failures": load.failures[:5],
        "exits": len(load.expected_exits),
        "latency": _latency(load.calls, []),
    }


def _latency(
    calls: list[tuple[str, float, float]], windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """Per verb: the median call (ms), the worst call, and the worst call that overlapped
    a handover window."""
    out: dict[str, Any] = {}
    by_verb: dict[str, list[tuple[float, bool]]] = collections.defaultdict(list)
    for verb, began, ended in calls:
        during = any(began < w_end and ended > w_began for w_began, w_end in windows)
        by_verb[verb].append(((ended - began) * 1e3, during))
    for verb, samples in sorted(by_verb.items()):
        all_ms = [ms for ms, _ in samples]
        in_window = [ms for ms, during in samples if during]
        out[verb] = {
            "n": len(all_ms),
            "median": statistics.median(all_ms),
            "max": max(all_ms),
            "max_in_handover": max(in_window) if in_window else None,
        }
    return out


def upgrade_markdown(figure: dict[str, Any]) -> str:
    load = figure["load"]
    lines = [
        f"\n### {figure['title']}\n",
        "| | berth (berthd --takeover) | containerd (kill -9 + start) |",
        "|---|---|---|",
    ]

    def cell(system: str, key: str) -> str:
        value = load[system].get(key)
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    for key, label in (
        ("restarts", "upgrades / restarts"),
        ("calls", "calls"),
        ("failed_calls", "failed calls"),
        ("exits", "containers exited with a known status"),
        ("lost_exit_events", "exit events lost"),
        ("duplicated_exit_events", "exit events repeated"),
        ("wrong_exit_statuses", "wrong exit statuses"),
        ("lost_or_misplaced_log_lines", "log lines lost or out of place"),
        (
            "handover_window_ms_max",
            "longest handover window (ms: stop accepting -> successor serves)",
        ),
        ("drain_ms_max", "longest drain (ms)"),
        ("release_ms_max", "longest release (ms)"),
    ):
        lines.append(f"| {label} | {cell('berth', key)} | {cell('containerd', key)} |")
    lines.append("\nCall latency (ms; a CLI process per call, on a loaded 2-core machine):\n")
    lines.append(
        "| verb | berth median | berth worst | berth worst in a handover "
        "| containerd median | containerd worst |"
    )
    lines.append("|---|---|---|---|---|---|")
    berth_lat, ctr_lat = load["berth"]["latency"], load["containerd"]["latency"]
    for verb in sorted(set(berth_lat) | set(ctr_lat)):
        b, c = berth_lat.get(verb, {}), ctr_lat.get(verb, {})

        def f(d: dict[str, Any], k: str) -> str:
            v = d.get(k)
            return "-" if v is None else f"{v:.0f}"

        lines.append(
            f"| {verb} | {f(b, 'median')} | {f(b, 'max')} | {f(b, 'max_in_handover')} "
            f"| {f(c, 'median')} | {f(c, 'max')} |"
        )
    for system in ("berth", "containerd"):
        for stuck in load[system].get("stuck_calls") or []:
            lines.append(f"\n{system}: a call hung for over {STUCK:.0f} s: {stuck}")
        if load[system].get("failed_by_verb"):
            by_verb = ", ".join(
                f"{v} {n}" for v, n in sorted(load[system]["failed_by_verb"].items())
            )
            lines.append(f"\n{system}'s failed calls by verb: {by_verb}")
        if load[system].get("failures"):
            lines.append(f"\n{system}'s first failed calls: " + "; ".join(load[system]["failures"]))
    return "\n".join(lines)
