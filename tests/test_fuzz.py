"""Fuzzing the daemon's and a shim's sockets, and the on-disk state a restart reads.

The processes must never die, must answer every request with a typed error or a result
(never `internal`, which would mean an unhandled bug) or close that one connection, and
must keep their memory bounded. Example counts are bounded for CI; set
BERTH_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from berth.shim.wire.client import Client
from berth.shim.wire.protocol import HEADER, Connection, Hello, Request, Role
from tests.support.helpers import Daemon, kill, wait_until
from tests.test_shim import StandaloneShim

EXAMPLES = int(os.environ.get("BERTH_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Side-effect-free (or namespace-local) methods: fuzzing must not write files on the host.
DAEMON_METHODS = [
    "version",
    "introspection.server",
    "introspection.plugins",
    "namespaces.get",
    "namespaces.list",
    "namespaces.create",
    "containers.get",
    "containers.list",
    "containers.update",
    "containers.create",
    "containers.delete",
    "tasks.get",
    "tasks.list",
    "tasks.kill",
    "tasks.pids",
    "tasks.metrics",
    "tasks.pause",
    "tasks.resume",
    "tasks.resize",
    "tasks.close_io",
    "tasks.delete_process",
    "content.info",
    "content.read",
    "content.list",
    "content.update",
    "content.status",
    "images.get",
    "images.list",
    "images.delete",
    "snapshots.stat",
    "snapshots.list",
    "snapshots.mounts",
    "leases.list",
    "leases.create",
    "leases.delete",
    "no.such.method",
    "",
    "x" * 200,
]
# pause/resume/update act on the whole container; kill/delete/wait only with an exec id
# (which then names no process): the fuzzed shim's container must stay running throughout.
SHIM_METHODS = [
    "info",
    "state",
    "list",
    "kill",
    "pids",
    "stats",
    "resize_pty",
    "close_io",
    "ack",
    "delete",
    "wait",
    "no_such_method",
]

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "../x",
            "..",
            "/",
            "a/../../b",
            "\0",
            "x" * 5000,
            "sha256:" + "0" * 64,
            "sha256:../../etc/passwd",
        ]
    ),
)
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    hostile_text,
    st.binary(max_size=64),
)
values = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)
params = st.dictionaries(
    st.sampled_from(
        [
            "id",
            "container_id",
            "exec_id",
            "name",
            "digest",
            "key",
            "signal",
            "all",
            "width",
            "height",
            "filters",
            "labels",
            "spec",
            "ref",
            "seq",
            "offset",
            "size",
            "snapshotter",
            "parent",
            "target",
            "force",
            "container",
        ]
    )
    | st.text(max_size=8),
    values,
    max_size=6,
)


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def _poke(path: str, data: bytes) -> None:
    """Send `data` on a fresh connection and read whatever comes back (bounded)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2)
    try:
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass  # the peer may close or reset a connection it does not like
    finally:
        sock.close()


