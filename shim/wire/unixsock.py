"""UNIX socket helpers: path-based sockets (never abstract), long paths, peer credentials.

sun_path holds 107 usable bytes. Deep state dirs (a test's temp dir, say) can exceed that,
so a long path is reached through an O_PATH descriptor of its directory, as
`/proc/self/fd/<n>/<name>` (conmon's trick). Abstract sockets are never used: any process
in the host network namespace can reach them (CVE-2020-15257).
"""

from __future__ import annotations

import _socket  # what socket.py wraps: a client needs no more (socket.py costs 2-3 ms)
import os
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the CLI pays for it
if TYPE_CHECKING:
    import socket

SUN_PATH_MAX = 107
_UCRED = struct.Struct("3i")


class short_path:  # lower case: used like the context manager function it replaced
    """`with short_path(path) as addr`: a path to `path` that fits in sun_path, valid
    while the context is open. A class, not contextlib's decorator: the CLI imports
    this module, and contextlib brings collections and functools (~1 ms)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dirfd = -1

    def __enter__(self) -> str:
        path = self.path
        if len(os.fsencode(path)) <= SUN_PATH_MAX:
            return path
        directory, name = os.path.split(path)
        self._dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        alias = f"/proc/self/fd/{self._dirfd}/{name}"
        if len(os.fsencode(alias)) > SUN_PATH_MAX:
            self.__exit__()
            raise OSError(f"socket name too long: {name!r}")
        return alias

    def __exit__(self, *exc_info: object) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1


class AddressInUse(OSError):
    """Another process serves the socket at a path this one was asked to bind."""


def bind_unix(
    path: str, *, mode: int = 0o600, backlog: int = 128, replace_live: bool = True
) -> socket.socket:
    """Bind and listen on a fresh path-based stream socket with `mode` (set before listen).

    A socket file at `path` is removed first; any other kind of file is an error. With
    `replace_live=False` it is removed only if nobody serves it (a connect is refused):
    a socket that answers is another process's, and AddressInUse is raised, nothing
    changed. The default suits a path this process owns by a lock (its state dir).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        if not replace_live and is_served(path):
            raise AddressInUse(f"address {path} is served by another process")
        try:
            if replace_live or os.lstat(path).st_ino == st.st_ino:  # not replaced meanwhile
                os.unlink(path)
        except FileNotFoundError:
            pass
    import socket

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


def is_served(path: str) -> bool:
    """Whether a process listens on the socket at `path`: a connect that is accepted, or
    queued (EAGAIN: a full backlog), means yes; a refusal or no such file means no. Any
    other failure (no permission, say) cannot prove the socket stale: yes."""
    import errno

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        probe.setblocking(False)
        with short_path(path) as addr:
            code = probe.connect_ex(addr)
    finally:
        probe.close()
    return code not in (errno.ECONNREFUSED, errno.ENOENT)


def connect_unix(path: str, timeout: float | None = None) -> _socket.socket:
    """A blocking client connection to `path` (with `timeout` for connect only).

    Kernel fact: a UNIX socket's connect() with a timeout (a non-blocking socket) fails
    with EAGAIN, rather than waiting, when the listener's backlog is full (a daemon busy
    taking over, say): that is retried until the timeout, as a blocking connect waits."""
    import time

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
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
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid
