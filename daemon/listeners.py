"""berthd's listening socket: from systemd, from a predecessor, or bound here.

A listening socket that is held by some process queues a client's connect() in its backlog
instead of refusing it; re-binding a path always opens a window of refusals, passing the
fd never does (upgrade-notes, kernel facts). So berthd takes its socket, in this order:
- handed over by its predecessor (an upgrade, or a standby's takeover) over SCM_RIGHTS;
- from systemd socket activation (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES, sd_listen_fds
  semantics: fds from 3; the variables are unset once read, so children never see them);
- bound by berthd itself (a stale socket file is replaced), as before.

Only a socket berthd bound itself is unlinked when it stops, and only while its path still
names that socket: a successor's or systemd's socket is never removed.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from berth.shim.wire.unixsock import bind_unix

API = "berthd"  # the name of berthd's own socket (systemd's FileDescriptorName=)
SD_LISTEN_FDS_START = 3


@dataclass
class Listener:
    sock: socket.socket
    path: str
    bound_here: bool  # berthd bound it (so it may unlink it when it stops for good)
    inode: int = 0
    source: str = "bound"  # "bound", "systemd" or "predecessor"

    def unlink_if_ours(self) -> None:
        """Remove the socket file, if this process bound it and the path still names it."""
        if not self.bound_here:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
            os.unlink(self.path)


def from_systemd() -> dict[str, socket.socket]:
    """The sockets systemd passed to this process, by name (an unnamed one is `berthd`)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    found = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else API
        found[name] = socket.socket(fileno=fd)
    return found


def take(
    path: str,
    systemd: dict[str, socket.socket],
    handed: dict[str, socket.socket],
    *,
    mode: int = 0o660,
) -> Listener:
    """berthd's API socket: a predecessor's, systemd's, or bound at `path`."""
    for source, sockets in (("predecessor", handed), ("systemd", systemd)):
        sock = sockets.pop(API, None)
        if sock is not None:
            sock.setblocking(False)
            return Listener(sock, path, bound_here=False, source=source)
    sock = bind_unix(path, mode=mode, backlog=4096)
    return Listener(sock, path, bound_here=True, inode=os.stat(path).st_ino)
