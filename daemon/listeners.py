"""berthd's listening socket: from systemd, from a predecessor, or bound here.

A listening socket that is held by some process queues a client's connect() in its backlog
instead of refusing it; re-binding a path always opens a window of refusals, passing the
fd never does (upgrade-notes, kernel facts). So berthd takes its socket, in this order:
- handed over by its predecessor (an upgrade, or a standby's takeover) over SCM_RIGHTS;
- from systemd socket activation (LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES, sd_listen_fds
  semantics: fds from 3; the variables are unset once read, so children never see them);
- bound by berthd itself: a stale socket file is replaced, one that answers (another
  berthd's, with another state dir) is not (AddressInUse: berthd refuses to start).

Only a socket berthd bound itself is unlinked when it stops, and only while its path still
names that socket: a successor's or systemd's socket is never removed. A daemon serving a
socket it was handed checks that the path still names it (`ensure_named`): a socket whose
name is gone reaches no new client, so the path is bound again.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field

from berth.shim.wire.unixsock import AddressInUse as AddressInUse  # raised by take()
from berth.shim.wire.unixsock import bind_unix

API = "berthd"  # the name of berthd's own socket (systemd's FileDescriptorName=)
SD_LISTEN_FDS_START = 3


@dataclass
class Listener:
    sock: socket.socket
    path: str
    bound_here: bool  # berthd bound it (so it may unlink it when it stops for good)
    inode: int = 0
    source: str = "bound"  # "bound", "bound beside an old daemon", "systemd", "predecessor"
    keep: str | None = None  # a second name of the socket, while an old daemon may unlink it
    # Listening sockets that lost their name (ensure_named): served until this daemon
    # exits, for the clients already in their backlog; never passed on.
    unnamed: list[socket.socket] = field(default_factory=list)

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

    def restore_path(self) -> None:
        """Name this socket at its path again, if something removed the name (an old
        daemon that unlinks its socket path as it exits; see `bind_beside`)."""
        if self.keep is None:
            return
        try:
            os.lstat(self.path)
        except FileNotFoundError:
            try:
                os.link(self.keep, self.path)
            except FileExistsError:
                pass  # named again by someone else meanwhile: leave it

    def ensure_named(self, *, mode: int = 0o660) -> bool:
        """Bind the path again if it does not name this socket (removed, or replaced by a
        stale file) while its identity (`inode`) is known: a daemon must never serve
        without its path. True if it did. A path another process serves is not taken
        (AddressInUse)."""
        if not self.inode:
            return False
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
                return False
        except FileNotFoundError:
            pass
        fresh = bind_unix(self.path, mode=mode, backlog=4096, replace_live=False)
        self.unnamed.append(self.sock)
        self.sock = fresh
        self.bound_here = True
        self.inode = os.stat(self.path).st_ino
        self.source = f"bound again ({self.source}'s socket had lost its path)"
        return True

    def forget_keep(self) -> None:
        if self.keep is not None:
            try:
                os.unlink(self.keep)
            except FileNotFoundError:
                pass
            self.keep = None


def bind_beside(path: str, *, mode: int = 0o660) -> tuple[Listener, str | None]:
    """Bind a fresh socket and move it over `path` in one rename(2), while an older daemon
    (one that cannot hand its socket over) still serves what it accepted: from that
    instant connects queue in this socket's backlog instead of being refused. A second
    name (`path`.keep) lets `restore_path` undo the old daemon's unlink of `path` at its
    exit (0.1.0 unlinks it unconditionally). Also returns a name of the old socket
    (`path`.prev, or None), to put back with `put_back` if the takeover fails."""
    fresh, keep, prev = f"{path}.next", f"{path}.keep", f"{path}.prev"
    for stale in (fresh, keep, prev):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    sock = bind_unix(fresh, mode=mode, backlog=4096)
    inode = os.stat(fresh).st_ino
    os.link(fresh, keep)
    previous: str | None = prev
    try:
        os.link(path, prev)
    except FileNotFoundError:
        previous = None
    os.rename(fresh, path)
    listener = Listener(sock, path, True, inode, "bound beside an old daemon", keep)
    return listener, previous


_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags" of a listening socket


def served_connections(pid: int) -> int | None:
    """How many connections process `pid` has accepted on its listening UNIX socket(s) and
    not yet closed (None if it cannot be told). From /proc/net/unix, whose rows for an
    accepted socket repeat the listening socket's path, and /proc/<pid>/fd."""
    try:
        held = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]  # "socket:[inode]"
            for fd in os.listdir(f"/proc/{pid}/fd")
        }
        with open("/proc/net/unix") as table:
            rows = [line.split() for line in table.read().splitlines()[1:]]
    except OSError:
        return None
    mine = [row for row in rows if len(row) >= 8 and row[6] in held]
    listening = {row[7] for row in mine if int(row[3], 16) & _SO_ACCEPTCON}
    return sum(1 for row in mine if row[7] in listening and not int(row[3], 16) & _SO_ACCEPTCON)


def put_back(listener: Listener, previous: str | None) -> None:
    """Undo `bind_beside`: the old daemon's socket at the path again (it keeps serving)."""
    if previous is not None:
        os.rename(previous, listener.path)
    else:
        listener.unlink_if_ours()
    listener.forget_keep()
    listener.sock.close()


def forget_previous(previous: str | None) -> None:
    if previous is not None:
        try:
            os.unlink(previous)
        except FileNotFoundError:
            pass


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
    inode: int = 0,
) -> Listener:
    """berthd's API socket: a predecessor's (`inode`: that of the path naming it, as the
    predecessor knew it; 0 if unknown), systemd's, or bound at `path` (AddressInUse if
    another process serves it)."""
    for source, sockets in (("predecessor", handed), ("systemd", systemd)):
        sock = sockets.pop(API, None)
        if sock is not None:
            sock.setblocking(False)
            if source == "systemd":
                inode = _socket_inode(path)  # systemd bound it there, and keeps it
            return Listener(sock, path, bound_here=False, inode=inode, source=source)
    sock = bind_unix(path, mode=mode, backlog=4096, replace_live=False)
    return Listener(sock, path, bound_here=True, inode=os.stat(path).st_ino)


def _socket_inode(path: str) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else 0
