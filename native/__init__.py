"""Kernel interfaces the standard library lacks, bound with cffi (API mode).

Only what berth needs and the stdlib does not offer: signalfd(2) with its siginfo record,
tee(2), mount(2)/umount2(2), openat2(2), and the shim's relay threads (C threads that
never take the GIL). pidfd_open, waitid(P_PIDFD), pthread_sigmask, splice and SCM_RIGHTS
are in the stdlib already and are used from there.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

from berth.native._sys import ffi, lib

SIGINFO_SIZE = ffi.sizeof("struct signalfd_siginfo")  # 128 on every Linux ABI


@dataclass(frozen=True, slots=True)
class SigInfo:
    """One record read from a signalfd. For SIGCHLD, `pid`/`status` name *a* child that
    changed state; SIGCHLDs coalesce, so a reaper must still loop on waitpid(WNOHANG)."""

    signo: int
    code: int
    pid: int
    uid: int
    status: int


class SignalFD:
    """A non-blocking, close-on-exec signalfd for `signals`.

    The caller must have blocked those signals with `signal.pthread_sigmask` *before any
    thread exists*: a thread that still has them unblocked receives them instead, and the
    signalfd stays silent (measured: most SIGCHLDs were lost with one early thread).
    """

    def __init__(self, signals: Iterable[int]) -> None:
        mask = ffi.new("sigset_t *")
        lib.sigemptyset(mask)
        for signo in signals:
            if lib.sigaddset(mask, int(signo)) != 0:
                raise ValueError(f"invalid signal number {signo}")
        fd = lib.signalfd(-1, mask, lib.SFD_CLOEXEC | lib.SFD_NONBLOCK)
        if fd < 0:
            err = ffi.errno
            raise OSError(err, f"signalfd: {os.strerror(err)}")
        self._fd: int = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("signalfd is closed")
        return self._fd

    def read(self, max_records: int = 64) -> list[SigInfo]:
        """Drain up to `max_records` pending records; an empty list when none are pending."""
        try:
            data = os.read(self.fileno(), SIGINFO_SIZE * max_records)
        except BlockingIOError:
            return []
        records = []
        for offset in range(0, len(data) - SIGINFO_SIZE + 1, SIGINFO_SIZE):
            raw = ffi.from_buffer("struct signalfd_siginfo *", data[offset : offset + SIGINFO_SIZE])
            records.append(
                SigInfo(
                    signo=raw.ssi_signo,
                    code=raw.ssi_code,
                    pid=raw.ssi_pid,
                    uid=raw.ssi_uid,
                    status=raw.ssi_status,
                )
            )
        return records

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SignalFD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tee(fd_in: int, fd_out: int, length: int, nonblock: bool = True) -> int:
    """tee(2): duplicate up to `length` bytes from pipe `fd_in` into pipe `fd_out` without
    consuming them. Raises BlockingIOError when either side would block."""
    flags = lib.SPLICE_F_NONBLOCK if nonblock else 0
    n = lib.tee(fd_in, fd_out, length, flags)
    if n < 0:
        err = ffi.errno
        if err == errno.EAGAIN:
            raise BlockingIOError(err, os.strerror(err))
        raise OSError(err, f"tee: {os.strerror(err)}")
    return int(n)


# mount(2) flags and openat2(2) resolve flags, as the kernel headers define them.
MS_RDONLY: int = lib.MS_RDONLY
MS_NOSUID: int = lib.MS_NOSUID
MS_NODEV: int = lib.MS_NODEV
MS_NOEXEC: int = lib.MS_NOEXEC
MS_REMOUNT: int = lib.MS_REMOUNT
MS_BIND: int = lib.MS_BIND
MS_REC: int = lib.MS_REC
MS_PRIVATE: int = lib.MS_PRIVATE
MS_SLAVE: int = lib.MS_SLAVE
MS_NOATIME: int = lib.MS_NOATIME
MS_RELATIME: int = lib.MS_RELATIME
MS_STRICTATIME: int = lib.MS_STRICTATIME
MNT_DETACH: int = lib.MNT_DETACH
RESOLVE_NO_XDEV: int = lib.RESOLVE_NO_XDEV
RESOLVE_NO_MAGICLINKS: int = lib.RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS: int = lib.RESOLVE_NO_SYMLINKS
RESOLVE_BENEATH: int = lib.RESOLVE_BENEATH
RESOLVE_IN_ROOT: int = lib.RESOLVE_IN_ROOT


def _check(rc: int, what: str, path: str) -> None:
    if rc < 0:
        err = ffi.errno
        raise OSError(err, f"{what} {path}: {os.strerror(err)}", path)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2). `data` is the comma-separated option string (at most a page)."""
    rc = lib.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode() if fstype else ffi.NULL,
        flags,
        data.encode() if data else ffi.NULL,
    )
    _check(rc, "mount", target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(lib.umount2(os.fsencode(target), flags), "umount", target)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dirfd` under the `resolve` rules; with
    RESOLVE_IN_ROOT every "/" and ".." and every symlink is resolved inside `dirfd`,
    which is what confines a layer's writes to its root (enforced by the kernel)."""
    # fsencode: a layer's names are bytes in no encoding ("caf\xe9" is surrogate-escaped)
    fd = lib.berth_openat2(dirfd, os.fsencode(path), flags, mode, resolve)
    _check(fd, "openat2", path)
    return int(fd)


def start_relay(source: int, target: int) -> None:
    """Copy `source` to `target` in a detached C thread until the source ends or the
    target's reader is gone; the thread then closes both. The fds must be blocking.
    OSError (and the fds still the caller's) if no thread can be had."""
    err = lib.berth_relay_start(source, target)
    if err != 0:
        raise OSError(err, f"relay thread: {os.strerror(err)}")


RELAY_CHUNK: int = lib.BERTH_RELAY_CHUNK


def malloc_trim() -> bool:
    """malloc_trim(3): give the free pages of every glibc malloc arena back to the kernel.

    glibc keeps freed memory for reuse: the top of a heap above M_TRIM_THRESHOLD only, and
    after a large block allocated by mmap is freed, it raises its mmap threshold so the next
    ones come from the heap too. A daemon that moved megabytes through once (an image
    import) keeps them resident for good without this. True if memory was released."""
    return bool(lib.malloc_trim(0))


__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "RELAY_CHUNK",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "SIGINFO_SIZE",
    "SigInfo",
    "SignalFD",
    "malloc_trim",
    "mount",
    "openat2",
    "start_relay",
    "tee",
    "umount",
]
