"""A warm standby: a second berthd, fully imported and holding the listening socket, that
takes over the instant the active daemon dies (kill -9, a crash, the OOM killer).

    berthd --standby   (or `standby = true` in the config: the active daemon keeps one)

It attaches to the active daemon's control socket (handover.py) for a duplicate of the
listening socket, so that clients queue in its backlog rather than meet a refusal while it
takes over; it mirrors the active daemon's events, so that `events --since` replays across
the takeover; and it waits on a pidfd of the active daemon. When that fires it takes the
locks (flock: of two standbys racing, exactly one wins; the other stands behind the
winner), recovers every shim and serves. Being already imported and warm is what makes
the takeover fast (a cold start is mostly `import trio`).

An active daemon stopped on purpose (SIGTERM/SIGINT) is not a death: it answers the
standby's `standby.wait` first, and the standby exits. A standby that takes over serves
its socket at the configured path: should the path have lost it, the path is bound again
(listeners.Listener.ensure_named).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections import deque
from typing import Any

import trio

from berth.daemon import __version__, handover, startup
from berth.daemon.config import ONE_TIME_FLAGS, Config
from berth.daemon.events import HISTORY
from berth.daemon.rpc import RpcClient
from berth.shim.state import process_start_time
from berth.shim.wire.errors import BerthError, FailedPrecondition, Unavailable
from berth.shim.wire.protocol import ConnectionClosed, RemoteProtocolError, Request, Response

log = logging.getLogger("berthd.standby")

ATTACH_RETRY = 0.05  # seconds between attempts to find an active daemon
SPAWN_GRACE = 10.0  # seconds a spawned standby has to attach before another is spawned


class StandbyRefused(Exception):
    """The active daemon does not want this standby (another version): it exits."""


async def stand_by(config: Config) -> tuple[handover.Inheritance, startup.Locks]:
    """Wait as a standby; return what to serve with once this process is the active one.
    StandbyRefused if it is not wanted: another version, or an active daemon that stopped
    for good (a standby takes over a daemon that died, never one an operator stopped)."""
    held: dict[str, socket.socket] = {}
    inode = 0  # of the path naming the held socket, as the active daemon knew it
    mirror: deque[dict[str, Any]] = deque(maxlen=HISTORY)
    watched: tuple[int, int] | None = None  # an active daemon that hung up but lives on
    while True:
        channel = None
        try:
            channel = await handover.connect(config.state)
            with trio.fail_after(handover.ATTACH_TIMEOUT):
                reply = await handover.call(channel, "standby.attach", {"version": __version__})
        except FailedPrecondition as exc:  # another version, or a daemon stopping for good
            if channel is not None:
                channel.close()
            _close_all(held)
            raise StandbyRefused(str(exc)) from None
        except (Unavailable, trio.TooSlowError, OSError, RemoteProtocolError):
            if channel is not None:
                channel.close()
            if watched is not None and process_start_time(watched[0]) == watched[1]:
                # It lives (it re-executed itself to resume, say): attach to it again once
                # it answers; its locks are not this standby's to take.
                await trio.sleep(ATTACH_RETRY)
                continue
            watched = None
            try:  # nobody answers: the active one if the locks are free
                locks = startup.take_locks(config)
            except startup.StartupError:
                await trio.sleep(ATTACH_RETRY)
                continue
            inheritance = handover.Inheritance(sockets=held, history=list(mirror), inode=inode)
            return inheritance, locks
        if channel.fds:
            _close_all(held)
            held = {"berthd": socket.socket(fileno=channel.fds.pop(0))}
            inode = int(reply.get("inode") or 0)
        pid, start_time = int(reply["pid"]), int(reply["start_time"])
        try:
            outcome = await _watch(config, channel, pid, start_time, mirror)
        finally:
            channel.close()
        if outcome == "dismissed":
            _close_all(held)
            raise StandbyRefused(f"the active berthd (pid {pid}) stopped for good")
        if outcome == "hung up":
            watched = (pid, start_time)
            continue
        watched = None
        try:
            locks = startup.take_locks(config)
        except startup.StartupError:
            continue  # another standby (or a successor) won: stand behind it
        log.info("the active berthd (pid %d) is gone: taking over", pid)
        inheritance = handover.Inheritance(
            sockets=held, history=list(mirror), predecessor=pid, inode=inode
        )
        return inheritance, locks


def _close_all(held: dict[str, socket.socket]) -> None:
    for sock in held.values():
        sock.close()
    held.clear()


async def _watch(
    config: Config,
    channel: handover.ControlChannel,
    pid: int,
    start_time: int,
    mirror: deque[dict[str, Any]],
) -> str:
    """Why the watch of process `pid` (the active daemon) ended: "gone" (it died, or
    exited after a handover), "dismissed" (it stopped for good and said so), or "hung up"
    (its control connection ended while it lives on: it re-executed itself). Its events
    are mirrored meanwhile."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    outcome = "gone"
    heard, gone, woke = trio.Event(), trio.Event(), trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                nonlocal outcome
                if await _dismissed(channel):
                    outcome = "dismissed"
                    nursery.cancel_scope.cancel()
                heard.set()
                woke.set()

            async def wait_gone() -> None:
                await trio.lowlevel.wait_readable(pidfd)
                gone.set()
                woke.set()

            nursery.start_soon(listen)
            if pidfd >= 0 and process_start_time(pid) == start_time:
                log.info("standing by for berthd pid %d", pid)
                nursery.start_soon(_mirror, config, mirror)
                nursery.start_soon(wait_gone)
                await woke.wait()
                if not gone.is_set():  # the connection ended first: a death shows at once
                    with trio.move_on_after(1.0):
                        await gone.wait()
                    if not gone.is_set():
                        outcome = "hung up"
                        nursery.cancel_scope.cancel()
            # It is gone. What it said before it went is in the connection's buffer,
            # whose end the kernel closed as it exited: a dismissal there still counts.
            with trio.move_on_after(0.5):
                await heard.wait()
            nursery.cancel_scope.cancel()
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return outcome


