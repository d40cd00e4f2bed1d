"""Directory trees of any depth: remove, measure and walk them without recursion.

A container (or a hostile image layer) decides the shape of the trees berth later removes
and measures: a process inside a container can make a directory 10,000 levels deep in its
writable layer. `shutil.rmtree` and `os.walk` recurse on Python 3.11 (RecursionError at
~1,000 levels) and build absolute paths (ENAMETOOLONG past PATH_MAX, 4096 bytes); either
failure left snapshot directories behind that a later start-up cleanup tripped over.

The walkers here hold one directory fd at a time, move down with openat(name, O_NOFOLLOW)
and back up with openat(".."), and check each step up against the (st_dev, st_ino) they
recorded on the way down, so a directory moved during the walk is an error, never a jump
to somewhere else. Symlinks are never followed; another filesystem mounted inside the tree
is never entered (removing a tree must not delete what a mount shows).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from dataclasses import dataclass, field

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeChanged(OSError):
    """The tree changed under the walk (a directory moved away)."""


class MountPointInTheWay(OSError):
    """A directory inside the tree is a mount point."""


def mount_id(fd: int) -> int:
    """The id of the mount `fd` lies on (/proc/self/fdinfo, Linux >= 3.15): unlike
    st_dev it also tells a bind mount of the same filesystem apart."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOSYS, "no mnt_id in /proc/self/fdinfo")


# Names listed at a time when a tree is removed (the rest are listed again once these are
# gone), and fewer below the first levels: memory stays bounded by the depth, not by the
# width, of what a container made (one directory of millions of entries cost ~70 bytes
# an entry listed whole).
REMOVE_BATCH = 1024
REMOVE_BATCH_DEEP = 16
REMOVE_BATCH_LEVELS = 8  # levels that list REMOVE_BATCH names at a time


@dataclass(slots=True)
class _Level:
    name: str  # this directory's name in its parent ("" for the top)
    dev: int
    ino: int
    pending: list[str] = field(default_factory=list)  # names not visited yet (reversed)
    more: bool = False  # listed in part: list again when `pending` runs out


