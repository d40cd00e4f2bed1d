"""berthd's supervision of the gRPC front end (berth-grpc): adopt the one that serves (it
outlives berthd's restarts and upgrades: see grpc/main.py), start one when there is none
or it is of another version (the new one takes the socket over from the old), restart it
if it dies, and stop it when berthd stops for good (not when it hands over)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from berth.daemon import __version__
from berth.daemon.config import Config
from berth.daemon.tasks.shims import shim_alive, wait_for_death

log = logging.getLogger("berthd.grpc")

STOP_TIMEOUT = 8.0  # berth-grpc's grace for calls in flight is 5 s
STARTUP_TIMEOUT = 30.0
RECORD = "grpc.json"
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
        "--state",
        config.state,
        "--log-level",
        config.log_level,
        "--log-format",
        config.log_format,
    ]
    if config.ttrpc_address:
        argv += ["--ttrpc-address", config.ttrpc_address]
    if config.grpc_gid:
        argv += ["--socket-group", str(config.grpc_gid)]
    return argv


MMAP_THRESHOLD = 128 * 1024  # glibc's default starting value, held there


def environment(base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """berth-grpc's environment: berthd's, with glibc's malloc told to keep its mmap
    threshold fixed.

    Content streams through berth-grpc in messages of up to a few MiB. By default glibc
    raises the threshold to the size of each large block freed, so the next ones come from
    the heap, whose freed pages it mostly keeps: after one `ctr images import`, berth-grpc
    stayed 4.7 MiB larger in about half the runs (22.9 or 27.6 MiB); with the threshold
    held, 22.6-22.8 in five of five. Tunables are read at the process's start, so this
    goes in the environment (berth-grpc needs no binding to set it)."""
    env = dict(base)
    tunable = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"
    current = env.get("GLIBC_TUNABLES")
    if current and "glibc.malloc.mmap_threshold=" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{tunable}"
    elif not current:
        env["GLIBC_TUNABLES"] = tunable
    return env


@dataclass
class FrontEnd:
    pid: int
    start_time: int
    version: str
    address: str
    log_format: str = "text"  # a record that names none: an older berth-grpc, text


def recorded(config: Config) -> FrontEnd | None:
    """The live berth-grpc the state dir records, if any."""
    try:
        with open(os.path.join(config.state, RECORD), "rb") as f:
            doc = json.loads(f.read(4096))
        front = FrontEnd(
            int(doc["pid"]),
            int(doc["start_time"]),
            str(doc["version"]),
            str(doc["address"]),
            str(doc.get("log_format", "text")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return front if shim_alive(front.pid, front.start_time) else None


async def supervise(config: Config, recovered: trio.Event, stays: Callable[[], bool]) -> None:
    """Keep one berth-grpc of this version serving for as long as this task lives; stop it
    when the task ends, unless `stays()` (a handover: the successor adopts it). A crash is
    followed by a restart after a growing pause (a broken install must not spin). It starts
    once recovery is done: its interpreter start-up (protobuf and the stubs) would
    compete with reattaching to the shims, and task calls wait for recovery anyway."""
    await recovered.wait()
    backoff = 0.5
    current: FrontEnd | None = None
    try:
        while True:
            current = recorded(config)
            began = trio.current_time()
            if (
                current
                and current.version == __version__
                and current.address == config.grpc_address
                and current.log_format == config.log_format
            ):
                log.info("gRPC front end pid %d serves %s: adopted", current.pid, current.address)
                await wait_for_death(current.pid)
            else:
                current = await _start(config, current)
                if current is not None:
                    await wait_for_death(current.pid)
            successor = recorded(config)
            if current is not None and successor is not None and successor.pid != current.pid:
                # Replaced (a berth-grpc of another version took the socket over, and
                # recorded itself before it stopped this one): adopt it at once.
                log.info("gRPC front end pid %d replaced by pid %d", current.pid, successor.pid)
                continue
            if current is not None:
                log.warning("gRPC front end (pid %d) exited; restarting", current.pid)
            if trio.current_time() - began > 60:
                backoff = 0.5  # it served a while: a crash now is not a broken install
            await trio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
    finally:
        if not stays():
            front = recorded(config)
            if front is not None:
                with trio.CancelScope(shield=True):
                    await _stop(front.pid)


async def _start(config: Config, old: FrontEnd | None) -> FrontEnd | None:
    """Start a berth-grpc (it replaces `old` itself, if there is one) and wait until it
    records itself as the one serving."""
    proc = await trio.lowlevel.open_process(
        command(config), stdin=subprocess.DEVNULL, start_new_session=True, env=environment()
    )
    log.info(
        "gRPC front end started (pid %d) on %s%s",
        proc.pid,
        config.grpc_address,
        f", replacing pid {old.pid} ({old.version})" if old else "",
    )
    with trio.move_on_after(STARTUP_TIMEOUT):
        while proc.returncode is None:
            front = recorded(config)
            if front is not None and front.pid == proc.pid:
                trio.lowlevel.spawn_system_task(proc.wait)  # reaped whenever it exits
                return front
            await trio.sleep(0.05)
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    log.error("gRPC front end (pid %d) did not start (exit %s)", proc.pid, proc.returncode)
    return None


async def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(STOP_TIMEOUT):
        await wait_for_death(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
