"""Passing berthd on: a planned handover to a successor (an upgrade), and a warm standby
that takes over when the active daemon dies.

The active daemon serves a private control socket, `<state>/berthd.ctl` (0600, the peer's
uid checked), with berth's ordinary protocol, and SCM_RIGHTS for file descriptors:

    standby.attach   a standby asks for duplicates of the listening socket (so that it
                     holds it too, and a client never meets a refusal while it takes
                     over) and the active daemon's pid and start time (to watch it die)
    standby.wait     then waits: answered only when the active daemon stops for good
                     (SIGTERM/SIGINT), and then the standby exits instead of taking over
    handover.begin   a successor (`berthd --takeover`) asks for everything: the active
                     daemon stops accepting, drains its calls (rpc.Drain), releases its
                     shims (their unacknowledged events wait for the successor), hands
                     over the listening socket, the event history and the last event
                     number it processed of every task, closes its databases and drops
                     its locks
    handover.done    the successor serves: the predecessor exits. If the successor dies
                     or hangs up before saying so, the predecessor takes its locks back
                     and carries on (re-executing itself with the same socket: nothing
                     was ever closed, so no client was refused and nothing is lost)

A refused handover (a downgrade, one already under way) changes nothing.

Every wait on the peer is bounded: a successor gives up a predecessor that does not hand
over within BEGIN_TIMEOUT (nothing is lost: the predecessor resumes once it can, as after
a successor's death), and serves on without an acknowledgement of "done" after
ACK_TIMEOUT (the predecessor, should it run again, reads "done" and exits); a predecessor
resumes if its successor does not take its reply or say "done" within DONE_TIMEOUT.

Kernel facts: a listening socket any process holds queues connections in its backlog;
`pidfd_open` tells a standby the moment the active daemon is gone, without pid reuse
races; the lock (flock) decides who is active, and the kernel drops it with its holder.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from berth.daemon import __version__, listeners
from berth.shim.state import process_start_time
from berth.shim.wire.errors import BerthError, FailedPrecondition, Unavailable
from berth.shim.wire.protocol import (
    Connection,
    ConnectionClosed,
    ErrorReply,
    Hello,
    NeedData,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    Welcome,
)
from berth.shim.wire.unixsock import bind_unix, peer_credentials, short_path

log = logging.getLogger("berthd.handover")

CONTROL_SOCKET = "berthd.ctl"
MAX_FRAME = 64 * 1024 * 1024  # the history of events crosses as one reply
DRAIN_TIMEOUT = 10.0  # seconds calls in flight may take to finish before they are ended
DONE_TIMEOUT = 60.0  # seconds a successor has to say it serves
# seconds a successor waits for its predecessor's handover: the predecessor may first wait
# for its own start to settle (DONE_TIMEOUT), then drains (DRAIN_TIMEOUT) and releases
BEGIN_TIMEOUT = DONE_TIMEOUT + DRAIN_TIMEOUT + 20.0
ACK_TIMEOUT = 10.0  # seconds a successor that serves waits for "done" to be acknowledged
ATTACH_TIMEOUT = 10.0  # seconds a standby waits for the active daemon to attach it
DISMISS_TIMEOUT = 5.0  # seconds a stopping daemon waits for its standbys to hang up
# accept(2) failures that mean "out of descriptors or memory for now", not a broken socket
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1  # seconds before accepting again after one of those


def begin_timeout() -> float:
    """BEGIN_TIMEOUT, or the tests' shorter one (BERTH_HANDOVER_BEGIN_TIMEOUT)."""
    try:
        return float(os.environ.get("BERTH_HANDOVER_BEGIN_TIMEOUT", BEGIN_TIMEOUT))
    except ValueError:
        return BEGIN_TIMEOUT


def control_path(state: str) -> str:
    return os.path.join(state, CONTROL_SOCKET)


def version_key(version: str) -> tuple[int, ...]:
    """'0.2.0' -> (0, 2, 0); anything unparsable sorts first."""
    try:
        return tuple(int(part) for part in version.split(".")[:3])
    except ValueError:
        return (0,)


@dataclass
class Inheritance:
    """What a daemon takes over from its predecessor."""

    sockets: dict[str, socket.socket] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    task_seqs: dict[str, int] = field(default_factory=dict)  # "ns/id" -> last event seq
    predecessor: int = 0  # pid (a handover waits for it to exit; a standby saw it die)
    listener: listeners.Listener | None = None  # bound beside an old daemon that was stopped
    inode: int = 0  # of the path that named the handed socket (0: unknown)
    channel: ControlChannel | None = None  # a handover's: say "done" on it once serving


# --- the wire: frames plus file descriptors ------------------------------------------------