class _Walk:
    """A cursor over a tree: one open directory fd and the stack of levels above it. Each
    level keeps its name, not its path (paths would cost the square of the depth)."""

    def __init__(self, fd: int, *, batched: bool = False) -> None:
        self.fd = fd  # owned from here on
        self.batched = batched  # list in batches, for a walk that removes what it visits
        st = os.fstat(fd)
        self.mount = mount_id(fd)
        self.levels = [_Level("", st.st_dev, st.st_ino)]
        self._list(self.levels[0])

    def _list(self, level: _Level) -> None:
        if not self.batched:
            names = os.listdir(self.fd)
        else:
            limit = REMOVE_BATCH if len(self.levels) <= REMOVE_BATCH_LEVELS else REMOVE_BATCH_DEEP
            # scandir on an fd reads a duplicate of it and rewinds it when closed, so the
            # next batch starts from the top again (what was removed is gone from it).
            with os.scandir(self.fd) as entries:
                names = [entry.name for entry in itertools.islice(entries, limit)]
            level.more = len(names) == limit
        names.reverse()  # pop() from the end visits them in directory order
        level.pending = names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def rel(self, name: str) -> str:
        return "/".join([level.name for level in self.levels[1:]] + [name])

    def descend(self, name: str) -> bool:
        """Enter subdirectory `name` of the current one; False when it is no directory
        any more (replaced meanwhile); MountPointInTheWay when something is mounted on it."""
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                return False
            raise
        try:
            st = os.fstat(child)
            if mount_id(child) != self.mount:
                raise MountPointInTheWay(errno.EBUSY, f"mount point in the tree: {self.rel(name)}")
        except BaseException:
            os.close(child)
            raise
        os.close(self.fd)
        self.fd = child
        level = _Level(name, st.st_dev, st.st_ino)
        self.levels.append(level)
        self._list(level)
        return True

    def ascend(self) -> str:
        """Go back to the parent directory; return the name of the one left."""
        left = self.levels.pop()
        parent = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        expected = self.levels[-1]
        if (st.st_dev, st.st_ino) != (expected.dev, expected.ino):
            os.close(parent)
            raise TreeChanged(errno.ESTALE, f"directory moved during the walk: {left.name}")
        os.close(self.fd)
        self.fd = parent
        return left.name

    def next_entry(self) -> tuple[str, os.stat_result] | None:
        """The next unvisited entry of the current directory (None when it has none
        left); entries that vanished meanwhile are skipped."""
        level = self.levels[-1]
        while True:
            while level.pending:
                name = level.pending.pop()
                try:
                    return name, os.stat(name, dir_fd=self.fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
            if not level.more:
                return None
            self._list(level)


def _open_dir(path: str, dir_fd: int | None) -> int:
    return os.open(path, _DIR_FLAGS, dir_fd=dir_fd)


def tree_usage(top: str) -> tuple[int, int]:
    """(bytes allocated, inodes) of everything below `top`, at any depth. Mount points
    inside the tree are counted but not entered."""
    size = inodes = 0
    walk = _Walk(_open_dir(top, None))
    try:
        while True:
            entry = walk.next_entry()
            if entry is None:
                if len(walk.levels) == 1:
                    return size, inodes
                walk.ascend()
                continue
            name, st = entry
            size += st.st_blocks * 512
            inodes += 1
            if stat.S_ISDIR(st.st_mode):
                try:
                    walk.descend(name)
                except MountPointInTheWay:
                    pass
    finally:
        walk.close()


def remove_tree(path: str, *, dir_fd: int | None = None) -> None:
    """Remove `path` and everything below it, at any depth; a missing `path` is fine.

    Never follows a symlink (a symlink is removed, not its target) and never enters a
    mount inside the tree: a mount point there fails the removal (MountPointInTheWay,
    EBUSY) instead of deleting what the mount shows. Other errors propagate (OSError)."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(path, dir_fd)
        return
    walk = _Walk(_open_dir(path, dir_fd), batched=True)
    try:
        while True:
            entry = walk.next_entry()
            if entry is None:
                if len(walk.levels) == 1:
                    break
                name = walk.ascend()
                os.rmdir(name, dir_fd=walk.fd)
                continue
            name, st = entry
            if not stat.S_ISDIR(st.st_mode):
                _unlink(name, walk.fd)
            elif not walk.descend(name):
                walk.levels[-1].pending.append(name)  # replaced meanwhile: look again
    finally:
        walk.close()
    try:
        os.rmdir(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _unlink(name: str, dir_fd: int | None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class NotRegularFile(OSError):
    """A file that must be regular is a FIFO, a device, a socket or a directory."""


def open_regular(path: str, *, dir_fd: int, resolve: int) -> int | None:
    """Open a file that a container or an image controls, for reading, without ever
    blocking: None when it does not exist, NotRegularFile unless it is a regular file.

    Resolved with openat2(`resolve`) relative to `dir_fd` (RESOLVE_IN_ROOT keeps "/", ".."
    and symlinks inside it) as an O_PATH fd first, which opens nothing: a FIFO would block
    open(2) until a writer came (an image whose /etc/passwd is a FIFO hung a worker thread
    for ever), and opening a device can act on the device. Only a regular file is then
    reopened for reading, through the O_PATH fd, so it is the same inode that was checked."""
    from berth.native import openat2  # the cffi module: only where it is needed

    try:
        fd = openat2(dir_fd, path, os.O_PATH | os.O_CLOEXEC, resolve)
    except FileNotFoundError:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"{path} is not a regular file")
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace `path` with `data` durably: written to `path.tmp`, fsynced, renamed over
    `path`, and the directory fsynced. After any crash a reader sees the old file or the
    whole new one, never a part. With `durable=False`, no fsync: still all or nothing for
    any process that crashes, but a machine that loses power may lose the file (for what
    a machine crash makes worthless anyway, such as a bundle whose container died with it).

    `path.tmp` may already exist, preallocated by `reserve()`: it is overwritten in place
    (no O_TRUNC), so a reserved write needs no free space (an exit status must reach the
    disk even when the disk is full)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fchmod(fd, mode)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def reserve(path: str, size: int = 4096, mode: int = 0o600) -> None:
    """Preallocate `size` bytes for a later `atomic_write(path, ...)` of at most that size.

    No fsync: the space is the file's from the fallocate on, for as long as the machine
    runs, which is as long as the process it is reserved for can run; the write that
    later fills it is fsynced (with its directory) before anyone hears of it. The fsync
    here cost ~0.25 ms (ext4) on every create and exec, before its answer."""
    fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
