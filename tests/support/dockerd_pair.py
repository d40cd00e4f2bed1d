"""Two Docker Engines side by side for differential tests: one dockerd 20.10 on a private
containerd 1.6 (with its task plugins), one on berth (berth-grpc), the same busybox image
loaded into both; the same docker command is run on each and the answers compared.

The containerd runs in a mount namespace of its own (tests/support/containerd.py: a private
/run); its dockerd runs in that same namespace (nsenter -m), so the rootfs dockerd mounts is
the one containerd's runc sees, and every mount of either goes with the namespace. Each
dockerd has its own data root, exec root, pid file, socket and cgroup parent; the
containerd side's cgroups are removed at the end, berth's with its daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.support.clients import DOCKER, DockerBackend, Dockerd, grpc_daemon
from tests.support.containerd import Containerd
from tests.support.helpers import Daemon

IMAGE = "busybox:pair"
SIDES = ("containerd", "berth")


@dataclass(frozen=True)
class Answer:
    """One docker command's answer, normalised (ids, times, pids)."""

    code: int
    out: str
    err: str


_ID64 = re.compile(r"\b[0-9a-f]{64}\b")
_ID12 = re.compile(r"\b[0-9a-f]{12}\b")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
_AGO = re.compile(r"(About (a|an) \w+|Less than a second|\d+ \w+) ago")
_UP = re.compile(r"\bUp (About (a|an) \w+|Less than a second|\d+ \w+)")
_TMPDIR = re.compile(r"/tmp/bt-[A-Za-z0-9_-]+")
# The CLI's own race between its wait and a failed start (either side, at random).
_CLI_NOISE = re.compile(r'^time="[^"]*" level=error msg="error waiting for container: .*\n', re.M)


def normalise(text: str) -> str:
    text = _CLI_NOISE.sub("", text)
    text = _ID64.sub("<ID>", text)
    text = _ID12.sub("<ID12>", text)
    text = _TIME.sub("<TIME>", text)
    text = _AGO.sub("<AGO>", text)
    text = _UP.sub("Up <AGE>", text)
    return _TMPDIR.sub("<DIR>", text)


class Pair:
    """dockerd on containerd and dockerd on berth; `both(...)` runs a command on each."""

    def __init__(self, containerd: Containerd, berth: Daemon, engines: dict[str, Dockerd]):
        self.containerd = containerd
        self.berth = berth
        self.engines = engines
        self._pool = ThreadPoolExecutor(max_workers=2)

    def docker(
        self, side: str, *args: str, input: str | bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        engine = self.engines[side]
        try:
            return subprocess.run(
                [DOCKER, "-H", f"unix://{engine.host}", *args],
                input=input.encode() if isinstance(input, str) else input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=dict(os.environ, DOCKER_CONFIG=os.path.join(engine.dir, "cli")),
            )
        except subprocess.TimeoutExpired:
            engine.dump_stacks()
            raise

    def popen(self, side: str, *args: str) -> subprocess.Popen[bytes]:
        """A docker command left running, its output discarded, its errors kept."""
        engine = self.engines[side]
        return subprocess.Popen(
            [DOCKER, "-H", f"unix://{engine.host}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, DOCKER_CONFIG=os.path.join(engine.dir, "cli")),
        )

    def raw(
        self, *args: str, input: str | bytes | None = None, timeout: float = 60
    ) -> dict[str, subprocess.CompletedProcess[bytes]]:
        """The same command on both engines at once."""
        futures = {
            side: self._pool.submit(self.docker, side, *args, input=input, timeout=timeout)
            for side in SIDES
        }
        return {side: f.result() for side, f in futures.items()}

    def both(
        self, *args: str, input: str | bytes | None = None, timeout: float = 60
    ) -> dict[str, Answer]:
        return {
            side: Answer(
                r.returncode,
                normalise(r.stdout.decode(errors="replace")),
                normalise(r.stderr.decode(errors="replace")),
            )
            for side, r in self.raw(*args, input=input, timeout=timeout).items()
        }

    def ok(self, *args: str, timeout: float = 60) -> dict[str, str]:
        answers = self.raw(*args, timeout=timeout)
        for side, r in answers.items():
            assert r.returncode == 0, f"{side}: docker {args} -> {r.returncode}: {r.stderr!r}"
        return {side: r.stdout.decode(errors="replace") for side, r in answers.items()}

    def state(self, name: str) -> dict[str, dict[str, object]]:
        """docker inspect's State of `name` on each side, Pid as Pid>0 and times dropped."""
        out = {}
        for side, text in self.ok("inspect", "-f", "{{json .State}}", name).items():
            state = json.loads(text)
            state["Pid"] = state["Pid"] > 0
            for key in ("StartedAt", "FinishedAt", "Health"):
                state.pop(key, None)
            out[side] = state
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _remove_cgroups(parent: str) -> None:
    for group in Path("/sys/fs/cgroup").glob(f"*{parent}"):
        for sub in sorted(group.glob("**/"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                sub.rmdir()


@contextlib.contextmanager
def dockerd_pair() -> Iterator[Pair]:
    """Both engines, the image loaded into each; everything stopped (by pid) and removed
    afterwards, even on failure."""
    from berth.daemon.tasks.rootfs import build_busybox_rootfs
    from tests.support.images import build_docker_archive

    work = tempfile.mkdtemp(prefix="bt-pair-", dir="/tmp")
    cgroup_parent = f"/bt-pair-{uuid.uuid4().hex[:10]}"
    engines: dict[str, Dockerd] = {}
    containerd: Containerd | None = None
    berth: Daemon | None = None
    pair: Pair | None = None
    try:
        rootfs = build_busybox_rootfs(os.path.join(work, "rootfs"))
        archive = os.path.join(work, "busybox.tar")
        build_docker_archive(rootfs, archive, tag=IMAGE)
        containerd = Containerd(tasks=True)
        berth = grpc_daemon()
        engines["containerd"] = Dockerd(
            None,
            backend=DockerBackend(
                address=containerd.address,
                namespace="moby",
                base_dir=containerd.dir,
                cgroup_parent=cgroup_parent,
                prefix=("nsenter", "-t", str(containerd.pid), "-m", "--"),
            ),
        )
        engines["berth"] = Dockerd(berth)
        pair = Pair(containerd, berth, engines)
        pair.ok("load", "-i", archive, timeout=120)
        yield pair
    finally:
        if pair is not None:
            pair.close()
        for engine in engines.values():
            engine.cleanup()
        if containerd is not None:
            containerd.cleanup()
        if berth is not None:
            berth.cleanup()
        _remove_cgroups(cgroup_parent)
        shutil.rmtree(work, ignore_errors=True)
