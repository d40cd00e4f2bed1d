"""Fuzzing the daemon's and a shim's sockets, and the on-disk state a restart reads.

The processes must never die, must answer every request with a typed error or a result
(never `internal`, which would mean an unhandled bug) or close that one connection, and
must keep their memory bounded. Example counts are bounded for CI; set
BERTH_FUZZ_EXAMPLES for a longer run.
"""

from __future__ import annotations

import hashlib
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
from tests.support.edges import HOSTILE, LABEL_KEYS, TIMES
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

hostile_text = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE))
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


# Methods whose params follow berthd's schema, fuzzed field by field: values of each
# field's declared type within its declared bounds, at their edges (inf, 1e300, 2**64-1,
# far dates in containerd's label values), so a request passes validation and reaches
# the code behind it. Only methods that touch nothing outside the daemon's own root.
SCHEMA_METHODS = [
    name for name in DAEMON_METHODS if name.count(".") == 1 and not name.startswith("no.")
] + [
    "leases.add_resource",
    "leases.delete_resource",
    "leases.resources",
    "images.create",
    "images.update",
    "images.tag",
    "content.delete",
    "content.ingests",
    "snapshots.update",
    "snapshots.usage",
    "snapshots.prepare",
    "snapshots.view",
    "snapshots.commit",
    "snapshots.remove",
    "tasks.update",
    "tasks.shim_log",
]
EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 1e9, 1e10, 3e9, 1e18, 1e19, 1e300, float("inf"), float("-inf")]


# Objects made in the fuzzed namespace before the schema-guided test (seeded_daemon), and
# named by its strings often, so that requests reach an object's code, not just not_found.
BLOB = b"berth fuzz blob\n"
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
KNOWN_NAMES = ["c1", "l1", "s1", "base", "docker.io/library/fuzz:1", BLOB_DIGEST, "overlayfs"]


def _within(edges: list[Any], low: Any, high: Any) -> list[Any]:
    return [v for v in edges if (low is None or v >= low) and (high is None or v <= high)]


def from_type(t: Any, gentle: bool) -> st.SearchStrategy[Any]:
    """Values of a msgspec type (msgspec.inspect), edges first. `gentle`: strings only
    from KNOWN_NAMES, the field's own pattern and containerd's labels and times (hostile
    text in a field is mostly refused by validation, and the code behind it is never
    reached)."""
    import msgspec.inspect as mi

    def inner(member: Any) -> st.SearchStrategy[Any]:
        return from_type(member, gentle)

    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else -(2**63))
        high = t.le if t.le is not None else (t.lt - 1 if t.lt is not None else 2**64 - 1)
        edges = [*_within(EDGE_INTS, low, high), low, high]
        return st.sampled_from(edges) | st.integers(low, high)
    if isinstance(t, mi.FloatType):
        low = t.ge if t.ge is not None else t.gt
        high = t.le if t.le is not None else t.lt
        edges = _within(EDGE_FLOATS, low, high) or [0.0]
        return st.sampled_from(edges) | st.floats(low, high, allow_nan=False)
    if isinstance(t, mi.StrType):
        known = st.sampled_from(KNOWN_NAMES)
        own = st.from_regex(t.pattern, fullmatch=True) if t.pattern else known
        labels = st.sampled_from(TIMES + LABEL_KEYS)
        return known | own | (labels if gentle else hostile_text)
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=64)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values))
    if isinstance(t, mi.DictType):
        keys = st.sampled_from(LABEL_KEYS) | inner(t.key_type)
        return st.dictionaries(keys, inner(t.value_type), max_size=4)
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return st.lists(inner(t.item_type), max_size=4)
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not (gentle and isinstance(m, mi.NoneType))]
        return st.one_of([inner(member) for member in members or t.types])
    if isinstance(t, mi.StructType):
        return st.fixed_dictionaries(
            {f.encode_name: inner(f.type) for f in t.fields if f.required},
            optional={f.encode_name: inner(f.type) for f in t.fields if not f.required},
        )
    if gentle:  # Any: a small dict of containerd's labels and times
        return st.dictionaries(st.sampled_from(LABEL_KEYS), st.sampled_from(TIMES))
    return values


def schema_params(method: str, gentle: bool) -> st.SearchStrategy[dict[str, Any]]:
    import msgspec.inspect as mi

    from berth.daemon.api.schema import METHODS

    return from_type(mi.type_info(METHODS[method].params), gentle)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def seeded_daemon(fuzz_daemon: Daemon) -> Daemon:
    """fuzz_daemon with one of each object the schema-guided requests name (KNOWN_NAMES):
    a blob, an image of it, a lease, a committed and an active snapshot, a container."""
    fuzz_daemon.cli("content", "ingest", "fuzz-blob", input=BLOB, check=True)
    fuzz_daemon.call(
        "images.create",
        {
            "name": "docker.io/library/fuzz:1",
            "target": {
                "media_type": "application/vnd.oci.image.manifest.v1+json",
                "digest": BLOB_DIGEST,
                "size": len(BLOB),
            },
        },
    )
    fuzz_daemon.call("leases.create", {"id": "l1"})
    fuzz_daemon.call("snapshots.prepare", {"key": "base-active"})
    fuzz_daemon.call("snapshots.commit", {"key": "base-active", "name": "base"})
    fuzz_daemon.call("snapshots.prepare", {"key": "s1", "parent": "base"})
    from berth.daemon.oci import default_spec

    spec = default_spec("c1", fuzz_daemon.namespace, ["sleep", "1"])
    fuzz_daemon.call("containers.create", {"id": "c1", "spec": spec})
    return fuzz_daemon


@FUZZ
@given(st.data())
def test_daemon_answers_typed_params_with_typed_errors(seeded_daemon: Daemon, data: Any) -> None:
    """Requests that pass validation: what is behind it must fail typed, never `internal`
    (an int too large for SQLite, a float that is not finite, a date beyond int64 ns)."""
    fuzz_daemon = seeded_daemon
    calls = []
    for _ in range(data.draw(st.integers(1, 6))):
        method = data.draw(st.sampled_from(SCHEMA_METHODS))
        gentle = data.draw(st.booleans())
        calls.append((SCHEMA_METHODS.index(method), data.draw(schema_params(method, gentle))))
    codes = _requests(fuzz_daemon.address, SCHEMA_METHODS, calls, fuzz_daemon.namespace)
    assert not [c for c in codes if c[1] == "internal"], (calls, codes)
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
