"""berthd's supervision of the gRPC front end (berth-grpc): start it, restart it if it
dies, stop it with the daemon. It is a child of berthd and dies with it (it watches a
pidfd of berthd)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import trio

from berth.daemon.config import Config

log = logging.getLogger("berthd.grpc")

STOP_TIMEOUT = 3.0
MAX_BACKOFF = 30.0


def command(config: Config) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "berth.daemon.grpc.main",
        "--address",
        config.grpc_address,
        "--berthd",
        config.address,
        "--parent-pid",
        str(os.getpid()),
        "--log-level",
        config.log_level,
    ]
    if config.grpc_gid:
        argv += ["--socket-group", str(config.grpc_gid)]
    return argv


async def supervise(config: Config, recovered: trio.Event) -> None:
    """Run berth-grpc for as long as this task lives; a crash is logged and followed by
    a restart after a growing pause (so a broken install does not spin). It starts once
    recovery is done: its interpreter start-up (grpcio is a large import) would otherwise
    compete with reattaching to the shims, and task calls wait for recovery anyway."""
    await recovered.wait()
    backoff = 0.5
    while True:
        started = trio.current_time()
        proc = await trio.lowlevel.open_process(
            command(config), stdin=subprocess.DEVNULL, start_new_session=False
        )
        log.info("gRPC front end started (pid %d) on %s", proc.pid, config.grpc_address)
        try:
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    await _stop(proc)
        log.warning("gRPC front end (pid %d) exited with %s; restarting", proc.pid, code)
        if trio.current_time() - started > 60:
            backoff = 0.5
        await trio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF)


async def _stop(proc: trio.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        await proc.wait()
        return
    proc.kill()
    await proc.wait()
