"""The IO of attached runs (`berth run`, `tasks start`, `tasks exec` without -d): FIFOs
that the container's shim reads and writes directly, the threads that copy between them
and our stdio, the raw terminal, and the signals forwarded while we wait.

Container IO never passes through berthd, so a daemon restart does not cut a running
`berth run`: it reconnects and keeps waiting.
"""

from __future__ import annotations

import _signal as signal  # type: ignore[import-not-found]  # signal.py: enum, 1.4 ms a start
import _thread  # what threading.py wraps: see _Thread
import errno
import os
import select
import stat
import time

from berth.daemon.cli.session import CliError, suppress
from berth.shim.wire.errors import BerthError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from collections.abc import Callable
    from io import FileIO
    from typing import Any

    from berth.daemon.cli.session import Session


def _splice_safe(dst: int) -> bool:
    """Whether splice(FIFO -> dst) is safe: only into /dev/null.

    Kernel facts that bite here:
    - splice into a file that can block (a tty, a socket) takes the source pipe's mutex
      and keeps it while the write blocks; the shim then sleeps uninterruptibly (D state)
      on that mutex in its own read, write or close of the FIFO.
    - splice into a regular file reads the file offset when it starts and writes it back
      when it returns, without the lock write(2) takes. With `> log 2>&1` the stdout and
      stderr copies share one offset: the stderr copy, asleep in splice since the attach,
      wrote back the old offset at EOF, and the shell's next line overwrote the
      container's output (found by a run of scripts/demo with its output in a file).
    - splice into a pipe moves each chunk as a pipe buffer of its own, never merged as
      write(2) merges small writes: a pipe has 16 of them, so a consumer that paused
      (read our stdout only later) had a "full" pipe after 16 lines of output, the copy
      blocked, `drain` gave up and the rest was lost (found by test_upgrade's attached
      run). read/write fills the pipe's 64 KiB.
    /dev/null keeps nothing and never blocks."""
    return _is_devnull(dst)


