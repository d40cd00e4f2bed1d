"""UNIX socket helpers: path-based sockets (never abstract), long paths, peer credentials.

sun_path holds 107 usable bytes. Deep state dirs (a test's temp dir, say) can exceed that,
so a long path is reached through an O_PATH descriptor of its directory, as
`/proc/self/fd/<n>/<name>` (conmon's trick). Abstract sockets are never used: any process
in the host network namespace can reach them (CVE-2020-15257).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator

SUN_PATH_MAX = 107
_UCRED = struct.Struct("3i")


@contextlib.contextmanager
def short_path(path: str) -> Iterator[str]:
    """Yield a path to `path` that fits in sun_path, valid while the context is open."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        alias = f"/proc/self/fd/{dirfd}/{name}"
        if len(os.fsencode(alias)) > SUN_PATH_MAX:
            raise OSError(f"socket name too long: {name!r}")
        yield alias
    finally:
        os.close(dirfd)


def bind_unix(path: str, *, mode: int = 0o600, backlog: int = 128) -> socket.socket:
    """Bind and listen on a fresh path-based stream socket with `mode` (set before listen).

    A stale socket file at `path` is removed first; any other kind of file is an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            with short_path(path) as addr:
                sock.bind(addr)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_unix(path: str, timeout: float | None = None) -> socket.socket:
    """A blocking client connection to `path` (with `timeout` for connect only).

    Kernel fact: a UNIX socket's connect() with a timeout (a non-blocking socket) fails
    with EAGAIN, rather than waiting, when the listener's backlog is full (a daemon busy
    taking over, say): that is retried until the timeout, as a blocking connect waits."""
    import time

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with short_path(path) as addr:
            while True:
                try:
                    sock.connect(addr)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{path}: backlog full for {timeout}s") from None
                    time.sleep(0.002)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from SO_PEERCRED (set by the kernel at connect)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
