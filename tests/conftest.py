"""Fixtures: real daemons, real runc/crun, a busybox rootfs; no mock runtime anywhere.

Every test that needs root and an OCI runtime is marked `container` here, automatically:
it uses one of the fixtures that start daemons, shims or engines, or its module starts
them itself (it holds the Daemon helper or declares `pytestmark = container`). Without
root those are skipped, so `pytest -m "not container"` runs the rest as any user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.daemon.tasks.rootfs import build_busybox_rootfs
from tests.support.helpers import Daemon, hybrid_crun_fix_needed
from tests.support.registry import Registry

# Every daemon a test starts checks each reply against the API contract (api/schema.py).
os.environ["BERTH_CHECK_REPLIES"] = "1"

# Every process this session starts inherits this mark (a daemon's shims, standbys and
# front ends too): what is still running with it at the end was left behind by a test.
SESSION_MARK = "BERTH_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex
_left_behind: list[str] = []


def _marked_processes() -> dict[int, str]:
    """pid -> command line of every live process carrying this session's mark."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone, or not ours to read
        if command:  # a zombie has none: its parent reaps it
            found[int(entry)] = command
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop, by pid, whatever a test left running (and say so in the summary): the next
    run and the machine must not inherit it."""
    for _ in range(5):
        leftovers = _marked_processes()
        if not leftovers:
            return
        for pid, command in leftovers.items():
            _left_behind.append(f"{pid}: {command}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _left_behind:
        terminalreporter.write_sep("!", "processes the tests left running (now killed)")
        for line in dict.fromkeys(_left_behind):
            terminalreporter.write_line(line)


CONTAINER_FIXTURES = frozenset(
    {"daemon", "crun_daemon", "make_shim", "fuzz_daemon", "fuzz_shim", "wire", "ctr", "engine"}
    | {"image_files", "big_image", "world"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        starts_daemons = module is not None and any(
            value is Daemon for value in vars(module).values()
        )
        if starts_daemons or CONTAINER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.container)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("container") is not None and os.geteuid() != 0:
        pytest.skip("needs root and an OCI runtime (scripts/test runs it as root)")


LOG_TAIL_LINES = 120
STACK_LINES = 1500


def _log_holders(value: Any) -> Iterator[Any]:
    """The daemons (berthd, dockerd, ...) a fixture value holds: anything with `logs`."""
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(getattr(item, "logs", None), list):
            yield item


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the tail of every log its daemons wrote (berthd's
    stream includes berth-grpc's), since a CI machine keeps nothing else."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    paths: list[str] = []
    for value in getattr(item, "funcargs", {}).values():
        for holder in _log_holders(value):
            paths.extend(holder.logs)
            directory = getattr(holder, "dir", None)
            if isinstance(directory, str):
                paths.extend(sorted(glob.glob(os.path.join(directory, "*.log"))))
                # dockerd's goroutines, if a hung command asked for them (SIGUSR1)
                stacks = os.path.join(directory, "**", "goroutine-stacks-*.log")
                paths.extend(sorted(glob.glob(stacks, recursive=True)))
    for path in dict.fromkeys(paths):
        keep = STACK_LINES if "goroutine-stacks-" in path else LOG_TAIL_LINES
        try:
            with open(path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()[-keep:]
        except OSError:
            continue
        report.sections.append((f"log tail: {path}", "\n".join(lines)))


def _require_root_and_runc() -> None:
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed (scripts/setup installs it)")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory for UNIX sockets (their paths must fit in 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bt-sock-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry() -> Iterator[Registry]:
    """A loopback docker-registry of the test's own (tests/support/registry.py)."""
    r = Registry()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="session")
def busybox_rootfs() -> Iterator[str]:
    """A busybox rootfs built the way berthd builds its embedded default."""
    directory = tempfile.mkdtemp(prefix="bt-rootfs-", dir="/tmp")
    try:
        yield build_busybox_rootfs(os.path.join(directory, "rootfs"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    _require_root_and_runc()
    d = Daemon()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def crun_daemon() -> Iterator[Daemon]:
    """A daemon whose runtimes include a working crun, on this machine's hybrid layout too."""
    _require_root_and_runc()
    if shutil.which("crun") is None:
        pytest.fail("crun is not installed (scripts/setup installs it)")
    d = Daemon(private_mount_ns=hybrid_crun_fix_needed())
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def goclient_served() -> Iterator[tuple[Daemon, str]]:
    """For containerd's Go client probe (tests/support/goclient): a berthd with berth-grpc
    and a busybox rootfs, one per test module."""
    _require_root_and_runc()
    from tests.support import goclient

    with goclient.served() as daemon_and_rootfs:
        yield daemon_and_rootfs
