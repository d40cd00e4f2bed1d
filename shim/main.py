"""`berth-shim`: run one shim (standalone, or forked by the zygote), or serve as the zygote.

Standalone use needs no daemon:

    berth-shim --id c1 --bundle /path/to/bundle --socket /run/x/c1.sock [--detach]

then drive it over its socket with berth.shim.wire.protocol (create, start, wait, delete, ...).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
from dataclasses import dataclass

import prctl

from berth.native import SignalFD
from berth.shim import state
from berth.shim.api import ShimServer
from berth.shim.events import EventQueue
from berth.shim.loop import Loop, ensure_std_fds, log, log_to
from berth.shim.reaper import Reaper
from berth.shim.runtime import RuntimeConfig
from berth.shim.task import ShimConfig, Task
from berth.shim.wire.protocol import PROTOCOL_VERSION
from berth.shim.wire.unixsock import bind_unix

# Signals the shim handles through a signalfd instead of dying of them.
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass
class Shim:
    """The parts of one running shim, wired together on one loop."""

    loop: Loop
    reaper: Reaper
    queue: EventQueue
    task: Task
    server: ShimServer
    signals: SignalFD

    def close(self) -> None:
        self.task.kill_loggers()
        self.server.close()
        self.reaper.close()
        self.signals.close()


def assemble(config: ShimConfig) -> Shim:
    """Build a shim's loop, reaper, task, socket server and signalfd (what a real shim
    and the zygote's rehearsal both run). SIGCHLD and HANDLED_SIGNALS must be blocked."""
    loop = Loop()
    reaper = Reaper(loop)
    queue = EventQueue()
    task = Task(loop, reaper, config, queue)
    socket_dir = os.path.dirname(config.socket)
    os.makedirs(socket_dir, mode=0o700, exist_ok=True)
    os.chmod(socket_dir, 0o700)
    listener = bind_unix(config.socket, mode=0o600)
    server = ShimServer(loop, listener, task, queue)
    return Shim(loop, reaper, queue, task, server, SignalFD(HANDLED_SIGNALS))


def record_state(config: ShimConfig) -> None:
    """Write shim.json: how a (restarted, upgraded) daemon finds this shim again."""
    state.write_state(
        config.bundle,
        state.ShimRecord(
            version=state.STATE_VERSION,
            pid=os.getpid(),
            start_time=state.process_start_time(os.getpid()) or 0,
            address=config.socket,
            protocol=PROTOCOL_VERSION,
            id=config.id,
            namespace=config.namespace,
            bundle=config.bundle,
            runtime=config.runtime.to_params(),
        ),
    )


