"""containerd's own Go client as a test client: `tests/support/goclient/main.go`, a probe
built from Debian's golang-github-containerd-containerd-dev (GOPATH mode, Go from
golang-go; both installed by scripts/setup) into build/, once per source version."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.daemon.tasks.rootfs import build_busybox_rootfs
from tests.support.clients import grpc_address, grpc_daemon
from tests.support.helpers import Daemon

SOURCE = Path(__file__).parent / "goclient"  # main.go and flows_*.go: one package
GOPATH = "/usr/share/gocode"
BUILD = Path(__file__).resolve().parents[2] / "build" / "goclient"


def probe() -> str:
    """The probe's path, built if need be; the test fails (not skips) without Go."""
    if (
        shutil.which("go") is None
        or not Path(GOPATH, "src/github.com/containerd/containerd").is_dir()
    ):
        pytest.fail("needs golang-go and golang-github-containerd-containerd-dev (scripts/setup)")
    digest = hashlib.sha256()
    for source in sorted(SOURCE.glob("*.go")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    binary = BUILD / f"goclient-{digest.hexdigest()[:16]}"
    if not binary.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": GOPATH,
            "GOCACHE": str(BUILD / "cache"),
            "GOFLAGS": "",
        }
        partial = binary.with_suffix(".partial")
        subprocess.run(
            ["go", "build", "-o", str(partial), "."],
            cwd=SOURCE,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        partial.rename(binary)
    return str(binary)


def run(
    address: str, namespace: str, rootfs: str, flow: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One flow; `env` adds what it needs beyond its arguments (GOCLIENT_*). Its FIFOs go
    to a directory of its own, removed afterwards (the client's default is containerd's
    /run/containerd/fifo)."""
    fifo_dir = tempfile.mkdtemp(prefix="bt-fifo-", dir="/tmp")
    try:
        return subprocess.run(
            [probe(), address, namespace, rootfs, flow],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "GOCLIENT_FIFO_DIR": fifo_dir, **(env or {})},
        )
    finally:
        shutil.rmtree(fifo_dir, ignore_errors=True)


@contextlib.contextmanager
def served() -> Iterator[tuple[Daemon, str]]:
    """A berthd with berth-grpc and a busybox rootfs, the probe built first (a first build
    takes a while, and must not count against a daemon's start)."""
    probe()
    daemon = grpc_daemon()
    try:
        yield daemon, build_busybox_rootfs(os.path.join(daemon.dir, "rootfs"))
    finally:
        daemon.cleanup()


def flow(served: tuple[Daemon, str], name: str) -> str:
    """Run one flow against `served`; its output, once it said ok."""
    daemon, rootfs = served
    result = run(grpc_address(daemon), daemon.namespace, rootfs, name)
    assert result.returncode == 0 and result.stdout.endswith("ok\n"), result.stdout + result.stderr
    return result.stdout