async def _dismissed(channel: handover.ControlChannel) -> bool:
    """Ask to be told when the active daemon stops for good (standby.wait); True once it
    does, False when the connection ends without that."""
    try:
        await channel.send(Request(channel.conn.next_request_id(), "standby.wait", {}, {}))
        while True:
            event = await channel.next()
            if isinstance(event, ConnectionClosed):
                return False
            if isinstance(event, Response):
                return isinstance(event.result, dict) and bool(event.result.get("stop"))
    except (OSError, trio.BrokenResourceError, RemoteProtocolError):
        return False


async def _mirror(config: Config, mirror: deque[dict[str, Any]]) -> None:
    """Keep a copy of the active daemon's event history (with its numbering)."""
    while True:
        try:
            client = await RpcClient.connect(config.address, label="standby mirror")
            try:
                await client.handshake()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.run)
                    last = mirror[-1] if mirror else None
                    params: dict[str, Any] = {"since": 0}
                    if last is not None:
                        params = {"after_seq": last["seq"], "epoch": last.get("epoch")}
                    try:
                        async for envelope in client.stream("events.subscribe", params):
                            if isinstance(envelope, dict):  # berthd's own events only
                                mirror.append(envelope)
                    except BerthError as exc:  # inside the nursery: not in a group
                        log.debug("event mirror: %s", exc)
                    nursery.cancel_scope.cancel()
            finally:
                await client.aclose()
        except (BerthError, OSError) as exc:
            log.debug("event mirror: %s", exc)
        await trio.sleep(0.2)


def command(config: Config) -> list[str]:
    """This daemon's command line, as a standby."""
    argv = [a for a in sys.argv[1:] if a not in ONE_TIME_FLAGS]
    return [sys.executable, "-m", "berth.daemon.main", *argv, "--standby"]


async def keep_one(config: Config, control: handover.ControlServer) -> None:
    """Keep a standby behind this (active) daemon: spawn one when none is attached. It is
    started in a session of its own: stopping or killing this daemon leaves it alone."""
    async with trio.open_nursery() as reaping:
        while True:
            if control.standbys == 0:
                proc = await trio.lowlevel.open_process(
                    command(config), stdin=subprocess.DEVNULL, start_new_session=True
                )
                log.info("started a standby (pid %d)", proc.pid)
                control.spawned = [p for p in control.spawned if p.returncode is None]
                control.spawned.append(proc)  # stopped with this daemon if not yet attached
                reaping.start_soon(_reap, proc)
                with trio.move_on_after(SPAWN_GRACE):
                    while control.standbys == 0 and proc.returncode is None:
                        await trio.sleep(0.05)
            await trio.sleep(1.0)


async def _reap(proc: trio.Process) -> None:
    """Reap a standby this daemon started (cancelled when this daemon stops: the standby
    lives on, and is reaped by whoever inherits it)."""
    code = await proc.wait()
    if code:
        log.error("the standby (pid %d) exited with %s", proc.pid, code)