def _requests(
    path: str, methods: list[str], calls: list[tuple[int, dict[str, Any]]], namespace: str
) -> list[tuple[str, str]]:
    """Handshake, send the calls, return (method, error code) of every reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    conn = Connection(Role.CLIENT)
    codes: list[tuple[str, str]] = []
    try:
        sock.sendall(conn.send(Hello()))
        while True:
            event = conn.next_event()
            if type(event).__name__ == "NeedData":
                conn.receive_data(sock.recv(65536))
                continue
            break
        for i, (m, p) in enumerate(calls, start=1):
            try:
                data = conn.send(Request(i, methods[m % len(methods)], p, {"namespace": namespace}))
            except Exception:
                continue  # not encodable (e.g. a huge int): nothing to send
            sock.sendall(data)
            while True:
                event = conn.next_event()
                if type(event).__name__ == "NeedData":
                    chunk = sock.recv(65536)
                    if not chunk:
                        return codes
                    conn.receive_data(chunk)
                    continue
                code = getattr(event, "code", "ok")
                codes.append((methods[m % len(methods)], code))
                break
    finally:
        sock.close()
    return codes


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.cleanup()


def _alive(daemon: Daemon) -> None:
    assert daemon.call("version")["protocol"] == 1


@FUZZ
@given(st.binary(max_size=3000))
def test_daemon_survives_random_bytes(fuzz_daemon: Daemon, data: bytes) -> None:
    _poke(fuzz_daemon.address, data)
    _poke(fuzz_daemon.address, Connection(Role.CLIENT).send(Hello()) + data)
    _alive(fuzz_daemon)


@FUZZ
@given(values, st.integers(0, 3))
def test_daemon_survives_hostile_frames(fuzz_daemon: Daemon, value: Any, how: int) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    frames = [
        _frame(body),
        HEADER.pack(min(2**32 - 1, len(body) * 1000 + 7)) + body,  # a lying length
        _frame(body)[: max(1, len(body) // 2)],  # truncated
        _frame(b"\x91" * 3000 + b"\xc0"),  # deep nesting
    ]
    hello = Connection(Role.CLIENT).send(Hello())
    _poke(fuzz_daemon.address, hello + frames[how])
    _alive(fuzz_daemon)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), params), min_size=1, max_size=8))
def test_daemon_answers_hostile_requests_with_typed_errors(fuzz_daemon: Daemon, calls: Any) -> None:
    codes = _requests(fuzz_daemon.address, DAEMON_METHODS, calls, fuzz_daemon.namespace)
    assert not [c for c in codes if c[1] == "internal"], codes
    _alive(fuzz_daemon)


def test_daemon_memory_stays_bounded_after_fuzzing(fuzz_daemon: Daemon) -> None:
    # Runs after the fuzz tests of this module (pytest keeps file order).
    big = _frame(msgpack.packb([2, 1, "version", {"x": "y" * 1000}, {}]))
    for _ in range(50):
        _poke(
            fuzz_daemon.address, Connection(Role.CLIENT).send(Hello()) + HEADER.pack(3 << 30) + big
        )
    rss = psutil.Process(fuzz_daemon.pid).memory_info().rss
    assert rss < 150 << 20, f"berthd RSS {rss >> 20} MiB after fuzzing"
    _alive(fuzz_daemon)


# --- a shim ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_shim(busybox_rootfs: str) -> Iterator[StandaloneShim]:
    shim = StandaloneShim(busybox_rootfs, ["sleep", "600"])
    try:
        with shim.client() as c:
            c.call("create", {})
            c.call("start")
        yield shim
    finally:
        shim.cleanup()


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.tuples(st.integers(0, 1000), params), max_size=6))
def test_shim_survives_bytes_and_hostile_requests(
    fuzz_shim: StandaloneShim, data: bytes, calls: Any
) -> None:
    _poke(fuzz_shim.socket, data)
    _poke(fuzz_shim.socket, Connection(Role.CLIENT).send(Hello()) + data)

    def harmless(method: str, p: dict[str, Any]) -> bool:
        if method in ("kill", "delete", "wait"):
            exec_id = p.get("exec_id")
            return isinstance(exec_id, str) and exec_id != ""
        return True

    safe = [(m, p) for m, p in calls if harmless(SHIM_METHODS[m % len(SHIM_METHODS)], p)]
    codes = _requests(fuzz_shim.socket, SHIM_METHODS, safe, "x")
    assert not [c for c in codes if c[1] == "internal"], codes
    with Client(fuzz_shim.socket) as c:
        assert c.call("state")["status"] == "running"


def test_shim_memory_stays_bounded(fuzz_shim: StandaloneShim) -> None:
    for _ in range(30):
        _poke(
            fuzz_shim.socket,
            Connection(Role.CLIENT).send(Hello()) + struct.pack(">I", 3 << 30) + b"x" * 60000,
        )
    uss = psutil.Process(fuzz_shim.pid).memory_full_info().uss
    assert uss < 16 << 20, f"shim USS {uss >> 20} MiB after fuzzing"


# --- on-disk state ---------------------------------------------------------------------


@settings(
    max_examples=min(EXAMPLES, 8),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.binary(max_size=300), st.sampled_from(["shim.json", "exit/init.json", "init.pid"]))
@example(b"0", "shim.json")  # valid JSON, not an object
@example(b'{"version": 1, "pid": "1", "start_time": null}', "shim.json")
@example(b"[]", "exit/init.json")
@example(b"-1", "init.pid")
@example(b'{"version": 1, "pid": -1, "start_time": null}', "shim.json")  # never kill(-1)
def test_corrupt_state_files_are_reported_and_skipped(data: bytes, name: str) -> None:
    d = Daemon()
    try:
        d.cli("run", "--busybox", "-d", "victim", "sleep", "600", check=True)
        d.cli("run", "--busybox", "-d", "bystander", "sleep", "600", check=True)
        d.kill9()
        target = Path(d.state, "tasks", d.namespace, "victim", name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        d.start()
        tasks = {t["id"]: t for t in d.call("tasks.list")["tasks"]}
        assert tasks["bystander"]["status"] == "running"  # the rest is unaffected
        if "victim" in tasks:  # skipped when shim.json is unreadable, else still managed
            assert tasks["victim"]["status"] in ("running", "stopped")
        wait_until(lambda: d.call("version")["protocol"] == 1)
    finally:
        d.cleanup()


def test_a_state_file_never_makes_berthd_signal_an_unrelated_process() -> None:
    """A shim.json whose pid names some other process, with no start time to prove its
    identity, and whose shim cannot be reached: berthd must skip it, not kill that pid."""
    d = Daemon()
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        d.cli("run", "--busybox", "-d", "victim", "sleep", "600", check=True)
        d.kill9()
        path = Path(d.state, "tasks", d.namespace, "victim", "shim.json")
        record = json.loads(path.read_text())
        record.update(pid=bystander.pid, start_time=0, address=str(Path(d.dir, "nowhere.sock")))
        path.write_text(json.dumps(record))
        d.start()

        def restarted_log() -> str:
            return Path(d.logs[-1]).read_text(errors="replace")

        wait_until(lambda: "recovered" in restarted_log(), what="the recovery to finish")
        # Skipped, or its real shim found at the task's socket (the record written
        # again): never the pid the record names signalled.
        log_text = restarted_log()
        assert "skipping" in log_text or "record written again" in log_text
        assert "killing it" not in log_text
        assert d.call("version")["protocol"] == 1
        assert bystander.poll() is None, "berthd killed a process it does not own"
    finally:
        kill(bystander.pid)
        bystander.wait()
        d.cleanup()
