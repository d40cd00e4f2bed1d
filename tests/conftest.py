"""Fixtures: real daemons, real runc/crun, a busybox rootfs; no mock runtime anywhere."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from berth.daemon.tasks.rootfs import build_busybox_rootfs
from tests.support.helpers import Daemon, hybrid_crun_fix_needed

# Every daemon a test starts checks each reply against the API contract (api/schema.py).
os.environ["BERTH_CHECK_REPLIES"] = "1"


def _require_root_and_runc() -> None:
    if os.geteuid() != 0:
        pytest.fail("berth's container tests need root (see README: scripts/test)")
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed (scripts/setup installs it)")


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