def _is_devnull(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def stdin_wanted(terminal: bool) -> bool:
    """Whether the container's stdin needs a FIFO from us. Not when our stdin is /dev/null
    (the benchmark's, a script's `< /dev/null`) and there is no terminal: the container
    would read nothing but an EOF, which the shim gives a process that has no stdin FIFO
    (it gets /dev/null) without the FIFO, our copy thread, and the CloseIO call on a
    second connection (its handshake, berthd's call to the shim) that ended it."""
    return terminal or not _is_devnull(0)


class _Thread:
    """A daemon thread that can be joined with a timeout: what the copies need of
    threading.Thread, on _thread alone. `import threading` cost 1.7 ms of every start of
    `run` and `exec`, and the functools it imports 1.1 ms more where nothing else needs it
    (min of 40, the benchmark machine on a slow day). Like a daemon thread, it does not
    hold the interpreter's exit; an exception in it is printed as one in a thread started
    by start_new_thread."""

    def __init__(self, target: Callable[..., object], *args: object) -> None:
        self._running = _thread.allocate_lock()
        self._running.acquire()
        self._target = target
        self._args = args
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._target(*self._args)
        finally:
            self._running.release()

    def is_alive(self) -> bool:
        return bool(self._running.locked())

    def join(self, timeout: float) -> None:
        if self._running.acquire(timeout=timeout):
            self._running.release()


class _Progress:
    """What one copy is doing, for `Fifos.drain`: when its source last gave it anything,
    and whether it is busy delivering (a write into our stdout that blocks because its
    reader is slow or paused). Plain attributes, written by the copy's thread alone."""

    def __init__(self) -> None:
        self.last_read = time.monotonic()
        self.delivering = False


def _copy(src: int, dst: int, progress: _Progress | None = None) -> None:
    """Copy until EOF: splice(2) where that is safe (see _splice_safe), else read/write.
    Never splice *into* a FIFO from a source that can block (stdin may be a terminal)."""
    use_splice = _splice_safe(dst) and stat.S_ISFIFO(os.fstat(src).st_mode)
    while True:
        if use_splice:
            try:
                n = os.splice(src, dst, 1 << 20)
            except OSError:
                use_splice = False
                continue
            if n == 0:
                return
            if progress is not None:
                progress.last_read = time.monotonic()
            continue
        _copy_plain(src, dst, progress)
        return


def _copy_plain(src: int, dst: int, progress: _Progress | None = None) -> None:
    """read/write only: used for stdin, whose source (a terminal) may block for ever, and
    for regular files. A destination that is full (EAGAIN: someone else made our stdout
    non-blocking) is waited for; one that fails is reported, and the rest read and
    dropped so the container never blocks on us."""
    failed = False
    while True:
        try:
            data = os.read(src, 1 << 20)
        except OSError:
            return
        if not data:
            return
        if failed:
            continue
        view = memoryview(data)
        if progress is not None:
            progress.delivering = True
        while view:
            try:
                view = view[os.write(dst, view) :]
            except BlockingIOError:
                select.select([], [dst], [])
            except OSError as exc:
                if exc.errno != errno.EPIPE:  # a reader that left is not an error
                    with suppress(OSError):
                        os.write(2, f"berth: output lost: {exc.strerror}\n".encode())
                failed = True
                break
        if progress is not None:
            progress.last_read = time.monotonic()
            progress.delivering = False


SHM = "/dev/shm"


def _private_dir() -> str:
    """A fresh 0700 directory for the FIFOs (what tempfile.mkdtemp does, without importing
    tempfile and its dependencies into every CLI start): under $TMPDIR if it is set, else
    under /dev/shm, a tmpfs (as ctr's /run/containerd/fifo is), and /tmp only if /dev/shm
    cannot be written. /tmp may be a disk: on an ext4 mounted with `discard` (the benchmark
    machine's) the directory, its FIFOs and their removal cost 1.3-2.5 ms of every `run`
    and `exec`, 0.04 ms on a tmpfs."""
    base = os.environ.get("TMPDIR")
    if base:
        return _mkdir_in(base)
    try:
        return _mkdir_in(SHM)
    except OSError:  # no /dev/shm, or not ours to write
        return _mkdir_in("/tmp")


def _mkdir_in(base: str) -> str:
    for _ in range(100):
        path = os.path.join(base, "berth-io-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise CliError(f"cannot create a private directory in {base}")


class Fifos:
    """FIFOs for one process's stdio, in a private temp dir, removed on close."""

    def __init__(self, stdin: bool, stdout: bool, stderr: bool) -> None:
        self.dir = _private_dir()
        self.paths: dict[str, str] = {}
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if wanted:
                path = os.path.join(self.dir, name)
                os.mkfifo(path, 0o600)
                self.paths[name] = path
        self._copies: list[tuple[_Thread, _Progress]] = []
        self._fds: list[int] = []

    def params(self) -> dict[str, Any]:
        return dict(self.paths)

    def attach(self, stdin_ended: Callable[[], None] | None = None) -> None:
        """Open our ends (after the shim opened its own) and start copying. At the end of
        our stdin, `stdin_ended()` (a CloseIO): the shim holds the stdin FIFO open, as
        containerd's does, so closing our end alone is no EOF for the container."""
        for name, target in (("stdout", 1), ("stderr", 2)):
            if name in self.paths:
                fd = os.open(self.paths[name], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.set_blocking(fd, True)
                self._fds.append(fd)
                progress = _Progress()
                self._copies.append((_Thread(_copy, fd, target, progress), progress))
        if "stdin" in self.paths:
            fd = os.open(self.paths["stdin"], os.O_WRONLY | os.O_CLOEXEC)

            def pump(dst: int = fd) -> None:
                _copy_plain(0, dst)
                os.close(dst)
                if stdin_ended is not None:
                    stdin_ended()  # the container sees EOF on its stdin

            _Thread(pump)

    def drain(self, idle: float = 10.0) -> None:
        """Wait until the shim closed the output FIFOs and all output was delivered.

        Never gives up on output that is on its way: a copy that is writing (our stdout's
        reader is slow, or paused and reads later) is waited for as long as it takes, as
        any program writing into a pipe waits. It gives up only on a FIFO that stays open
        with nothing in it for `idle` seconds: a process the container left behind holds
        its write end, and may never write or close it."""
        started = time.monotonic()
        for thread, progress in self._copies:
            while thread.is_alive():
                thread.join(min(1.0, idle))
                if not thread.is_alive() or progress.delivering:
                    continue
                if time.monotonic() - max(progress.last_read, started) >= idle:
                    break

    def close(self) -> None:
        for fd in self._fds:
            with suppress(OSError):
                os.close(fd)
        for path in self.paths.values():
            with suppress(OSError):
                os.unlink(path)
        with suppress(OSError):
            os.rmdir(self.dir)


class raw_terminal:
    """Our terminal in raw mode while the container's terminal is attached (its own line
    discipline does the echo and the signals), restored after. (A class: contextlib's
    decorator would import functools into every start.)"""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and os.isatty(0)
        self.saved: Any = None

    def __enter__(self) -> None:
        if self.enabled:
            import termios
            import tty

            self.saved = termios.tcgetattr(0)
            tty.setraw(0)

    def __exit__(self, *_: object) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)


def terminal_size() -> tuple[int, int] | None:
    """(columns, lines) of whichever stdio is a terminal, for the container's terminal."""
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
            return size.columns, size.lines
        except OSError:
            continue
    return None


def run_attached(
    session: Session,
    container_id: str,
    *,
    terminal: bool,
    exec_id: str | None,
    create_params: dict[str, Any],
    output: bool = True,
) -> int:
    """Create (task or exec) with FIFOs, start, forward signals/resizes, wait, drain.
    Without `output`, only stdin is ours (the output goes where create_params say)."""
    fifos = Fifos(stdin=stdin_wanted(terminal), stdout=output, stderr=output and not terminal)
    size = terminal_size() if terminal else None
    params = {"container_id": container_id, "terminal": terminal, **fifos.params(), **create_params}
    if size:
        params.update(width=size[0], height=size[1])
    try:
        if exec_id:
            session.call("tasks.exec", {**params, "exec_id": exec_id})
        else:
            session.call("tasks.create", params)
        target = {"container_id": container_id, "exec_id": exec_id or ""}

        def stdin_ended() -> None:
            try:
                with session.connect() as c:
                    c.call("tasks.close_io", {**target, "stdin": True})
            except (BerthError, CliError):
                pass  # the process is gone already

        fifos.attach(stdin_ended)

        def forward(signo: int, _frame: Any) -> None:
            try:
                with session.connect() as c:
                    c.call("tasks.kill", {**target, "signal": signo})
            except (BerthError, CliError):
                pass

        def resize(_signo: int, _frame: Any) -> None:
            new = terminal_size()
            if new:
                try:
                    with session.connect() as c:
                        c.call("tasks.resize", {**target, "width": new[0], "height": new[1]})
                except (BerthError, CliError):
                    pass

        with raw_terminal(terminal):
            if terminal:
                signal.signal(signal.SIGWINCH, resize)
            else:
                for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signo, forward)
            session.call("tasks.start", target)
            result = session.call_retrying("tasks.wait", target)
            fifos.drain()
        if exec_id:
            session.call_retrying("tasks.delete_process", target)
        return int(result["exit_status"])
    finally:
        fifos.close()


def _rotated_since(path: str, held: int, max_files: int = 100) -> list[tuple[str, int]] | None:
    """The files written after the one open at fd `held`, oldest first, with their inodes,
    once the shim rotated it (`path` -> `path.1` -> ...): those between it and `path`,
    then `path`. Empty while `path` is still that file, or is missing (between the rename
    and the new file's creation). None while a rotation is under way (the renames run
    from the oldest file down, so a name can be missing for a moment, or the listing can
    miss ours): look again. If ours was removed (the oldest, past `max_files`), every
    file there is newer than it."""
    st = os.fstat(held)
    try:
        latest = os.stat(path).st_ino
    except FileNotFoundError:
        return []
    if latest == st.st_ino:
        return []
    newer = [(path, latest)]
    for index in range(1, max_files):
        rotated = f"{path}.{index}"
        try:
            rotated_inode = os.stat(rotated).st_ino
        except FileNotFoundError:
            break
        if rotated_inode == st.st_ino:
            return newer[::-1]
        newer.append((rotated, rotated_inode))
    if os.fstat(held).st_nlink == 0:
        return newer[::-1]  # ours is gone: all that is left came after it
    return None  # a rotation is moving the names: list them again


def _open_as_listed(files: list[tuple[str, int]]) -> list[FileIO] | None:
    """`files` opened, each checked to be the file listed (None if one was rotated on
    meanwhile: list them again)."""
    opened: list[FileIO] = []
    try:
        for name, inode in files:
            f = open(name, "rb", buffering=0)  # noqa: SIM115  # closed by the caller
            opened.append(f)
            if os.fstat(f.fileno()).st_ino != inode:
                raise FileNotFoundError(name)
    except FileNotFoundError:
        for f in opened:
            f.close()
        return None
    return opened


def open_log(path: str) -> FileIO:
    """The log file `path` is now, for follow_log: opened by the caller, so that where
    following starts does not depend on when its thread runs."""
    return open(path, "rb", buffering=0)  # follow_log closes it


def follow_log(
    path: str, current: FileIO, out: int, done: Callable[[], bool], poll: float = 0.05
) -> None:
    """Copy a log file the shim writes and rotates (shim.io.LogSink), opened as `current`
    (open_log), to `out` as it grows, until `done()` and nothing more is in it, as
    `tail -F` does. At its end, a file that was rotated (`path` names another file now)
    is finished (the shim closes a file before it renames it): the files written since
    are read, oldest first. Each file is read through the descriptor opened on it, never
    reopened by name, so a rotation between two reads loses nothing."""
    finishing = False
    try:
        while True:
            data = current.read(1 << 16)
            if data:
                _write_all(out, data)
                continue
            newer = _rotated_since(path, current.fileno())
            if newer is None:
                time.sleep(0.001)  # the shim is renaming: a moment
                continue
            if newer:
                opened = _open_as_listed(newer)
                if opened is None:
                    continue
                with current:  # what came between our last read and the rotation
                    while chunk := current.read(1 << 16):
                        _write_all(out, chunk)
                for middle in opened[:-1]:  # whole files by now: read to their end
                    with middle:
                        while chunk := middle.read(1 << 16):
                            _write_all(out, chunk)
                current = opened[-1]
                continue
            if finishing:
                return  # a whole pass after done(): nothing more came
            if done():
                finishing = True
                continue
            time.sleep(poll)
    finally:
        current.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
