"""Zero-downtime upgrades and takeovers: a planned handover (`berthd --takeover`) under
load, a warm standby taking over from a killed daemon, and the handover's bad inputs.

Every daemon here is real and runs real containers; the figures (takeover time against
containerd's restart) are the benchmark's business (scripts/bench), not asserted here.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from berth.shim.wire.client import Client
from berth.shim.wire.errors import FailedPrecondition, Reconnect
from berth.shim.wire.protocol import Connection, Hello, Request, Role
from tests.support.helpers import (
    BERTH,
    BERTHD,
    Daemon,
    container_log_lines,
    handover_windows,
    is_gone,
    kill,
    process_state,
    spawn_reaped,
    wait_until,
)

pytestmark = pytest.mark.container

ROUNDS = int(os.environ.get("BERTH_UPGRADE_ROUNDS", "5"))
WRITERS = int(os.environ.get("BERTH_UPGRADE_CONTAINERS", "8"))
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.02; done"


@pytest.fixture
def standby_daemon() -> Iterator[Daemon]:
    d = Daemon(top_config="standby = true\n")
    try:
        yield d
    finally:
        d.cleanup()


def env(daemon: Daemon) -> dict[str, str]:
    return dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)


class Refusals:
    """A client connecting in a tight loop the whole time: every refused connect counted;
    beside it, one calling `version` in a loop over the wire client (no CLI start-up in
    its latency): each call's (began, ended) wall-clock time, each failure."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.attempts = self.refused = self.reconnects = 0
        self.calls: list[tuple[str, float, float]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._connect, daemon=True),
            threading.Thread(target=self._call, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _connect(self) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
            except (ConnectionRefusedError, FileNotFoundError):
                self.refused += 1
            finally:
                sock.close()
            self.attempts += 1

    def _call(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            for _attempt in range(5):  # as berth's clients do: Reconnect means "again"
                try:
                    with Client(self.address, timeout=30) as client:
                        client.call("version", {})
                    break
                except Reconnect:
                    self.reconnects += 1
                except Exception as e:
                    self.failures.append(repr(e))
                    break
            self.calls.append(("(wire) version", began, time.time()))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)


def running(daemon: Daemon) -> int:
    with Client(daemon.address, namespace=daemon.namespace, timeout=10) as client:
        tasks = client.call("tasks.list", {})["tasks"]
    return sum(t["status"] == "running" for t in tasks)


# --- a warm standby -------------------------------------------------------------------


def test_a_standby_takes_over_a_killed_daemon_without_a_refused_connection(
    standby_daemon: Daemon,
) -> None:
    d = standby_daemon
    for i in range(5):
        assert d.cli("run", "--busybox", "-d", f"s{i}", "sleep", "600").returncode == 0
    exiter = "sleep 1; exit 42"
    assert d.cli("run", "--busybox", "-d", "ex", "sh", "-c", exiter).returncode == 0
    wait_until(lambda: "standing by for berthd pid" in d.log_text(), what="a standby")
    first = d.active_pid()
    refusals = Refusals(d.address)
    try:
        kill(first)
        wait_until(lambda: d.active_pid() not in (0, first), timeout=10, what="the takeover")
        wait_until(lambda: running(d) == 5, timeout=10, what="every task RUNNING")
    finally:
        refusals.stop()
    assert refusals.refused == 0 and refusals.attempts > 10, vars(refusals)
    second = d.adopt_active()
    with Client(d.address, namespace=d.namespace) as client:
        assert client.call("tasks.wait", {"container_id": "ex"})["exit_status"] == 42
        assert client.call("introspection.server", {})["pid"] == second
    # ... and a fresh standby stands behind the new daemon
    wait_until(
        lambda: f"standing by for berthd pid {second}" in d.log_text(), what="a fresh standby"
    )


def test_of_two_racing_standbys_exactly_one_takes_over(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "r1", "sleep", "600").returncode == 0
    standbys = []
    for k in range(2):
        log_path = os.path.join(daemon.dir, f"standby-{k}.log")
        daemon.logs.append(log_path)
        reaper, pid = spawn_reaped([BERTHD, "--config", daemon.config_path, "--standby"], log_path)
        daemon.reapers.append(reaper)
        daemon.remember(pid)
        standbys.append((pid, log_path))
    first = daemon.active_pid()
    for pid, log_path in standbys:
        wait_until(
            lambda p=log_path: f"standing by for berthd pid {first}" in Path(p).read_text(),
            what=f"standby {pid} to attach",
        )
    kill(first)
    wait_until(lambda: daemon.active_pid() in {p for p, _ in standbys}, what="a takeover")
    winner = daemon.active_pid()
    (loser, loser_log) = next((p, lg) for p, lg in standbys if p != winner)
    wait_until(
        lambda: f"standing by for berthd pid {winner}" in Path(loser_log).read_text(),
        what="the other standby to stand behind the winner",
    )
    assert not is_gone(loser) and not is_gone(winner)
    with Client(daemon.address, namespace=daemon.namespace) as client:
        assert client.call("introspection.server", {})["pid"] == winner
        assert client.call("tasks.get", {"container_id": "r1"})["status"] == "running"


# --- a planned handover under load ----------------------------------------------------


class Load:
    """Clients calling in loops (each call a CLI run whose result is checked), containers
    exiting with known statuses, and an `events` subscriber, while berthd is upgraded."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.failures: list[str] = []
        self.calls: list[tuple[str, float, float]] = []  # (verb, began, ended)
        self.expected_exits: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._n = 0
        self._lock = threading.Lock()

    def cli(self, *args: str, expect: bytes | None = None) -> None:
        began = time.time()  # wall clock: compared with the daemons' log lines
        result = subprocess.run(
            [BERTH, *args], env=env(self.daemon), capture_output=True, timeout=120
        )
        self.calls.append((" ".join(args[:2]), began, time.time()))
        if result.returncode != 0 or (expect is not None and result.stdout != expect):
            self.failures.append(f"{args}: {result.returncode} {result.stdout!r} {result.stderr!r}")

    def name(self, prefix: str) -> str:
        with self._lock:
            self._n += 1
            return f"{prefix}{self._n}"

    def loop(self, step: Callable[[], None]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                step()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def exiter(self) -> None:
        cid = self.name("x")
        status = self._n % 200 + 1
        self.expected_exits[cid] = status
        script = f"sleep 0.3; exit {status}"
        self.cli("run", "--busybox", "-d", cid, "sh", "-c", script)
        self.cli("tasks", "wait", cid, expect=f"{status}\n".encode())
        self.cli("tasks", "rm", cid)
        self.cli("containers", "rm", cid)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


def test_upgrades_under_load_lose_no_call_no_event_no_line(daemon: Daemon) -> None:
    d = daemon
    for i in range(WRITERS):
        assert d.cli("run", "--busybox", "-d", f"w{i}", "sh", "-c", COUNTER).returncode == 0
    events = subprocess.Popen(
        [BERTH, "events", "--filter", 'topic=="/tasks/exit"'],
        env=env(d),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    load = Load(d)
    attached: subprocess.Popen[bytes] | None = None
    try:
        load.loop(lambda: load.cli("version"))
        load.loop(lambda: load.cli("tasks", "ls"))
        load.loop(lambda: _create_remove(load))
        load.loop(
            lambda: load.cli(
                "run", "--busybox", "--rm", load.name("r"), "echo", "hi", expect=b"hi\n"
            )
        )
        load.loop(
            lambda: load.cli(
                "tasks", "exec", "--exec-id", load.name("e"), "w0", "echo", "in", expect=b"in\n"
            )
        )
        load.loop(load.exiter)
        # an attached `berth run` whose life spans every upgrade
        numbers = "for i in $(seq 1 60); do echo $i; sleep 0.1; done; exit 3"
        attached = subprocess.Popen(
            [BERTH, "run", "--busybox", "--rm", "attached", "sh", "-c", numbers],
            env=env(d),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        refusals = Refusals(d.address)
        for _ in range(ROUNDS):
            d.take_over()
            time.sleep(0.5)
        refusals.stop()
        time.sleep(1.0)
        out, err = attached.communicate(timeout=60)
    finally:
        load.stop()
        if attached is not None and attached.poll() is None:
            kill(attached.pid)
            attached.wait()
    assert attached is not None
    assert (attached.returncode, out.split()) == (3, [str(n).encode() for n in range(1, 61)]), err
    assert load.failures == [], load.failures[:5]
    assert (refusals.refused, refusals.failures) == (0, []), vars(refusals)
    print(f"\n{ROUNDS} upgrades, {len(load.calls) + len(refusals.calls)} calls")
    print(
        latency_report(
            load.calls + refusals.calls,
            handover_windows([Path(log).read_text(errors="replace") for log in d.logs]),
        )
    )
    # every writer's lines are all in its log, once, in order
    for i in range(WRITERS):
        assert d.cli("tasks", "kill", "-s", "SIGKILL", f"w{i}").returncode == 0
    for i in range(WRITERS):
        assert d.cli("tasks", "wait", f"w{i}").returncode == 0
        lines = container_log_lines(d.state, d.namespace, f"w{i}")
        assert lines == [str(n) for n in range(len(lines))], f"w{i}: {lines[:3]}..."
        assert len(lines) > 50
    # every exit event exactly once, with the status its container exited with
    time.sleep(0.5)
    kill(events.pid)
    out, _ = events.communicate(timeout=30)
    seen = collections.Counter()
    statuses = {}
    for line in out.decode().splitlines():
        event = json.loads(line.split(" ", 3)[3])
        if event.get("id") == event.get("container_id"):  # the init's exit
            seen[event["container_id"]] += 1
            statuses[event["container_id"]] = event["exit_status"]
    assert load.expected_exits, "some containers exited during the upgrades"
    for cid, status in load.expected_exits.items():
        assert (seen[cid], statuses.get(cid)) == (1, status), (cid, seen[cid], statuses.get(cid))
    assert all(count == 1 for count in seen.values()), [c for c, n in seen.items() if n != 1]


def latency_report(
    calls: list[tuple[str, float, float]], handovers: list[tuple[float, float]]
) -> str:
    """Per verb: the median call outside handovers, the worst call that overlapped one."""
    by_verb: dict[str, tuple[list[float], list[float]]] = collections.defaultdict(lambda: ([], []))
    for verb, began, ended in calls:
        during = any(began < h_end and ended > h_began for h_began, h_end in handovers)
        by_verb[verb][during].append((ended - began) * 1e3)
    lines = []
    for verb, (quiet, during) in sorted(by_verb.items()):
        median = statistics.median(quiet) if quiet else float("nan")
        worst = max(during, default=float("nan"))
        lines.append(
            f"  {verb:<16} median {median:6.0f} ms, worst during a handover {worst:6.0f} ms"
        )
    return "\n".join(lines)


def _run_rm(load: Load) -> None:
    load.cli("run", "--busybox", "--rm", load.name("r"), "echo", "hi", expect=b"hi\n")


def _exec(load: Load) -> None:
    load.cli("tasks", "exec", "--exec-id", load.name("e"), "w0", "echo", "in", expect=b"in\n")


def _create_remove(load: Load) -> None:
    cid = load.name("c")
    load.cli("containers", "create", "--busybox", cid, "true")
    load.cli("containers", "rm", cid)


# --- bad input --------------------------------------------------------------------------


def _control(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.path.join(daemon.state, "berthd.ctl"))
    return sock


def _still_serving(daemon: Daemon, pid: int) -> None:
    assert daemon.active_pid() == pid
    with Client(daemon.address, namespace=daemon.namespace) as client:
        assert client.call("introspection.server", {})["pid"] == pid
        assert client.call("tasks.get", {"container_id": "kept"})["status"] == "running"


def test_bad_handover_requests_change_nothing(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    pid = daemon.active_pid()
    # not root: the control socket is 0600 (and the peer's uid is checked as well)
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "python3",
            "-c",
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])",
            os.path.join(daemon.state, "berthd.ctl"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert probe.returncode != 0 and b"Permission denied" in probe.stderr
    # garbage, and a truncated frame
    for junk in (b"this is not a frame at all", b"\x00\x00\x01\x00\x93\x00"):
        with _control(daemon) as sock:
            sock.sendall(junk)
    _still_serving(daemon, pid)
    # a downgrade: refused before anything changes; and a standby of another version
    # (an old release's, left behind by an upgrade) is sent away
    for method, params, refusal in (
        ("handover.begin", {"version": "0.0.1", "pid": 1}, "downgrade is not supported"),
        ("standby.attach", {"version": "0.0.1"}, "a standby must be of this berthd's version"),
        ("standby.attach", {}, "a standby must be of this berthd's version"),
    ):
        with _control(daemon) as sock:
            conn = Connection(Role.CLIENT)
            sock.sendall(conn.send(Hello()))
            conn.receive_data(sock.recv(65536))
            conn.next_event()
            sock.sendall(conn.send(Request(1, method, params, {})))
            conn.receive_data(sock.recv(65536))
            reply = conn.next_event()
            assert isinstance(reply.to_exception(), FailedPrecondition)  # type: ignore[union-attr]
            assert refusal in reply.message, reply  # type: ignore[union-attr]
        _still_serving(daemon, pid)
    assert daemon.cli("tasks", "exec", "--exec-id", "e1", "kept", "true").returncode == 0


def test_a_successor_that_dies_half_way_leaves_the_old_daemon_serving(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    exiter = "sleep 1.5; exit 9"
    assert daemon.cli("run", "--busybox", "-d", "late", "sh", "-c", exiter).returncode == 0
    old = daemon.active_pid()
    refusals = Refusals(daemon.address)
    try:
        log_path = os.path.join(daemon.dir, "dying-successor.log")
        with open(log_path, "wb") as log:
            dying = subprocess.run(
                [BERTHD, "--config", daemon.config_path, "--takeover"],
                env=dict(os.environ, BERTH_TAKEOVER_FAULT="after-handover"),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        assert dying.returncode == 70
        # the old daemon takes everything back (it re-executes itself: same pid)
        wait_until(lambda: daemon.active_pid() == old, timeout=30, what="the old one to resume")
        wait_until(lambda: running(daemon) >= 1, timeout=30, what="the old one to serve")
    finally:
        refusals.stop()
    assert refusals.refused == 0, vars(refusals)
    _still_serving(daemon, old)
    with Client(daemon.address, namespace=daemon.namespace) as client:
        assert client.call("tasks.wait", {"container_id": "late"})["exit_status"] == 9
    assert "resuming" in daemon.log_text()


def test_two_successors_at_once_leave_one_active_daemon(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    old = daemon.active_pid()
    pids = [daemon.take_over(wait=False) for _ in range(2)]
    wait_until(lambda: is_gone(old), timeout=30, what="the old daemon to hand over")
    time.sleep(3)
    live = [p for p in pids if not is_gone(p)]
    assert len(live) == 1, live
    assert daemon.active_pid() == live[0]
    text = daemon.log_text()
    assert "a handover is already under way" in text or "handed over to this one" in text
    _still_serving(daemon, live[0])


# --- a deliberate stop, an address in use, a stalled predecessor -----------------------


def _lock_free(daemon: Daemon) -> bool:
    """Nobody holds the state dir's lock (no berthd is active)."""
    import fcntl

    fd = os.open(os.path.join(daemon.state, "berthd.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _standby_pids(daemon: Daemon) -> list[int]:
    """The standbys the active daemons started, from their logs."""
    import re

    return [int(p) for p in re.findall(r"started a standby \(pid (\d+)\)", daemon.log_text())]


def test_sigterm_stops_berth_and_its_standby_for_good(standby_daemon: Daemon) -> None:
    """SIGTERM of the active daemon is a deliberate stop: its standby exits rather than
    taking over (a standby that did took over a socket whose path was gone, and the next
    stop promoted the next standby)."""
    d = standby_daemon
    assert d.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    first = d.active_pid()
    wait_until(lambda: f"standing by for berthd pid {first}" in d.log_text(), what="a standby")
    standbys = _standby_pids(d)
    assert standbys
    for pid in standbys:
        d.remember(pid)  # stopped by pid if the test fails
    kill(first, signal.SIGTERM)
    wait_until(lambda: is_gone(first), what="the active daemon to stop")
    wait_until(lambda: all(is_gone(p) for p in standbys), what="its standby to exit")
    time.sleep(1.0)
    assert _lock_free(d), f"a berthd took over: {d.active_pid()}"
    assert not os.path.exists(d.address)
    assert "dismissing 1 standby(s)" in d.log_text()
    # berth starts again as an operator expects, its container still running
    d.start()
    with Client(d.address, namespace=d.namespace) as client:
        assert client.call("tasks.get", {"container_id": "kept"})["status"] == "running"
        assert client.call("introspection.server", {})["pid"] == d.pid


def _stale_socket(path: str) -> None:
    """A socket file at `path` that nobody listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


@pytest.mark.parametrize("path_is", ["missing", "stale"])
def test_a_standby_taking_over_binds_a_path_that_lost_its_socket(
    standby_daemon: Daemon, path_is: str
) -> None:
    """A serving daemon never lacks its path: if the active daemon's socket lost its name
    (unlinked, or replaced by a dead socket's file) before it died, the standby that takes
    over binds the path again."""
    d = standby_daemon
    assert d.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    first = d.active_pid()
    wait_until(lambda: f"standing by for berthd pid {first}" in d.log_text(), what="a standby")
    os.unlink(d.address)
    if path_is == "stale":
        _stale_socket(d.address)
    kill(first)
    wait_until(lambda: d.active_pid() not in (0, first), timeout=10, what="the takeover")
    second = d.adopt_active()
    wait_until(d._answers, timeout=10, what="the API at its path")
    with Client(d.address, namespace=d.namespace) as client:
        assert client.call("introspection.server", {})["pid"] == second
        assert client.call("tasks.get", {"container_id": "kept"})["status"] == "running"
    assert "bound again" in d.log_text()


def test_a_berthd_at_an_address_another_one_serves_refuses_to_start(daemon: Daemon) -> None:
    """Another berthd (its own root and state) given the address of a running one refuses
    in one line and changes nothing; a stale socket at the address is replaced."""
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    inode = os.stat(daemon.address).st_ino
    other_dir = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    config = os.path.join(other_dir, "berthd.toml")
    Path(config).write_text(
        f'root = "{other_dir}/root"\nstate = "{other_dir}/state"\n'
        '[runtimes.runc]\nbinary = "runc"\n'
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        second = subprocess.Popen(
            [BERTHD, "--config", config, "--address", daemon.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(second)
        _, err = second.communicate(timeout=20)
        assert second.returncode == 1, err
        assert err.decode().strip().splitlines() == [
            f"berthd: address {daemon.address} is served by another process"
        ], err
        assert os.stat(daemon.address).st_ino == inode
        _still_serving(daemon, daemon.active_pid())
        # a stale socket (nobody listens) is replaced as before
        stale = os.path.join(other_dir, "stale.sock")
        _stale_socket(stale)
        third = subprocess.Popen(
            [BERTHD, "--config", config, "--address", stale],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(third)
        wait_until(lambda: third.poll() is None and _version_at(stale), timeout=20, what="a berthd")
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill(proc.pid)
            proc.wait(timeout=30)
        shutil.rmtree(other_dir, ignore_errors=True)


def _version_at(path: str) -> bool:
    try:
        with Client(path, timeout=5) as client:
            client.call("version")
        return True
    except Exception:
        return False


def test_a_control_connection_without_descriptors_left_does_not_kill_berthd() -> None:
    """accept(2) on the control socket failing with EMFILE (idle API clients holding every
    descriptor) is waited out, as the API's own accept loop does: berthd serves on."""
    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    wrapper = os.path.join(base, "berthd-64fds")
    Path(wrapper).write_text(f'#!/bin/sh\nexec prlimit --nofile=64:64 {BERTHD} "$@"\n')
    os.chmod(wrapper, 0o755)
    d = Daemon(base_dir=base, berthd=wrapper)
    held: list[socket.socket] = []
    try:
        pid = d.pid
        for _ in range(80):  # more than berthd may open: the rest wait in the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(d.address)
            held.append(sock)
        time.sleep(1.0)
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(control)
        control.connect(os.path.join(d.state, "berthd.ctl"))
        time.sleep(2.0)  # berthd died of the EMFILE at once
        assert not is_gone(pid), d.log_text()[-2000:]
        assert "control socket: accept" in d.log_text()  # waited out, not ignored
        for sock in held[:-1]:
            sock.close()
        wait_until(d._answers, timeout=20, what="berthd to answer again")
        # ... and the control connection is served once descriptors are free again
        control.settimeout(10)
        conn = Connection(Role.CLIENT)
        control.sendall(conn.send(Hello()))
        conn.receive_data(control.recv(65536))
        assert type(conn.next_event()).__name__ == "Welcome"
        assert d.active_pid() == pid and os.path.exists(d.address)
    finally:
        for sock in held:
            sock.close()
        d.cleanup()


def test_takeover_detach_returns_though_the_old_daemon_stalls_after_releasing(
    daemon: Daemon,
) -> None:
    """The old daemon stopped (SIGSTOP) after it handed over, before it acknowledged
    "done": `--takeover --detach` returns once the successor serves; the old daemon,
    continued, reads that its successor serves and exits (it does not resume)."""
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    old = daemon.active_pid()
    log_path = os.path.join(daemon.dir, "takeover-detach.log")
    daemon.logs.append(log_path)
    try:
        with open(log_path, "wb") as log:
            started = time.monotonic()
            detached = subprocess.run(
                [BERTHD, "--config", daemon.config_path, "--takeover", "--detach"],
                env=dict(os.environ, BERTH_TAKEOVER_FAULT="stop-predecessor"),
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=60,
            )
        new = int(detached.stdout.decode().strip() or 0)
        if new:
            daemon.remember(new)
        assert detached.returncode == 0, daemon.log_text()[-3000:]
        assert time.monotonic() - started < 30
        assert process_state(old) == "T"  # still stopped: the successor did not wait
        assert daemon.active_pid() == new
        _still_serving(daemon, new)
    finally:
        kill(old, signal.SIGCONT)
        daemon.adopt_active()  # a successor that the test lost track of: stopped by pid too
    wait_until(lambda: is_gone(old), timeout=20, what="the old daemon to exit")
    time.sleep(1.0)
    assert "resuming" not in daemon.log_text()
    _still_serving(daemon, new)


def test_takeover_gives_up_on_a_daemon_that_stalls_while_draining(daemon: Daemon) -> None:
    """The old daemon stopped (SIGSTOP) during its handover: `--takeover` fails after its
    deadline with a clear error, and the old daemon, continued, serves on."""
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    old = daemon.active_pid()
    log_path = os.path.join(daemon.dir, "takeover-stalled.log")
    daemon.logs.append(log_path)
    try:
        with open(log_path, "wb") as log:
            successor = subprocess.run(
                [BERTHD, "--config", daemon.config_path, "--takeover"],
                env=dict(
                    os.environ,
                    BERTH_TAKEOVER_FAULT="stop-predecessor-at-begin",
                    BERTH_HANDOVER_BEGIN_TIMEOUT="3",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=60,
            )
        assert successor.returncode == 1
        assert "did not hand over within 3 s" in Path(log_path).read_text()
    finally:
        kill(old, signal.SIGCONT)
    wait_until(lambda: daemon._answers(), timeout=30, what="the old daemon to serve again")
    wait_until(lambda: daemon.active_pid() == old, timeout=30, what="the old daemon's locks")
    _still_serving(daemon, old)
