"""Container stdio: pipes or a pty on the container side; FIFOs and log files on the other.

The client names FIFOs (containerd's model): attach IO never passes through the daemon, so
a daemon restart cannot cut it. The shim holds each output FIFO open for reading as well
as for writing: opening never blocks, and a writer never gets EPIPE/SIGPIPE when the
client goes away.

What happens when nobody reads (the documented, bounded behaviour):
- A FIFO sink buffers up to `fifo_buffer` bytes in the shim beyond the 64 KiB (or larger)
  FIFO. While its reader makes progress, a full buffer applies backpressure, as any pipe
  does: the shim stops reading the container's pipe. When the reader has drained nothing
  for `stall_timeout` seconds and no process but the shim holds the FIFO open for reading
  any more, the shim stops waiting: output past the buffer is dropped for that FIFO (and
  counted) until a reader drains again. A container never blocks for longer than
  `stall_timeout` because of an absent reader; a reader that is there but pauses (the
  consumer of `berth run ... | consumer`) gets every byte, however long it pauses, as
  from any pipe (containerd's shim blocks too). A logger's pipe drops after the stall
  whether its reader is there or not: a hung logging binary costs output, not the
  container.
- A log sink (the shim writes stdout/stderr to files in the container's directory) never
  blocks and never drops: files rotate at `max_size`, keeping `max_files`, so the bound is
  on disk use, and the oldest rotated file is what goes.
Log mode is the lossless mode; use it when nobody may be reading.

A relay thread moves each stream between the container's pipe and one only the shim holds
(shim/relay.py says why); from there, bytes move with splice(2) when there is one sink
and nothing buffered.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from berth.shim.logger import Logger, LoggerCommand
from berth.shim.loop import Future, Loop, TimerHandle, all_done, log
from berth.shim.pipes import PIPE_SIZE, make_pipe
from berth.shim.reaper import Reaper
from berth.shim.relay import start_relay
from berth.shim.wire.errors import InvalidArgument

CHUNK = 256 * 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
READS_PER_WAKEUP = 16  # bound the work done for one stream before others get a turn
# What a stream given up may still pass on: what its two pipes and its relay can hold
# when it is given up, written before; anything past that was written after (a
# background process that keeps writing). Was 16 MiB, all of it kept in memory for a
# reader that pauses: 10 execs whose background child kept writing grew a shim by 134 MB.
ABANDON_BYTES = 2 * PIPE_SIZE + CHUNK
ABANDON_IDLE = 0.02  # seconds a stream given up waits for its relay's next bytes
# ... and the streams of one process given up together, in all: the loop waits meanwhile.
# Was ABANDON_IDLE for each byte, up to 64 of them a stream: 20 execs whose background
# child trickled a byte every 10 ms held the loop 11 s, the shim answering nothing.
ABANDON_WAIT = 0.05
FIONREAD = 0x541B  # ioctl: bytes waiting in a pipe or FIFO (asm-generic/ioctls.h)
TIOCGPTPEER = 0x5441  # ioctl: open a pty master's peer (asm-generic/ioctls.h; Linux 4.13)
READER_POLL = 0.005  # seconds between looks at what a closing FIFO's reader has left
READER_STALL = 0.5  # seconds a closing FIFO waits for a reader that takes nothing
LOGGER_FLUSH_BOUND = 5.0  # seconds a logger's input may take to end before its grace starts


DEFAULT_LOG_MAX_SIZE = 16 * 1024 * 1024
DEFAULT_LOG_MAX_FILES = 4


@dataclass(frozen=True, slots=True)
class LogConfig:
    max_size: int = DEFAULT_LOG_MAX_SIZE
    max_files: int = DEFAULT_LOG_MAX_FILES


@dataclass(frozen=True, slots=True)
class IOConfig:
    """What a client asks for one process's stdio.

    stdout names where output goes, as containerd's shim reads it: an absolute path is a
    FIFO (stderr names its own); `file:///path` appends stdout and stderr to that one file
    (its directories made); `binary:///path?key=value` starts that logging binary and
    gives it both streams (shim/logger.py). With a URI, stderr is not read (containerd
    clients set it to the same URI). stdin is a FIFO in every case."""

    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    terminal: bool = False
    log: LogConfig | None = None
    fifo_buffer: int = 1024 * 1024
    stall_timeout: float = 2.0
    append_to: str | None = None  # file:// stdout
    logger: LoggerCommand | None = None  # binary:// stdout

    @classmethod
    def from_params(cls, params: dict[str, object]) -> IOConfig:
        def path(key: str) -> str | None:
            value = params.get(key)
            if value in (None, ""):
                return None
            if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
                raise InvalidArgument(f"{key} must be an absolute path")
            return value

        log = params.get("log")
        log_config: LogConfig | None = None
        if log:
            if isinstance(log, dict):
                max_size = int(log.get("max_size", DEFAULT_LOG_MAX_SIZE))
                max_files = int(log.get("max_files", DEFAULT_LOG_MAX_FILES))
                if max_size < 4096 or not 1 <= max_files <= 1000:
                    raise InvalidArgument("log max_size must be >= 4096 and max_files 1..1000")
                log_config = LogConfig(max_size, max_files)
            else:
                log_config = LogConfig()
        stdout = params.get("stdout")
        append_to: str | None = None
        logger: LoggerCommand | None = None
        if isinstance(stdout, str) and stdout and not os.path.isabs(stdout):
            # Not a FIFO's path (always absolute): a URI, as containerd's shim reads it.
            append_to, logger = parse_output_uri(stdout)
            stdout_value: str | None = stdout
            stderr_value = params.get("stderr") or None
            if not isinstance(stderr_value, (str, type(None))):
                raise InvalidArgument("stderr must be a string")
        else:
            stdout_value, stderr_value = path("stdout"), path("stderr")
        return cls(
            stdin=path("stdin"),
            stdout=stdout_value,
            stderr=stderr_value,
            terminal=bool(params.get("terminal", False)),
            log=log_config,
            append_to=append_to,
            logger=logger,
        )

    def to_params(self) -> dict[str, object]:
        return {
            "stdin": self.stdin,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "terminal": self.terminal,
            "log": (
                {"max_size": self.log.max_size, "max_files": self.log.max_files}
                if self.log
                else None
            ),
        }


def parse_output_uri(uri: str) -> tuple[str | None, LoggerCommand | None]:
    """A `file:` or `binary:` stdout: (the file, None) or (None, the logger). The URI must
    name an absolute path and no host: `file:///var/log/x`, or `file:/var/log/x` (Go's
    url.Parse, which containerd's shim uses, reads both the same)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError as exc:
        raise InvalidArgument(f"stdout URI {uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidArgument(
            f"stdout {uri!r} is neither an absolute FIFO path nor a file:// or binary:// URI"
        )
    if scheme not in ("file", "binary"):
        raise InvalidArgument(
            f"stdout URI {uri!r}: unknown scheme {parts.scheme!r} (fifo paths, file:// "
            "and binary:// are supported)"
        )
    path = urllib.parse.unquote(parts.path)
    if parts.netloc or not os.path.isabs(path) or "\0" in path:
        raise InvalidArgument(
            f"stdout URI {uri!r} must name an absolute path and no host ({scheme}:///path)"
        )
    if scheme == "file":
        if parts.query:
            raise InvalidArgument(f"stdout URI {uri!r}: file:// takes no query")
        return path, None
    args: dict[str, str] = {}  # a key once, with its first value (containerd: vs[0])
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise InvalidArgument(f"stdout URI {uri!r}: {exc}") from None
    for key, value in pairs:
        if "\0" in key or "\0" in value:
            raise InvalidArgument(f"stdout URI {uri!r}: NUL in its query")
        args.setdefault(key, value)
    return None, LoggerCommand(path, tuple(a for pair in args.items() for a in pair))


def open_fifo(path: str, flags: int) -> int:
    """Open `path`, which must be a FIFO; never blocks."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        raise InvalidArgument(f"FIFO {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot open FIFO {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidArgument(f"{path} is not a FIFO")
    return fd


def open_output_fifo(path: str) -> tuple[int, int]:
    """An output FIFO's (write end, the shim's own read end): the read end first, so that
    neither open blocks and no write ever fails with EPIPE; two descriptors, not one
    O_RDWR, so that FifoSink.reader_present can let go of its reading alone."""
    hold = open_fifo(path, os.O_RDONLY)
    try:
        return open_fifo(path, os.O_WRONLY), hold
    except BaseException:
        os.close(hold)
        raise


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


# --- sinks ---------------------------------------------------------------------------


class Sink:
    """Somewhere output goes. Never blocks the loop."""

    name: str = "sink"

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def splice_from(self, fd: int) -> int | None:
        """Move bytes from pipe `fd` directly; None when it cannot now. 0 means EOF."""
        return None

    def congested(self) -> bool:
        return False

    def close(self) -> Future[None]:
        raise NotImplementedError

    def stats(self) -> dict[str, int]:
        return {}


class FifoSink(Sink):
    """A client's FIFO (or a logger's pipe), with the bounded buffer and stall rule of the
    module docstring. `fd` is written to and closed at the end. For a FIFO, `hold` is the
    shim's own read end of it (open_output_fifo), so that no write ever fails with EPIPE,
    and through which the sink can tell a reader that pauses from one that is gone
    (reader_present). A pipe's write end can fail (its reader died): the sink then drops
    what comes, counted."""

    # The sinks holding each FIFO, by (st_dev, st_ino): a client may name one FIFO for two
    # streams (or two processes), and the shim's other hold would pass for a reader.
    _holders: ClassVar[dict[tuple[int, int], set[FifoSink]]] = {}

    def __init__(
        self,
        loop: Loop,
        name: str,
        fd: int,
        *,
        buffer_limit: int,
        stall_timeout: float,
        on_decongested: Callable[[], None],
        hold: int = -1,
    ) -> None:
        self.name = name
        self._loop = loop
        self._fd = fd
        self._hold = hold
        self._key = (0, 0)
        if hold >= 0:
            st = os.fstat(fd)
            self._key = (st.st_dev, st.st_ino)
            self._holders.setdefault(self._key, set()).add(self)
        self._buffer = bytearray()
        self._limit = buffer_limit
        self._stall_timeout = stall_timeout
        self._on_decongested = on_decongested
        self._dropping = False
        self._stall_timer: TimerHandle | None = None
        self._watching = False
        self._closing: Future[None] | None = None
        self.written = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            self.dropped += len(data)
            return
        if not self._buffer:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._broken(exc)
                self.dropped += len(data)
                return
            self.written += n
            data = data[n:]
            if not data:
                return
        room = self._limit - len(self._buffer)
        if self._dropping and room < len(data):
            self.dropped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self._buffer += data
        self._watch()

    def splice_from(self, fd: int) -> int | None:
        if self._buffer or self._fd < 0:
            return None
        try:
            n = os.splice(fd, self._fd, CHUNK, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._broken(exc)
            return None  # the pump reads it, and this sink counts it dropped
        self.written += n
        return n

    def _broken(self, exc: OSError) -> None:
        """A write failed for good (EPIPE: a logger that died): drop from here on, once
        logged, and close now so that a reader's end sees EOF."""
        log(f"write to {self.name} failed: {exc.strerror or exc}; its output is dropped")
        self.dropped += len(self._buffer)
        self._buffer.clear()
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        self._loop.forget_fd(self._fd)
        os.close(self._fd)
        self._fd = -1

    def congested(self) -> bool:
        return not self._dropping and len(self._buffer) >= self._limit

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._loop.add_writer(self._fd, self._flush)
        if self.congested() and self._stall_timer is None:
            self._stall_timer = self._loop.call_later(self._stall_timeout, self._stalled)

    def reader_present(self) -> bool:
        """Whether a process other than the shim holds the FIFO open for reading. The shim
        lets go of its own read ends of it for a moment and reopens the FIFO for writing
        without blocking, which fails (ENXIO) when nobody reads; then it takes its read
        ends again. Within one callback of the loop: nothing writes meanwhile, so no EPIPE
        and no EPOLLERR are seen. Always False for a logger's pipe (no `hold`)."""
        if self._hold < 0 or self._fd < 0:
            return False
        own = f"/proc/self/fd/{self._fd}"  # the same FIFO, whatever became of its path
        holders = [  # this loop's only: never another life's fd numbers (the zygote's)
            s for s in self._holders.get(self._key, ()) if s._hold >= 0 and s._loop is self._loop
        ]
        for sink in holders:
            os.close(sink._hold)
            sink._hold = -1
        try:
            os.close(os.open(own, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            present = True
        except OSError:
            present = False
        for sink in holders:
            try:
                sink._hold = os.open(own, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:  # EMFILE: a write may fail with EPIPE now (dropped)
                log(f"cannot hold {sink.name} open for reading again: {exc.strerror or exc}")
        return present

    def _release_hold(self) -> None:
        if self._hold >= 0:
            os.close(self._hold)
            self._hold = -1
        holders = self._holders.get(self._key)
        if holders is not None:
            holders.discard(self)
            if not holders:
                del self._holders[self._key]

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.congested():
            if self.reader_present():  # paused, not gone: backpressure, and a look later
                self._stall_timer = self._loop.call_later(self._stall_timeout, self._stalled)
                return
            log(
                f"nobody drained {self.name} for {self._stall_timeout}s: dropping output "
                f"beyond {self._limit} buffered bytes until its reader returns"
            )
            self._dropping = True
            self._on_decongested()

    def _flush(self) -> None:
        was_congested = self.congested()
        progressed = False
        while self._buffer:
            try:
                n = os.write(self._fd, self._buffer[:CHUNK])
            except BlockingIOError:
                break
            except OSError as exc:
                self._broken(exc)
                break
            del self._buffer[:n]
            self.written += n
            progressed = True
        if progressed:
            self._dropping = False
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            if self.congested():  # still full: the reader must keep draining, or we drop
                self._stall_timer = self._loop.call_later(self._stall_timeout, self._stalled)
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            self._watching = False
            if self._closing is not None:
                self._await_reader()
        if was_congested and not self.congested():
            self._on_decongested()

    def close(self, flush_timeout: float = 2.0) -> Future[None]:
        if self._closing is None:
            self._closing = Future()
            if not self._buffer:
                self._await_reader()
            else:
                self._loop.call_later(flush_timeout, self._flush_timed_out, flush_timeout)
        return self._closing

    def _flush_timed_out(self, flush_timeout: float) -> None:
        """What is still buffered `flush_timeout` after close(): kept for a reader that is
        there (looked at again after as long), dropped when none is."""
        if self._fd < 0 or not self._buffer:
            return  # closed, or flushed meanwhile: _await_reader closes it
        if self.reader_present():
            self._loop.call_later(flush_timeout, self._flush_timed_out, flush_timeout)
            return
        self._finish_close()

    def _unread(self) -> int:
        """Bytes in the FIFO its reader has not taken yet (FIONREAD on our own end)."""
        try:
            return int.from_bytes(fcntl.ioctl(self._fd, FIONREAD, bytes(4)), "little")
        except OSError:
            return 0

    def _await_reader(self, last: int = -1, since: float = 0.0) -> None:
        """Close once the reader has taken what the FIFO holds. Closing our end first would
        lose it if the reader closes too before reading: containerd's Go client closes its
        FIFOs as soon as it sees the exit (Task.Delete), and the exit follows this close.
        A reader that takes nothing for READER_STALL seconds is not waited for."""
        if self._fd < 0:
            self._finish_close()
            return
        unread = self._unread()
        now = time.monotonic()
        if unread == 0:
            self._finish_close()
            return
        if unread != last:
            since = now
        elif now - since >= READER_STALL:
            log(f"{unread} bytes left unread in {self.name} by its reader; closing it")
            self._finish_close()
            return
        self._loop.call_later(READER_POLL, self._await_reader, unread, since)

    def _finish_close(self) -> None:
        if self._fd >= 0:
            if self._buffer:
                self.dropped += len(self._buffer)
                self._buffer.clear()
            self._loop.forget_fd(self._fd)
            os.close(self._fd)  # the last writer gone: the reader sees EOF
            self._fd = -1
        self._release_hold()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        assert self._closing is not None
        self._closing.set_result(None)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped, "buffered": len(self._buffer)}


class AppendSink(Sink):
    """A file that output is appended to (`file://` stdio): stdout and stderr each have
    their own descriptor on it, O_APPEND, so their writes interleave whole. A regular file
    never applies backpressure; a failing disk drops output, counted and logged once.
    (No splice: it refuses O_APPEND files.)"""

    def __init__(self, path: str) -> None:
        self.name = path
        self.written = 0
        self.dropped = 0
        self._failed = False
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            self._fd = os.open(
                path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
                0o644,
            )  # O_NONBLOCK: a FIFO at that path must not block the open (refused below)
        except OSError as exc:
            raise InvalidArgument(f"cannot open {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise InvalidArgument(f"{path} is not a regular file")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._fd >= 0:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if not self._failed:
                    log(f"append to {self.name}: {exc.strerror or exc}; output is dropped")
                    self._failed = True
                break
            self._failed = False
            self.written += n
            view = view[n:]
        self.dropped += len(view)

    def close(self) -> Future[None]:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped}


class LogSink(Sink):
    """A size-bounded, rotated log file: `path`, `path.1` ... `path.<max_files-1>`.

    Never blocks and never raises into the pump: a failing disk (ENOSPC, EMFILE) drops
    output, counted and logged once, and the file is reopened on the next write."""

    def __init__(self, path: str, config: LogConfig) -> None:
        self.name = path
        self._config = config
        self._fd = -1
        self._size = 0
        self._closed = False
        self.written = 0
        self.dropped = 0
        self._error_logged = False
        self._open()
        if self._fd < 0:
            raise OSError(f"cannot open log {path}")

    def _open(self) -> None:
        try:
            # Not O_APPEND: splice(2) into an O_APPEND file fails with EINVAL, and the shim
            # is the file's only writer; it starts at the end of what is there.
            self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            self._fd = -1
            self._fail(exc)

    def _rotate(self) -> None:
        fd, self._fd = self._fd, -1  # never keep a closed descriptor's number around
        os.close(fd)
        keep = self._config.max_files
        try:
            if keep <= 1:
                os.unlink(self.name)
            else:
                for index in range(keep - 1, 0, -1):
                    src = self.name if index == 1 else f"{self.name}.{index - 1}"
                    try:
                        os.replace(src, f"{self.name}.{index}")
                    except FileNotFoundError:
                        pass
        except OSError as exc:
            self._fail(exc)
        self._open()

    def _account(self, n: int) -> None:
        self._size += n
        self.written += n
        if self._size >= self._config.max_size:
            self._rotate()

    def _room(self) -> int:
        """Bytes the current file may still take: a write never crosses `max_size` (it is
        cut there, and the rest goes to the next file); was up to one 256 KiB splice
        over, 1 MiB files reaching 1.25 MB."""
        if self._size >= self._config.max_size:  # a file that was full when (re)opened
            self._rotate()
        return max(self._config.max_size - self._size, 1)  # a failed rotation: go on

    def _fail(self, exc: OSError) -> None:
        if not self._error_logged:
            log(f"log {self.name}: {exc.strerror or exc}; output is being dropped")
            self._error_logged = True

    def _ready(self) -> bool:
        if self._fd < 0 and not self._closed:
            self._open()
        return self._fd >= 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._ready():
                self.dropped += len(view)
                return
            room = self._room()  # first: it may rotate, which replaces self._fd
            try:
                n = os.write(self._fd, view[:room])
            except OSError as exc:  # ENOSPC and friends: never block the container
                self.dropped += len(view)
                self._fail(exc)
                return
            self._error_logged = False
            view = view[n:]
            self._account(n)

    def splice_from(self, fd: int) -> int | None:
        room = self._room() if self._ready() else 0  # first: it may rotate (a new fd)
        if not self._ready():
            return None
        try:
            n = os.splice(fd, self._fd, min(CHUNK, room), flags=SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                self._fail(exc)
            return None
        self._account(n)
        return n

    def close(self) -> Future[None]:
        self._closed = True
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "dropped": self.dropped}


# --- pumps -----------------------------------------------------------------------------


class OutputPump:
    """Moves one output stream (a pipe's read end, or the pty master) into its sinks."""

    def __init__(self, loop: Loop, source: int, sinks: list[Sink], *, is_pty: bool) -> None:
        self._loop = loop
        self._source = source
        self._sinks = sinks
        self._is_pty = is_pty
        self._paused = False
        self._eof = False
        self.done: Future[None] = Future()
        set_nonblocking(source)
        loop.add_reader(source, self._on_readable)

    def resume(self) -> None:
        if self._paused and not self._eof and not any(s.congested() for s in self._sinks):
            self._paused = False
            self._loop.add_reader(self._source, self._on_readable)
            self._loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        if self._eof or self._paused:
            return
        sinks = self._sinks
        for _ in range(READS_PER_WAKEUP):
            if len(sinks) == 1 and not self._is_pty:
                try:
                    n = sinks[0].splice_from(self._source)
                except OSError as exc:
                    log(f"splice failed: {exc}")
                    n = None
                if n == 0:
                    self._finish()
                    return
                if n is not None:
                    continue
            try:
                data = os.read(self._source, CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: pty with every slave closed
                    log(f"read of container output failed: {exc}")
                self._finish()
                return
            if not data:
                self._finish()
                return
            for sink in sinks:
                sink.write(data)
            if any(sink.congested() for sink in sinks):
                self._paused = True
                self._loop.remove_reader(self._source)
                return

    def _finish(self) -> None:
        if self._eof:
            return
        self._eof = True
        self._loop.forget_fd(self._source)
        os.close(self._source)
        closing = [sink.close() for sink in self._sinks]
        all_done(closing).add_done_callback(lambda _: self.done.set_result(None))

    def abandon(self, deadline: float = 0.0) -> None:
        """Stop now (the drain timed out, or the shim shuts down): what the source already
        holds is still passed on (bounded, the sinks count what they must drop), then the
        source and the sinks are closed. A process that left a writer of its stdout alive
        (a daemonized grandchild) must not cost the output it wrote before it exited. A
        pipe's relay may still be moving what the container's pipe holds: an empty read
        waits for it, up to ABANDON_IDLE without a byte and until `deadline` (monotonic;
        ABANDON_WAIT from now if not given), the loop waiting meanwhile; at most
        ABANDON_BYTES are passed on."""
        if self._eof:
            return
        deadline = deadline or time.monotonic() + ABANDON_WAIT
        idle_since: float | None = None
        left = ABANDON_BYTES
        while left > 0:
            try:
                data = os.read(self._source, min(CHUNK, left))
            except BlockingIOError:
                now = time.monotonic()
                idle_since = idle_since or now
                if self._is_pty or now - idle_since >= ABANDON_IDLE or now >= deadline:
                    break
                time.sleep(0.001)  # the relay thread runs meanwhile
                continue
            except OSError:  # EIO (pty closed)
                break
            if not data:
                break
            left -= len(data)
            idle_since = None
            for sink in self._sinks:
                sink.write(data)
        self._finish()


class InputPump:
    """Moves a client's stdin FIFO (already open, read end) into the container's stdin
    (a pipe's write end, or the pty master). It ends at the FIFO's EOF, or at `finish`."""

    def __init__(self, loop: Loop, fifo: int, target: int, *, close_target: bool) -> None:
        self._loop = loop
        self._fifo = fifo
        self._target = target
        self._close_target = close_target
        self._pending = b""
        self._closed = False
        self._finishing = False
        if close_target:
            set_nonblocking(target)
        loop.add_reader(self._fifo, self._on_readable)

    def finish(self) -> None:
        """The client is done (CloseIO): pass on what the FIFO holds now, then end."""
        self._finishing = True
        if not self._pending and not self._closed:
            self._on_readable()

    def _on_readable(self) -> None:
        if self._pending:
            return
        try:
            data = os.read(self._fifo, 64 * 1024)
        except BlockingIOError:
            if self._finishing:  # all that was written before CloseIO has gone on
                self.close()
            return
        except OSError:
            data = b""
        if not data:  # no writer left: stdin EOF
            self.close()
            return
        self._pending = data
        self._drain()

    def _drain(self) -> None:
        while self._pending:
            try:
                n = os.write(self._target, self._pending)
            except BlockingIOError:
                self._loop.remove_reader(self._fifo)
                self._loop.add_writer(self._target, self._drain)
                return
            except OSError:  # the container closed its stdin
                self._pending = b""
                self.close()
                return
            self._pending = self._pending[n:]
        self._loop.remove_writer(self._target)
        if self._closed:
            return
        if self._finishing:
            self._on_readable()  # on until the FIFO is empty (at most its 64 KiB more)
        else:
            self._loop.add_reader(self._fifo, self._on_readable)

    def close(self) -> None:
        """Stop forwarding; for a pipe, close the container's stdin so it sees EOF."""
        if self._closed:
            return
        self._closed = True
        self._loop.forget_fd(self._fifo)
        os.close(self._fifo)
        if self._close_target:
            self._loop.forget_fd(self._target)
            os.close(self._target)


class ProcessIO:
    """All stdio plumbing of one process (a container's init or an exec).

    Every client FIFO is opened when the process is registered, before the runtime runs:
    a bad path fails the request and starts nothing, and a client's own blocking open of
    its end returns at once, whatever the order of its calls.

    A container's init (`hold_stdin`) has its stdin FIFO also held open for writing, as
    containerd's shim does, until the client's CloseIO (close_stdin): a client that goes
    away (`ctr run -d`, a CLI detaching) does not end the container's stdin, and a client
    attaching later can write to it. An exec's is not held, as containerd's is not: its
    stdin ends when its client closes its end of the FIFO (`echo x | ctr tasks exec ...
    cat`, which calls no CloseIO), or at CloseIO. Kernel fact: a FIFO's read end polls
    neither readable nor HUP until a writer has opened it, so the exec does not see EOF
    before its client connects; the client can only open its end after ours is open."""

    def __init__(
        self,
        loop: Loop,
        config: IOConfig,
        log_prefix: str,
        *,
        reaper: Reaper | None = None,
        logger_env: dict[str, str] | None = None,
        on_logger: Callable[[Logger], None] | None = None,
        hold_stdin: bool = True,
    ) -> None:
        self._loop = loop
        self.config = config
        self._log_prefix = log_prefix
        self._runtime_fds: list[int] = []
        self._relays: list[tuple[int, int, str]] = []  # (source, target, name), not started
        self._stdin_fifo = -1
        self._stdin_hold = -1  # our write end of the stdin FIFO, until CloseIO
        self._stdin: InputPump | None = None
        self._pumps: list[OutputPump] = []
        self._sinks: list[Sink] = []
        self._stdout_sinks: list[Sink] = []
        self._stderr_sinks: list[Sink] = []
        self.logger: Logger | None = None
        self._logger_fds: list[int] = []  # the logger's write ends no sink has taken yet
        self.console: int | None = None
        self._held_terminal = -1  # our own fd of the terminal's process side (attach_console)
        self.stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        self._devnull = -1
        self._closed = False
        try:
            if config.stdin:
                self._stdin_fifo = open_fifo(config.stdin, os.O_RDONLY)
                if hold_stdin:
                    self._stdin_hold = open_fifo(config.stdin, os.O_WRONLY)
            if config.logger is not None:
                if reaper is None:
                    raise InvalidArgument("binary:// stdio needs the shim's reaper")
                self.logger = Logger(loop, reaper, config.logger, logger_env or {})
                if on_logger is not None:  # tracked from its start, whatever follows
                    on_logger(self.logger)
                stdout_w, stderr_w = self._logger_fds = list(self.logger.take_write_ends())
                self._stdout_sinks = self._sinks_for("stdout", None, stdout_w)
                if not config.terminal:  # else fd 4 stays open, silent, until close()
                    self._stderr_sinks = self._sinks_for("stderr", None, stderr_w)
            else:
                self._stdout_sinks = self._sinks_for("stdout", config.stdout)
                if not config.terminal:  # a terminal merges stderr into its one stream
                    self._stderr_sinks = self._sinks_for("stderr", config.stderr)
            if not config.terminal:
                self._prepare_pipes()
        except BaseException:
            self.close()
            raise

    def _sinks_for(self, stream: str, fifo: str | None, pipe: int = -1) -> list[Sink]:
        """A stream's sinks: its FIFO (or the logger's pipe, or the file:// file), and the
        shim's own log file in log mode. Each is registered at once: close() releases it."""
        sinks: list[Sink] = []
        target: tuple[str, int] | None = None
        hold = -1  # the shim's read end of a FIFO (none for a logger's pipe)
        if pipe >= 0:
            assert self.logger is not None
            target = (f"{self.logger.command.path} ({stream})", pipe)
        elif self.config.append_to is not None:
            sinks.append(AppendSink(self.config.append_to))
            self._sinks.append(sinks[-1])
        elif fifo:
            write_end, hold = open_output_fifo(fifo)
            target = (fifo, write_end)
        if target is not None:
            sinks.append(
                FifoSink(
                    self._loop,
                    *target,
                    buffer_limit=self.config.fifo_buffer,
                    stall_timeout=self.config.stall_timeout,
                    on_decongested=self._resume_pumps,
                    hold=hold,
                )
            )
            self._sinks.append(sinks[-1])
            if pipe in self._logger_fds:
                self._logger_fds.remove(pipe)  # the sink closes it now
        if self.config.log is not None:
            sinks.append(LogSink(f"{self._log_prefix}{stream}.log", self.config.log))
            self._sinks.append(sinks[-1])
        return sinks

    def ready(self) -> Future[None]:
        """Done when the process may start: its logging binary (if any) is ready."""
        if self.logger is not None:
            return self.logger.ready
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def logger_stopped(self) -> Future[None]:
        """Done once the logging binary (if any) has exited, which close() asks of it."""
        if self.logger is not None:
            return self.logger.exited
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def kill_logger(self) -> None:
        if self.logger is not None:
            self.logger.kill()

    def _prepare_pipes(self) -> None:
        """The container-side pipes, whose other ends the runtime hands to the process."""
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stdin_fd = stdout_fd = stderr_fd = self._devnull
        # Each stream is two pipes: the container's, and the shim's own that the loop
        # reads or writes; a relay thread copies between them (relay.py says why).
        if self._stdin_fifo >= 0:
            r, w = make_pipe()
            self._runtime_fds.append(r)
            stdin_fd = r
            own_r, own_w = make_pipe()
            self._relays.append((own_r, w, f"{self._log_prefix}stdin"))
            fifo, self._stdin_fifo = self._stdin_fifo, -1
            self._stdin = InputPump(self._loop, fifo, own_w, close_target=True)
        for stream, sinks in (("stdout", self._stdout_sinks), ("stderr", self._stderr_sinks)):
            if not sinks:
                continue
            r, w = make_pipe()
            self._runtime_fds.append(w)
            own_r, own_w = make_pipe()
            self._relays.append((r, own_w, f"{self._log_prefix}{stream}"))
            # The pump owns its read end from here on: close() releases it on any failure.
            self._pumps.append(OutputPump(self._loop, own_r, sinks, is_pty=False))
            if stream == "stdout":
                stdout_fd = w
            else:
                stderr_fd = w
        self.stdio = (stdin_fd, stdout_fd, stderr_fd)

    def attach_console(self, master: int) -> None:
        """Terminal mode: the pty master carries stdin and the merged stdout/stderr.

        The shim holds the terminal's other side open too (TIOCGPTPEER) until the process
        exits. Kernel fact: once no fd of the terminal is open, its master reads EIO and
        polls HUP. A process that closes its terminal and opens it again later (systemd,
        `exec >/dev/null` then `exec >/dev/console`) ended its output for good, and input
        queued for it kept the loop spinning on HUP; held, neither happens."""
        if self._closed:  # given up meanwhile (a forced delete during `runc exec`)
            os.close(master)
            return
        self.console = master
        set_nonblocking(master)  # stdin is written to it: never a blocking write on the loop
        try:
            self._held_terminal = fcntl.ioctl(
                master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC
            )
        except OSError as exc:  # a kernel before 4.13: the terminal is not held
            log(f"cannot hold the terminal open (TIOCGPTPEER): {exc}")
        if self._stdout_sinks:
            dup = os.dup(master)  # the pump closes its fd at EOF; resize keeps the other
            os.set_inheritable(dup, False)
            self._pumps.append(OutputPump(self._loop, dup, self._stdout_sinks, is_pty=True))
        if self._stdin_fifo >= 0:
            fifo, self._stdin_fifo = self._stdin_fifo, -1
            self._stdin = InputPump(self._loop, fifo, master, close_target=False)

    def process_exited(self) -> None:
        """Let the terminal go: its master reads EIO (the output's end) once the last
        process holding it is gone too."""
        if self._held_terminal >= 0:
            os.close(self._held_terminal)
            self._held_terminal = -1

    def runtime_spawned(self, *, ran: bool = True) -> None:
        """The runtime has the container-side ends now: drop ours so EOF can happen, and
        start the relays, if the process `ran` (a failed runtime leaves them to close();
        the zygote's rehearsal, which fails on purpose, thus stays single-threaded).
        Never before the rootfs is mounted: with a thread alive, mount.py mounts from a
        child process, whose wait would race the shim's own reaper."""
        self._drop_runtime_ends()
        if not ran:
            return
        relays, self._relays = self._relays, []
        for index, (source, target, name) in enumerate(relays):
            try:
                start_relay(source, target)
            except Exception as exc:  # no thread to be had: these streams end here
                log(f"cannot start the relay of {name}: {exc}; its stream is closed")
                for source_left, target_left, _ in relays[index + 1 :]:
                    os.close(source_left)
                    os.close(target_left)
                return

    def _drop_runtime_ends(self) -> None:
        for fd in self._runtime_fds:
            os.close(fd)
        self._runtime_fds.clear()
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    def close_stdin(self, *, now: bool = False) -> None:
        """CloseIO: what the client wrote before it still reaches the container, then EOF
        (`now`: at once, the process being gone)."""
        if self._stdin_hold >= 0:
            os.close(self._stdin_hold)
            self._stdin_hold = -1
        if self._stdin is not None:
            if now:
                self._stdin.close()
            else:
                self._stdin.finish()
        elif self._stdin_fifo >= 0:
            os.close(self._stdin_fifo)
            self._stdin_fifo = -1

    def _resume_pumps(self) -> None:
        for pump in self._pumps:
            pump.resume()

    def drained(self) -> Future[None]:
        """Done when every output stream reached EOF and its sinks are closed."""
        return all_done([pump.done for pump in self._pumps])

    def stats(self) -> dict[str, dict[str, int]]:
        return {sink.name: sink.stats() for sink in self._sinks}

    def close(self) -> None:
        """Release everything now (the process is gone and its output drained or given up)."""
        if self._closed:
            return
        self._closed = True
        self._drop_runtime_ends()
        for source, target, _ in self._relays:  # never started (the runtime failed)
            os.close(source)
            os.close(target)
        self._relays.clear()
        self.close_stdin(now=True)
        deadline = time.monotonic() + ABANDON_WAIT  # one wait for all of its streams
        for pump in self._pumps:
            pump.abandon(deadline)
        closed = [sink.close() for sink in self._sinks]
        for fd in self._logger_fds:
            os.close(fd)
        self._logger_fds.clear()
        if self.logger is not None:
            # Its input ends once every sink has flushed and closed its pipe: only then does
            # its grace before SIGTERM start; a reader that keeps taking a trickle is not
            # waited for past LOGGER_FLUSH_BOUND (a delete must end: containerd's ~12 s).
            logger = self.logger
            all_done(closed).add_done_callback(lambda _: logger.stop())
            self._loop.call_later(LOGGER_FLUSH_BOUND, logger.stop)
        self.process_exited()
        if self.console is not None:
            self._loop.forget_fd(self.console)
            try:
                os.close(self.console)
            except OSError:
                pass
            self.console = None