def run(config: ShimConfig, ready_fd: int | None = None) -> int:
    """Run the shim's loop until it is shut down. Blocks SIGCHLD first, before any thread
    exists, so no thread of this process ever takes one and the signalfd sees every
    SIGCHLD."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, *HANDLED_SIGNALS})
    prctl.set_child_subreaper(True)
    prctl.set_name("berth-shim")
    try:
        prctl.set_proctitle(f"berth-shim {config.namespace}/{config.id}")
    except Exception:  # cosmetic only
        pass
    shim = assemble(config)
    loop, task, signals = shim.loop, shim.task, shim.signals

    def on_signal() -> None:
        for info in signals.read():
            if task.has_live_processes():
                log(f"ignoring signal {info.signo} from pid {info.pid}: the container is alive")
            else:
                log(f"signal {info.signo}: no live process, exiting")
                loop.stop()

    loop.add_reader(signals.fileno(), on_signal)
    record_state(config)
    if ready_fd is not None:
        os.write(ready_fd, f"ready {os.getpid()}".encode())
        os.close(ready_fd)
    log(f"serving {config.namespace}/{config.id} on {config.socket}")
    try:
        loop.run()
    finally:
        shim.close()
        try:
            os.unlink(config.socket)
        except FileNotFoundError:
            pass
    log("shim exiting")
    return 0


def spawn_detached(config: ShimConfig, log_path: str | None = None, timeout: float = 10.0) -> int:
    """Fork and run a shim, detached: a new session (so its own process group) with only
    stdio left open; return its pid once it is serving.

    One fork, not the classic two: every page an intermediate child touched would become
    the shim's private memory once the intermediate exited. The caller never waits for
    the shim: the zygote ignores SIGCHLD (the kernel reaps its children), and a
    `berth-shim --detach` exits right away, leaving the shim to init or a subreaper. As a
    session leader the shim could acquire a controlling terminal by opening one; it opens
    client paths with O_NOCTTY, and a pty master arrives by SCM_RIGHTS, not by open().
    """
    import select

    r, w = os.pipe2(os.O_CLOEXEC)
    if os.fork() == 0:
        try:
            os.close(r)
            os.setsid()
        except BaseException:
            os._exit(1)
        _become_shim(config, w, log_path)
    os.close(w)
    try:
        chunks = []
        deadline_fds = [r]
        while True:
            ready, _, _ = select.select(deadline_fds, [], [], timeout)
            if not ready:
                raise TimeoutError("shim did not become ready")
            chunk = os.read(r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    reply = b"".join(chunks).decode(errors="replace")
    if reply.startswith("ready "):
        return int(reply.split()[1])
    raise RuntimeError(reply.removeprefix("error ").strip() or "shim exited before it was ready")


def _become_shim(config: ShimConfig, ready_w: int, log_path: str | None) -> None:
    """In the detached child: clean process state, then run. Never returns."""
    code = 1
    try:
        if ready_w <= 2:  # stdio was closed when the pipe was made: keep it from the dup2s
            ready_w = fcntl.fcntl(ready_w, fcntl.F_DUPFD_CLOEXEC, 3)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if log_path:
            log_to(log_path)  # fd 2, bounded in size (loop.py)
        else:
            os.dup2(devnull, 2)
        # Nothing inherited survives: not the daemon's sockets, not the zygote's pipe.
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 1 << 20)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signo, signal.SIG_DFL)
        os.chdir("/")
        code = run(config, ready_fd=ready_w)
    except BaseException as exc:
        try:
            os.write(ready_w, f"error {exc}".encode())
        except OSError:
            pass
        log(f"shim failed: {exc!r}")
    finally:
        os._exit(code)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="berth-shim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ctl-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--id", help="container id")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--bundle", help="OCI bundle directory (config.json); state goes here")
    parser.add_argument("--socket", help="path of the shim's API socket (its dir becomes 0700)")
    parser.add_argument("--runtime", default="runc", help="OCI runtime binary")
    parser.add_argument("--runtime-root", default="", help="the runtime's --root")
    parser.add_argument("--runtime-arg", action="append", default=[], help="extra global arg")
    parser.add_argument("--detach", action="store_true", help="detach; print the shim pid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ensure_std_fds()  # the zygote and a standalone shim alike
    args = parse_args(argv)
    if args.zygote:
        from berth.shim.zygote import serve

        if args.ctl_fd is None:
            print("berth-shim: --zygote needs --ctl-fd", file=sys.stderr)
            return 2
        return serve(args.ctl_fd, args.work_dir)
    if not (args.id and args.bundle and args.socket):
        print("berth-shim: --id, --bundle and --socket are required", file=sys.stderr)
        return 2
    config = ShimConfig.from_params(
        {
            "id": args.id,
            "namespace": args.namespace,
            "bundle": os.path.abspath(args.bundle),
            "socket": os.path.abspath(args.socket),
            "runtime": RuntimeConfig(
                binary=args.runtime, root=args.runtime_root, args=tuple(args.runtime_arg)
            ).to_params(),
        }
    )
    if args.detach:
        pid = spawn_detached(config, log_path=os.path.join(config.bundle, "shim.log"))
        print(pid)
        return 0
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