class ControlChannel:
    """One control connection, either side: frames through the sans-IO Connection, file
    descriptors alongside them (SCM_RIGHTS)."""

    def __init__(self, sock: trio.socket.SocketType, role: str) -> None:
        self.sock = sock
        self.conn = Connection(role, max_frame_size=MAX_FRAME, peer_name=f"berthd {__version__}")
        self.fds: list[int] = []  # received, not yet claimed

    async def send(self, event: Any, fds: list[int] | None = None) -> None:
        data = memoryview(self.conn.send(event))
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = await self.sock.sendmsg([data], ancillary)
            data = data[sent:]
        while data:
            data = data[await self.sock.send(data) :]

    async def next(self) -> Any:
        """The next event (never NeedData); ConnectionClosed at the end."""
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
            data, ancillary, _, _ = await self.sock.recvmsg(1 << 20, space)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds.extend(fds)
            self.conn.receive_data(data)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()


async def connect(state: str, timeout: float = 5.0) -> ControlChannel:
    """A client channel to the active daemon's control socket, past the handshake."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout), short_path(control_path(state)) as path:
            await sock.connect(path)
            channel = ControlChannel(sock, Role.CLIENT)
            await channel.send(Hello())
            if not isinstance(await channel.next(), Welcome):
                raise Unavailable("the active berthd refused the control handshake")
    except (OSError, trio.TooSlowError, RemoteProtocolError) as exc:
        sock.close()
        raise Unavailable(f"no active berthd answers on {control_path(state)}: {exc}") from None
    return channel


async def call(channel: ControlChannel, method: str, params: dict[str, Any]) -> Any:
    await channel.send(Request(channel.conn.next_request_id(), method, params, {}))
    return await _reply(channel)


async def _reply(channel: ControlChannel) -> Any:
    """The answer to the request just sent (a control connection has one at a time)."""
    while True:
        event = await channel.next()
        if isinstance(event, Response):
            return event.result
        if isinstance(event, ErrorReply):
            raise event.to_exception()
        if isinstance(event, ConnectionClosed):
            raise Unavailable("the active berthd closed the control connection")


# --- the active daemon's side ----------------------------------------------------------------


@dataclass
class Handing:
    """What the active daemon does for a handover (main.py provides each step)."""

    listener_fd: Callable[[], int]
    listener_inode: Callable[[], int]  # of the path naming it (0: unknown)
    stop_accepting: Callable[[], Awaitable[None]]
    drain: Callable[[], Awaitable[int]]
    release_tasks: Callable[[], Awaitable[dict[str, int]]]
    history: Callable[[], list[dict[str, Any]]]
    close_state: Callable[[], None]  # databases closed, locks dropped
    resume: Callable[[], None]  # the successor failed: take everything back (re-exec)
    finish: Callable[[], None]  # the successor serves: stop this daemon


class ControlServer:
    def __init__(self, state: str, handing: Handing) -> None:
        self.path = control_path(state)
        self.handing = handing
        self.busy = False
        self.standbys = 0  # attached: each keeps its control connection open
        self.stopping = False  # stopping for good: standbys are dismissed, none attached
        self._waiting: dict[ControlChannel, int | None] = {}  # standby -> its wait's id
        self.spawned: list[trio.Process] = []  # standbys this daemon started (standby.py)
        # Set once this daemon's own start is complete (its predecessor, if any, has been
        # told it serves): a successor asking earlier waits, else this daemon could hand
        # over and exit before that word, and its predecessor would resume beside the
        # successor's successor.
        self.settled = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = bind_unix(self.path, mode=0o600)
        async with trio.open_nursery() as nursery:
            sock = trio.socket.from_stdlib_socket(listener)
            task_status.started()
            while True:
                try:
                    conn, _ = await sock.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    # Out of descriptors (clients holding them all, say): the connection
                    # waits in the backlog; serving on matters more than answering it now.
                    log.error("control socket: accept: %s; retrying shortly", exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(self._serve_one, conn)

    async def _serve_one(self, sock: trio.socket.SocketType) -> None:
        _, uid, _ = peer_credentials(sock)  # type: ignore[arg-type]
        channel = ControlChannel(sock, Role.SERVER)
        try:
            if uid not in (0, os.getuid()):
                log.warning("refused a control connection from uid %d", uid)
                return
            await self._requests(channel)
        except (OSError, trio.BrokenResourceError, RemoteProtocolError) as exc:
            log.warning("control connection: %s", exc)
        finally:
            channel.close()

    async def _requests(self, channel: ControlChannel) -> None:
        while True:
            event = await channel.next()
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, Hello):
                await channel.send(channel.conn.server_handshake(event))
            elif isinstance(event, Request):
                try:
                    if event.method == "standby.attach":
                        await self._attach(channel, event)
                        await self._while_attached(channel)
                        return
                    elif event.method == "handover.begin":
                        await self._hand_over(channel, event)
                        return
                    else:
                        raise FailedPrecondition(f"unknown control method {event.method!r}")
                except BerthError as exc:
                    await channel.send(ErrorReply.from_exception(event.id, exc))

    async def _attach(self, channel: ControlChannel, req: Request) -> None:
        if self.stopping:
            raise FailedPrecondition("this berthd is stopping for good: no standby wanted")
        version = str(req.params.get("version", ""))
        if version != __version__:
            # After an upgrade the old release's standby must not stay behind the new
            # daemon (its takeover would be a downgrade): it exits, and a standby of
            # this version is started in its place.
            raise FailedPrecondition(
                f"a standby must be of this berthd's version ({__version__}), not {version or '?'}"
            )
        fd = self.handing.listener_fd()
        reply = {
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()) or 0,
            "version": __version__,
            "inode": self.handing.listener_inode(),
        }
        await channel.send(Response(req.id, reply), fds=[fd])

    async def _while_attached(self, channel: ControlChannel) -> None:
        """Until the standby hangs up; its `standby.wait` is answered if this daemon stops
        for good (dismiss_standbys), at once if it already is."""
        self.standbys += 1
        self._waiting[channel] = None
        try:
            while True:
                event = await channel.next()
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Request) and event.method == "standby.wait":
                    self._waiting[channel] = event.id
                    if self.stopping:
                        await self._dismiss(channel)
        finally:
            del self._waiting[channel]
            self.standbys -= 1

    async def _dismiss(self, channel: ControlChannel) -> None:
        request_id = self._waiting.get(channel)
        if request_id is None:
            return
        self._waiting[channel] = None
        with trio.move_on_after(1.0):
            try:
                await channel.send(Response(request_id, {"stop": True}))
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("dismissing a standby: %s", exc)

    async def dismiss_standbys(self, timeout: float = DISMISS_TIMEOUT) -> None:
        """This daemon stops for good (SIGTERM/SIGINT): its standbys must exit, not take
        over (a standby takes over a daemon that died). Those attached are told over
        their control connection, and given `timeout` to hang up; those this daemon
        started that are still on their way are stopped (SIGTERM) instead."""
        self.stopping = True
        if self._waiting:
            log.info("dismissing %d standby(s)", len(self._waiting))
        for channel in list(self._waiting):
            await self._dismiss(channel)
        with trio.move_on_after(timeout):
            while self.standbys:
                await trio.sleep(0.01)
        if self.standbys:
            log.warning("%d standby(s) did not hang up in %.0f s", self.standbys, timeout)
        for proc in self.spawned:
            if proc.returncode is None:
                log.info("stopping the standby pid %d (attaching, or slow to go)", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

    async def _hand_over(self, channel: ControlChannel, req: Request) -> None:
        successor = str(req.params.get("version", ""))
        if version_key(successor) < version_key(__version__):
            raise FailedPrecondition(
                f"refusing to hand over to berthd {successor or '?'} (this is {__version__}): "
                "a downgrade is not supported"
            )
        if self.busy:
            raise FailedPrecondition("a handover is already under way")
        self.busy = True
        with trio.move_on_after(DONE_TIMEOUT):
            await self.settled.wait()
        if not self.settled.is_set():
            self.busy = False
            raise FailedPrecondition("this berthd is still starting (taking over): try again")
        log.info("handing over to berthd %s (pid %s)", successor, req.params.get("pid"))
        began = trio.current_time()
        await self.handing.stop_accepting()
        ended = await self.handing.drain()
        drained = trio.current_time()
        seqs = await self.handing.release_tasks()
        history = self.handing.history()
        self.handing.close_state()
        log.info(
            "drained in %.1f ms (%d call(s) ended for the successor), released in %.1f ms",
            (drained - began) * 1e3,
            ended,
            (trio.current_time() - drained) * 1e3,
        )
        reply = {
            "history": history,
            "task_seqs": seqs,
            "pid": os.getpid(),
            "ended": ended,
            "inode": self.handing.listener_inode(),
        }
        done: Request | None = None
        try:
            with trio.move_on_after(DONE_TIMEOUT):  # a successor that stalls: resume
                await channel.send(Response(req.id, reply), fds=[self.handing.listener_fd()])
                event = await channel.next()
                if isinstance(event, Request) and event.method == "handover.done":
                    done = event  # decided: whatever happens to the acknowledgement
                    await channel.send(Response(event.id, {}))
        except (OSError, trio.BrokenResourceError, RemoteProtocolError) as exc:
            log.error("the handover broke off: %s", exc)
        if done is not None:
            # The successor serves (it said so): this daemon must not resume beside it,
            # even if the acknowledgement did not get through (a successor that gave up
            # waiting for it while this daemon was stopped, say).
            log.info("the successor serves: this berthd stops")
            self.handing.finish()
            return
        log.error("the successor did not take over: resuming")
        self.handing.resume()


# --- the successor's side ----------------------------------------------------------------


async def take_over(state: str, address: str) -> Inheritance:
    """`berthd --takeover`: ask the active daemon to hand over; what it passed on. A
    daemon that predates handovers (0.1.0 has no control socket) is stopped instead and
    its shims adopted as after a restart; this daemon's socket is put at the path first,
    so that new clients wait in its backlog rather than being refused (`bind_beside`)."""
    if not os.path.exists(control_path(state)):
        return await _stop_predecessor(state, address)
    channel = await connect(state)
    timeout = begin_timeout()
    try:
        params = {"version": __version__, "pid": os.getpid()}
        with trio.move_on_after(timeout) as waited:
            begin = Request(channel.conn.next_request_id(), "handover.begin", params, {})
            await channel.send(begin)
            if os.environ.get("BERTH_TAKEOVER_FAULT") == "stop-predecessor-at-begin":  # tests
                os.kill(_lock_holder(state), signal.SIGSTOP)  # a predecessor that stalls
            reply = await _reply(channel)
        if waited.cancelled_caught:
            # Hanging up makes the predecessor resume if it released anything: it must
            # not wait for a successor that left, nor this one for it.
            raise Unavailable(
                f"the running berthd did not hand over within {timeout:.0f} s: giving up "
                "(it serves on, or resumes serving as soon as it runs again)"
            )
    except BaseException:
        channel.close()
        raise
    if not channel.fds:
        channel.close()
        raise Unavailable("the handover carried no listening socket")
    sock = socket.socket(fileno=channel.fds.pop(0))
    return Inheritance(
        sockets={"berthd": sock},
        history=list(reply.get("history") or []),
        task_seqs=dict(reply.get("task_seqs") or {}),
        predecessor=int(reply.get("pid") or 0),
        channel=channel,
        inode=int(reply.get("inode") or 0),
    )


async def _stop_predecessor(state: str, address: str, timeout: float = 30.0) -> Inheritance:
    """SIGTERM the berthd that holds the state dir's lock (it leaves every shim running),
    with this daemon's socket already at `address`, and wait until it has exited."""
    pid = _lock_holder(state)
    if not pid:
        return Inheritance()
    log.warning("berthd pid %d cannot hand over (an older release): stopping it", pid)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return Inheritance(predecessor=pid)
    listener, previous = listeners.bind_beside(address)
    try:
        await _let_calls_finish(pid, timeout=2.0)
        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(timeout):
            while True:  # undo its unlink of the socket path at once (~2 ms of ENOENT)
                listener.restore_path()
                with trio.move_on_after(0.002):
                    await trio.lowlevel.wait_readable(pidfd)
                    break
        listener.restore_path()
    except BaseException:
        listeners.put_back(listener, previous)
        raise
    finally:
        os.close(pidfd)
    listeners.forget_previous(previous)
    return Inheritance(predecessor=pid, listener=listener)


