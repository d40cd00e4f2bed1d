"""Mounts: the one plain structure snapshotters produce and a shim consumes.

A mount is `{"type", "source", "options", "target"?}`, containerd's shape. A snapshotter
describes a root filesystem as a list of them; the shim mounts the list on the bundle's
rootfs before `runc create` and unmounts it on delete. Neither knows the other.

Kernel facts that bite here:
- overlay's option string must fit in one page (4096 bytes, NUL included) with every
  lowerdir spelled out; with many layers it does not (~35 layers of 117-byte paths).
  Then the lowerdirs are written relative to their common parent (or as short links,
  `_mount_overlay`) and mount(2) is called from inside that directory. The working
  directory belongs to the whole process: the shim mounts before any of its relay threads
  exists (shim/relay.py) and goes there and back; berthd is threaded (trio's worker
  threads), so it mounts from a child process started in that directory instead.
- overlay stacks at most 500 lower layers (OVL_MAX_STACK); one more is EINVAL, refused
  here first with a clear error. The mount lists snapshotters hand out keep absolute
  paths: a client mounts them as containerd's do (relative from the common parent).
- "bind,ro" needs two calls: a bind mount ignores MS_RDONLY, a remount applies it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from berth.native import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    umount,
)
from berth.shim.wire.errors import InvalidArgument

PAGE = 4096
MAX_MOUNTS = 64
OVERLAY_MAX_STACK = 500  # the kernel's OVL_MAX_STACK (fs/overlayfs)

_FLAGS = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "bind": (MS_BIND, True),
    "rbind": (MS_BIND | MS_REC, True),
}
KNOWN_TYPES = ("bind", "rbind", "overlay", "tmpfs")


class Mount:
    __slots__ = ("options", "source", "target", "type")

    def __init__(
        self, type: str, source: str, options: list[str] | None = None, target: str = ""
    ) -> None:
        self.type = type
        self.source = source
        self.options = list(options or [])
        self.target = target

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }
        if self.target:
            out["target"] = self.target
        return out

    @classmethod
    def from_wire(cls, doc: Any) -> Mount:
        if not isinstance(doc, dict):
            raise InvalidArgument("a mount must be a map")
        kind, source = doc.get("type"), doc.get("source")
        options, target = doc.get("options") or [], doc.get("target") or ""
        if not isinstance(kind, str) or kind not in KNOWN_TYPES:
            raise InvalidArgument(f"unsupported mount type {kind!r}")
        if not isinstance(source, str) or "\0" in source:
            raise InvalidArgument("mount source must be a string")
        if not isinstance(options, list) or not all(
            isinstance(o, str) and "\0" not in o for o in options
        ):
            raise InvalidArgument("mount options must be a list of strings")
        if not isinstance(target, str) or (
            target and (os.path.isabs(target) or ".." in target.split("/"))
        ):
            raise InvalidArgument("a mount target must be a relative path without ..")
        return cls(kind, source, options, target)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mount) and self.to_wire() == other.to_wire()

    def __repr__(self) -> str:
        return f"Mount({self.type!r}, {self.source!r}, {self.options!r})"


def parse_options(options: list[str]) -> tuple[int, list[str]]:
    """(mount flags, the options left for the filesystem's data string)."""
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            bit, on = _FLAGS[option]
            flags = flags | bit if on else flags & ~bit
        else:
            data.append(option)
    return flags, data


def _with_lower(data: list[str], dirs: list[str]) -> str:
    return ",".join(f"lowerdir={':'.join(dirs)}" if d.startswith("lowerdir=") else d for d in data)


def _mount_overlay(m: Mount, target: str, flags: int, data: list[str]) -> None:
    """An overlay mount whatever its options' length (see the module docstring): as
    given; else with lowerdirs relative to their common parent; else (many-digit snapshot
    ids, lowerdirs without a common parent) through a directory of links named 0, 1, ...
    beside the target. overlay follows a link given as a lowerdir and holds the layer
    once mounted, so the links go at once."""
    _check_stack(data)
    text = ",".join(data)
    if len(text) < PAGE:
        mount(m.source, target, "overlay", flags, text)
        return
    lower = next((d for d in data if d.startswith("lowerdir=")), "")
    dirs = lower[len("lowerdir=") :].split(":") if lower else []
    if not dirs or not all(os.path.isabs(d) for d in dirs):
        raise InvalidArgument("overlay options are longer than a page, without absolute lowerdirs")
    target = os.path.abspath(target)
    common = os.path.commonpath(dirs)
    text = _with_lower(data, [os.path.relpath(d, common) for d in dirs])
    if len(text) < PAGE:
        mount_from(common, m.source, target, flags, text)
        return
    text = _with_lower(data, [str(i) for i in range(len(dirs))])
    if len(text) >= PAGE:
        raise InvalidArgument("overlay options are longer than a page even with short lowerdirs")
    links = os.path.join(os.path.dirname(target), f".lower-{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(links, 0o700)
    try:
        for i, d in enumerate(dirs):
            os.symlink(d, os.path.join(links, str(i)))
        mount_from(links, m.source, target, flags, text)
    finally:
        for i in range(len(dirs)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(links, str(i)))
        os.rmdir(links)


def mount_one(m: Mount, target: str) -> None:
    flags, data = parse_options(m.options)
    if m.type in ("bind", "rbind"):
        flags |= MS_BIND | (MS_REC if m.type == "rbind" else 0)
    if flags & MS_BIND:
        mount(m.source, target, "", flags & ~MS_RDONLY, "")
        if flags & MS_RDONLY:
            mount("", target, "", flags | MS_REMOUNT | MS_RDONLY, "")
        return
    if m.type == "overlay":
        _mount_overlay(m, target, flags, data)
        return
    mount(m.source, target, m.type, flags, ",".join(data))


def _check_stack(data: list[str]) -> None:
    for option in data:
        if option.startswith("lowerdir="):
            layers = option.count(":") + 1
            if layers > OVERLAY_MAX_STACK:
                raise InvalidArgument(
                    f"overlay mount of {layers} lower layers: the kernel stacks at most "
                    f"{OVERLAY_MAX_STACK}"
                )


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def mount_from(directory: str, source: str, target: str, flags: int, data: str) -> None:
    """An overlay mount(2) whose relative lowerdirs resolve from `directory`: in this
    process if it has one thread (the shim, before its relays start), else from a child
    started there, since a chdir would move every thread along with it."""
    if _single_threaded():
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.chdir(directory)
            mount(source, target, "overlay", flags, data)
        finally:
            os.fchdir(cwd)
            os.close(cwd)
        return
    entry = _child_mount.__name__
    helper = f"import sys; from berth.shim.mount import {entry}; {entry}(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-I", "-c", helper, source, target, str(flags), data],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        code, _, message = done.stderr.strip().partition(" ")
        if not code.isdigit():
            raise OSError(0, f"mount {target} from {directory}: {done.stderr.strip()[-300:]}")
        raise OSError(int(code), message, target)


def _child_mount(argv: list[str]) -> None:
    """`mount_from`'s child: one mount(2) in its working directory; on failure, the
    errno and the message on stderr, exit status 1."""
    source, target, flags, data = argv
    try:
        mount(source, target, "overlay", int(flags), data)
    except OSError as exc:
        sys.stderr.write(f"{exc.errno or 0} {exc.strerror or exc}\n")
        raise SystemExit(1) from None


def mount_all(mounts: list[Mount], root: str) -> None:
    """Mount `mounts` in order on `root` (their `target`s below it); all or nothing."""
    if len(mounts) > MAX_MOUNTS:
        raise InvalidArgument(f"at most {MAX_MOUNTS} mounts")
    done: list[str] = []
    try:
        for m in mounts:
            target = os.path.join(root, m.target) if m.target else root
            mount_one(m, target)
            done.append(target)
    except BaseException:
        for target in reversed(done):
            with contextlib.suppress(OSError):
                umount(target, MNT_DETACH)
        raise


def unmount_all(root: str, depth: int = 32) -> None:
    """Unmount everything mounted on `root` (stacked mounts included)."""
    for _ in range(depth):
        try:
            umount(root, 0)
        except OSError as exc:
            if exc.errno in (22, 2):  # EINVAL: not a mount point (any more); ENOENT
                return
            umount(root, MNT_DETACH)


@contextlib.contextmanager
def temporary_mount(mounts: list[Mount], base: str) -> Iterator[str]:
    """Mount `mounts` on a fresh directory under `base`; yield it; unmount and remove it.
    A single bind mount is not mounted at all: its source is yielded (containerd's
    shortcut, and the common case of a first layer)."""
    if len(mounts) == 1 and mounts[0].type in ("bind", "rbind") and "ro" not in mounts[0].options:
        yield mounts[0].source
        return
    os.makedirs(base, mode=0o700, exist_ok=True)
    directory = os.path.join(base, f"m{os.getpid()}-{os.urandom(4).hex()}")
    os.mkdir(directory, 0o700)
    try:
        mount_all(mounts, directory)
        try:
            yield directory
        finally:
            unmount_all(directory)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def mount_points_under(directory: str) -> list[str]:
    """Mount points strictly below `directory`, deepest first (from /proc/self/mountinfo,
    whose paths escape space, tab, newline and backslash as octal)."""
    prefix = os.path.join(os.path.abspath(directory), "")
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4:
                point = _unescape(fields[4])
                if point.startswith(prefix):
                    points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def _unescape(raw: bytes) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 1 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def release_leftover_mounts(directory: str) -> int:
    """Unmount everything mounted below `directory` and empty it: what a daemon killed in
    the middle of an import or a diff left there (its temporary mounts live for ever
    otherwise, and what they hide cannot be collected). Only for a directory no live
    process uses: call it with the daemon's lock held. Returns how many were unmounted."""
    from berth.shim.fs import remove_tree

    points = mount_points_under(directory)
    for point in points:
        with contextlib.suppress(OSError):
            umount(point, MNT_DETACH)
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            remove_tree(os.path.join(directory, name))
    return len(points)
