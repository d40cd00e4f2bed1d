"""The log lines of berthd and berth-grpc: text (the default) or JSON.

`--log-format json` (or `log_format = "json"`) writes one JSON object per line, as
containerd's `--log-format json` does, for log pipelines that parse rather than grep:

    {"time": "2026-11-30T09:20:01.123456Z", "level": "info", "logger": "berthd.tasks",
     "msg": "task started", "namespace": "default", "container_id": "web"}

`namespace`, `container_id` and `exec_id` name what a line is about, when it is about a
task or one of its processes: given by `extra=about(...)` at the line, or by the context
of the trio (or asyncio) task that logs it (`set_about`: the tasks it spawns inherit it,
so a task's supervision logs with its ids). A pure leaf: berthd and berth-grpc share it.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Iterator

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("namespace", "container_id", "exec_id")

_about: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "berth_log_about", default=None
)


def about(namespace: str, container_id: str = "", exec_id: str = "") -> dict[str, str]:
    """The ids of a task or process, as `extra=` of a log call (empty ones left out)."""
    ids = (("namespace", namespace), ("container_id", container_id), ("exec_id", exec_id))
    return {key: value for key, value in ids if value}


def set_about(namespace: str, container_id: str = "", exec_id: str = "") -> None:
    """What every line the current task (and the tasks it spawns from now on) logs is
    about. Each API request and each recovery runs in a task of its own, so this ends
    with it."""
    _about.set(about(namespace, container_id, exec_id))


@contextlib.contextmanager
def scope(namespace: str, container_id: str = "", exec_id: str = "") -> Iterator[None]:
    """set_about for a block only: where one task serves several requests in turn."""
    token = _about.set(about(namespace, container_id, exec_id))
    try:
        yield
    finally:
        _about.reset(token)


def rfc3339(seconds: float) -> str:
    """UTC, to the microsecond, `Z`: what Go's RFC 3339 parsers and jq's take."""
    whole = int(seconds)
    micros = min(int((seconds - whole) * 1e6), 999_999)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{micros:06d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message or a traceback are
    escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, str] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = _about.get() or {}
        for key in FIELDS:
            value = getattr(record, key, None) or context.get(key)
            if isinstance(value, str) and value:
                doc[key] = value
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc)


PENDING_LIMIT = 1 << 20  # bytes of log lines kept while stderr's reader does not read
FLUSH_TIMEOUT = 1.0  # seconds an exit waits for the lines still pending


class StderrHandler(logging.Handler):
    """Log lines to a file descriptor (stderr) that must never stop the daemon.

    A pipe, a socket (the journal's stream) or a terminal blocks its writer while its
    reader does not read: `berthd 2>&1 | less` at a pause, a stalled log collector, a
    terminal's ^S. logging.StreamHandler then blocked berthd's one trio thread in write(2)
    for as long as the reader slept: no API call was answered and no shim served (berth-
    grpc, which shares this module, the same). Into such a descriptor the lines go through
    a thread of their own, up to PENDING_LIMIT bytes behind; past that they are dropped and
    counted, and the count is logged once the reader keeps up again. A regular file (or
    /dev/null) never waits on a reader and is written in place, as before, so a line is
    in the file when the call that logged it returns. A closed descriptor writes nothing,
    and a failing one (EPIPE: its reader exited) loses only what it could not take."""

    def __init__(self, fd: int | None, limit: int = PENDING_LIMIT) -> None:
        super().__init__()
        self.fd = fd
        self.limit = limit
        self.threaded = fd is not None and not _never_blocks(fd)
        self.dropped = 0  # lines dropped since the last notice
        self._pending: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._busy = False  # the writer thread holds lines it took from _pending
        self._cond = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._owner = 0  # the pid that started _writer: a forked child starts its own
        os.register_at_fork(after_in_child=self._forget_writer)

    def _forget_writer(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._writer = None
        self._busy = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.fd is None:
            return
        try:
            line = self.format(record)
        except Exception as exc:  # a bad format string must not fail the caller
            line = f"unformattable log record {record.msg!r}: {exc!r}"
        data = (line + "\n").encode(errors="replace")
        if not self.threaded:
            _write_all(self.fd, data)
            return
        with self._cond:
            if self.dropped and self._size + len(data) <= self.limit // 2:
                notice = f"{self.dropped} log line(s) dropped: stderr's reader did not read\n"
                self._append(notice.encode())
                self.dropped = 0
            if self.dropped or self._size + len(data) > self.limit:
                self.dropped += 1
                return
            self._append(data)
            if self._writer is None or self._owner != os.getpid():
                self._owner = os.getpid()
                self._writer = threading.Thread(target=self._write_pending, daemon=True)
                self._writer.name = "log writer"
                self._writer.start()
            self._cond.notify()

    def _append(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)

    def _write_pending(self) -> None:
        fd = self.fd
        assert fd is not None
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                chunk = []
                taken = 0
                while self._pending and taken < 65536:
                    data = self._pending.popleft()
                    chunk.append(data)
                    taken += len(data)
                self._size -= taken
                self._busy = True
            _write_all(fd, b"".join(chunk))
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def flush(self) -> None:
        """Wait a little (FLUSH_TIMEOUT at most) for the lines still pending: at exit."""
        if not self.threaded:
            return
        deadline = time.monotonic() + FLUSH_TIMEOUT
        with self._cond:
            while (self._pending or self._busy) and self._writer is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return


def _never_blocks(fd: int) -> bool:
    """A regular file or /dev/null: a write to it never waits for a reader."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return True
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone else made the file description non-blocking
            select.select([], [fd], [], 1.0)
        except OSError:
            return  # EPIPE, EBADF, ENOSPC, EIO: nowhere to say it; the daemon goes on


def _stderr_fd() -> int | None:
    """stderr's descriptor; None when berthd was started without one."""
    try:
        return sys.stderr.fileno() if sys.stderr is not None else None
    except (OSError, ValueError):
        return None


def setup(level: str, log_format: str) -> None:
    """Configure the root logger on stderr: `level` by name, `log_format` "text" or "json"
    (config.LOG_FORMATS, validated by the caller). In JSON, Python's warnings join the
    log, which no line of plain text may break."""
    handler = StderrHandler(_stderr_fd())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
