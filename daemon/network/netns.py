"""Persistent network namespaces, one file each under a directory berth owns.

Kernel facts that bite here:
- a network namespace lives as long as a process is in it or its nsfs file is mounted
  somewhere: `unshare --net=FILE` creates one and bind-mounts it onto FILE, so it outlives
  the command (and berthd) until FILE is unmounted;
- that bind mount fails (EINVAL) when FILE's mount propagates (a `shared` mount, as / is
  under systemd): the directory is first made a private mount of its own, as `ip netns`
  does with /run/netns;
- an unmount must be lazy (MNT_DETACH): a process still entering the namespace keeps it
  busy, and the namespace itself goes once the last user leaves.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

from berth.native import mount, umount
from berth.shim.wire.errors import FailedPrecondition

MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2


def _propagation_of(path: str) -> str:
    """The optional fields (`shared:N`, `master:N`, or none) of the mount holding `path`."""
    best, fields = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left = line.split(" - ")[0].split()
            point = left[4].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                best
            ):
                best, fields = point, " ".join(left[6:])
    return fields


def prepare_dir(directory: str) -> None:
    """The directory namespaces are pinned in: created, and a private mount of its own if
    the mount it sits on propagates (see the module docstring)."""
    os.makedirs(directory, mode=0o711, exist_ok=True)
    if "shared:" in _propagation_of(directory):
        if not os.path.ismount(directory):
            mount(directory, directory, "", MS_BIND)
        mount("", directory, "", MS_PRIVATE)


def create(path: str) -> None:
    """A new network namespace pinned at `path` (which must not exist)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    done = subprocess.run(
        ["unshare", f"--net={path}", "true"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise FailedPrecondition(f"cannot create a network namespace: {done.stderr.strip()}")


def is_pinned(path: str) -> bool:
    """Whether `path` holds a namespace (the nsfs file mounted on it), not just the empty
    file a crash between the two steps of `create` leaves."""
    return os.path.ismount(path)


def remove(path: str) -> None:
    """Unpin and delete; nothing to do for what is already gone (idempotent)."""
    with contextlib.suppress(OSError):
        umount(path, MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
