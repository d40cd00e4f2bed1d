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

log = logging.getLogger("berthd.standby")

ATTACH_RETRY = 0.05  # seconds between attempts to find an active daemon
SPAWN_GRACE = 10.0  # seconds a spawned standby has to attach before another is spawned


class StandbyRefused(Exception):
    """The active daemon does not want this standby (another version): it exits."""


async def stand_by(config: Config) -> tuple[handover.Inheritance, startup.Locks]:
    """Wait as a standby; return what to serve with once this process is the active one."""
    held: dict[str, socket.socket] = {}
    mirror: deque[dict[str, Any]] = deque(maxlen=HISTORY)
    while True:
        channel = None
        try:
            channel = await handover.connect(config.state)
            reply = await handover.call(channel, "standby.attach", {"version": __version__})
        except FailedPrecondition as exc:  # of another version than the active daemon
            if channel is not None:
                channel.close()
            raise StandbyRefused(str(exc)) from None
        except Unavailable:
            if channel is not None:
                channel.close()
            try:  # nobody answers: the active one if the locks are free
                locks = startup.take_locks(config)
            except startup.StartupError:
                await trio.sleep(ATTACH_RETRY)
                continue
            return handover.Inheritance(sockets=held, history=list(mirror)), locks
        if channel.fds:
            for old in held.values():
                old.close()
            held = {"berthd": socket.socket(fileno=channel.fds.pop(0))}
        pid, start_time = int(reply["pid"]), int(reply["start_time"])
        try:
            await _watch(config, pid, start_time, mirror)
        finally:
            channel.close()
        try:
            locks = startup.take_locks(config)
        except startup.StartupError:
            continue  # another standby (or a successor) won: stand behind it
        log.info("the active berthd (pid %d) is gone: taking over", pid)
        return handover.Inheritance(sockets=held, history=list(mirror), predecessor=pid), locks


async def _watch(config: Config, pid: int, start_time: int, mirror: deque[dict[str, Any]]) -> None:
    """Return once process `pid` (the active daemon) is gone, mirroring its events."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_start_time(pid) != start_time:
            return  # it died and the pid was reused before we looked
        log.info("standing by for berthd pid %d", pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_mirror, config, mirror)
            await trio.lowlevel.wait_readable(pidfd)
            nursery.cancel_scope.cancel()
    finally:
        os.close(pidfd)


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