async def _let_calls_finish(pid: int, timeout: float) -> None:
    """New clients reach this daemon's socket now; give the old daemon's accepted
    connections (CLI calls: a connection each) up to `timeout` to end before it is
    stopped, which would cut them. Streams that do not end are cut at the timeout."""
    with trio.move_on_after(timeout):
        while listeners.served_connections(pid):
            await trio.sleep(0.005)
    log.info("the old daemon serves %s connection(s)", listeners.served_connections(pid))


def _lock_holder(state: str) -> int:
    """The pid of the berthd that holds the state dir's lock, 0 if none runs."""
    try:
        with open(os.path.join(state, "berthd.lock"), "rb") as f:
            pid = int(json.loads(f.read(4096) or b"{}").get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return 0  # not running
    if b"berth" not in cmdline:
        raise FailedPrecondition(f"pid {pid} holds the state dir's lock but is not berthd")
    return pid


async def announce_done(inheritance: Inheritance) -> None:
    """Tell the predecessor that this daemon serves (it then exits). This daemon serves
    on whatever the answer: it holds the locks, and a predecessor that reads "done" later
    (one that was stopped, say) exits then; so the wait for the answer is bounded."""
    channel = inheritance.channel
    if channel is None:
        return
    try:
        with trio.move_on_after(ACK_TIMEOUT) as waited:
            await call(channel, "handover.done", {})
        if waited.cancelled_caught:
            log.warning(
                "the predecessor (pid %d) did not acknowledge the handover in %.0f s: "
                "serving on (it exits once it reads that this one serves)",
                inheritance.predecessor,
                ACK_TIMEOUT,
            )
    except (BerthError, OSError, trio.BrokenResourceError, RemoteProtocolError) as exc:
        log.warning("the predecessor did not acknowledge the handover: %s", exc)
    finally:
        channel.close()
        inheritance.channel = None
