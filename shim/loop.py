"""The shim's one event loop: epoll, timers, and tiny coroutines. No trio; the only
threads are the relays (relay.py), which never touch the loop.

Why not trio or asyncio here: both cost 10-15 MiB of private memory per process (measured),
and a shim exists once per container. This loop is what a shim needs and nothing more:
fd readiness callbacks, timers, and `async def` handlers that await `Future`s (a runtime
invocation's exit, a process exit, a timer), so request handlers read top to bottom.

Facts about epoll that bite here:
- A FIFO opened O_RDONLY with no writer ever connected polls as *not* readable; after the
  last writer closes it polls EPOLLHUP forever, so a reader must unregister at EOF.
- A pty master reports EPOLLHUP (and read() fails with EIO) once every slave fd is closed;
  data may still be buffered, so read until EIO before giving up.
- Regular files cannot be registered (EPERM); they are always "ready".
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Callback = Callable[[], None]

_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
_WRITE = select.EPOLLOUT | select.EPOLLERR


# A shim lives as long as its container (months, maybe): its own log (`<bundle>/shim.log`,
# not the container's output) is rotated at this size, one older file kept (`.1`).
SHIM_LOG_MAX = 1 << 20
_log_path = ""  # the file fd 2 appends to, when this process keeps it bounded (log_to)


def log(message: str) -> None:
    """Write one line to the shim's log (its stderr). The logging module is not imported:
    it pulls in threading and more, for every container."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    try:
        if _log_path and os.fstat(2).st_size >= SHIM_LOG_MAX and not _rotate():
            return  # full, and no new file now (no descriptor left): dropped, not grown
        os.write(2, f"{stamp} berth-shim[{os.getpid()}] {message}\n".encode(errors="replace"))
    except OSError:
        pass


def _rotate() -> bool:
    """`path` becomes `path.1` and fd 2 a new `path`; False if the new one cannot be
    opened. A shim out of descriptors (EMFILE) renamed its log, failed to open the next
    one, and went on appending to `path.1` without bound: 7.5 MB in 3 s on the state dir
    (a tmpfs: memory) while it logged each failed accept, and never rotated again, since
    `path` no longer existed to be renamed. Each line retries until the open succeeds."""
    try:
        os.replace(_log_path, f"{_log_path}.1")
    except FileNotFoundError:
        pass  # renamed by a rotation whose open failed: fd 2 is `path.1` already
    try:
        log_to(_log_path)
    except OSError:
        return False
    return True


def ensure_std_fds() -> None:
    """Give each of fds 0, 1 and 2 that is closed /dev/null. A process started with one of
    them closed (`berthd 2>&-`, a supervisor that closes stdio) hands that number to the
    next file or pipe it opens, which the code that takes 0, 1 and 2 for stdio then writes
    to or replaces: a zygote with closed stdio made every shim dup2 /dev/null over its own
    readiness pipe, so no container could start. Call it first thing."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: `fd` or below
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def log_to(path: str) -> None:
    """Make fd 2 (this process's log lines, tracebacks, what its children inherit) append
    to `path`, and keep that file bounded from now on: past SHIM_LOG_MAX bytes it becomes
    `path.1` (replacing the one before) and a new `path` begins, so a shim never keeps
    more than about twice the bound. Checked at each of log()'s lines."""
    global _log_path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 2)  # inheritable, as stderr is
    os.close(fd)
    _log_path = path


class Future(Generic[T]):
    """A result that will exist later. `await` it inside a Task."""

    __slots__ = ("_callbacks", "_done", "_exc", "_result")

    def __init__(self) -> None:
        self._done = False
        self._result: T | None = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        if not self._done:
            raise RuntimeError("future is not done")
        if self._exc is not None:
            raise self._exc
        return self._result  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        return self._exc

    def set_result(self, value: T) -> None:
        if self._done:
            return
        self._done, self._result = True, value
        self._fire()

    def set_exception(self, exc: BaseException) -> None:
        if self._done:
            return
        self._done, self._exc = True, exc
        self._fire()

    def add_done_callback(self, cb: Callable[[Future[T]], None]) -> None:
        if self._done:
            cb(self)
        else:
            self._callbacks.append(cb)

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception as exc:  # a broken callback must not break the others
                log(f"future callback failed: {exc!r}")

    def __await__(self) -> Generator[Future[T], None, T]:
        if not self._done:
            yield self
        return self.result()


def all_done(futures: list[Future[Any]]) -> Future[None]:
    """Done once every one of `futures` is (whatever their outcome)."""
    out: Future[None] = Future()
    remaining = len(futures)
    if remaining == 0:
        out.set_result(None)
        return out

    def one(_: Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            out.set_result(None)

    for fut in futures:
        fut.add_done_callback(one)
    return out


class Task(Future[T]):
    """Drives a coroutine: each `await future` suspends it until that future is done."""

    __slots__ = ("_coro", "_loop", "name")

    def __init__(self, loop: Loop, coro: Coroutine[Any, Any, T], name: str = "") -> None:
        super().__init__()
        self._loop = loop
        self._coro = coro
        self.name = name or getattr(coro, "__qualname__", "task")
        loop.call_soon(self._step, None, None)

    def _step(self, value: Any, exc: BaseException | None) -> None:
        try:
            yielded = self._coro.throw(exc) if exc is not None else self._coro.send(value)
        except StopIteration as stop:
            self.set_result(stop.value)
        except Exception as error:
            self.set_exception(error)
            if not self._callbacks:
                log(f"task {self.name} failed: {error!r}")
        else:
            if not isinstance(yielded, Future):
                self._loop.call_soon(
                    self._step, None, TypeError(f"task awaited a non-Future {yielded!r}")
                )
                return
            yielded.add_done_callback(self._wakeup)

    def _wakeup(self, fut: Future[Any]) -> None:
        exc = fut.exception()
        if exc is not None:
            self._loop.call_soon(self._step, None, exc)
        else:
            self._loop.call_soon(self._step, fut._result, None)


class TimerHandle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """epoll + a ready queue + a timer heap. Callbacks run one at a time, in order."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._ready: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._stopping = False

    # -- fd readiness

    def add_reader(self, fd: int, cb: Callback) -> None:
        self._readers[fd] = cb
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, cb: Callback) -> None:
        self._writers[fd] = cb
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget_fd(self, fd: int) -> None:
        """Drop every callback of `fd`; call before closing it."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    def _update(self, fd: int) -> None:
        mask = (_READ if fd in self._readers else 0) | (_WRITE if fd in self._writers else 0)
        try:
            if mask:
                try:
                    self._epoll.modify(fd, mask)
                except FileNotFoundError:
                    self._epoll.register(fd, mask)
            else:
                self._epoll.unregister(fd)
        except (FileNotFoundError, OSError):
            pass

    # -- scheduling

    def call_soon(self, cb: Callable[..., None], *args: Any) -> None:
        self._ready.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., None], *args: Any) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay, cb, args)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def create_task(self, coro: Coroutine[Any, Any, T], name: str = "") -> Task[T]:
        return Task(self, coro, name)

    def sleep(self, delay: float) -> Future[None]:
        fut: Future[None] = Future()
        self.call_later(delay, fut.set_result, None)
        return fut

    def timeout(self, fut: Future[T], delay: float) -> Future[T]:
        """A future with `fut`'s outcome, or TimeoutError after `delay` seconds."""
        out: Future[T] = Future()
        timer = self.call_later(delay, lambda: out.set_exception(TimeoutError()))

        def done(f: Future[T]) -> None:
            timer.cancel()
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(f._result)  # type: ignore[arg-type]

        fut.add_done_callback(done)
        return out

    # -- running

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        while not self._stopping:
            self.run_once()

    def run_once(self) -> None:
        timeout = self._next_timeout()
        try:
            events = self._epoll.poll(timeout)
        except InterruptedError:
            events = []
        for fd, mask in events:
            if mask & (select.EPOLLOUT | select.EPOLLERR) and fd in self._writers:
                self._ready.append((self._writers[fd], ()))
            if mask & _READ and fd in self._readers:
                self._ready.append((self._readers[fd], ()))
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self._ready.append((handle.callback, handle.args))
        # Run only what is ready now; callbacks scheduled meanwhile wait for the next turn,
        # so a busy stream cannot starve fd polling.
        for _ in range(len(self._ready)):
            cb, args = self._ready.popleft()
            try:
                cb(*args)
            except Exception as exc:
                log(f"callback {getattr(cb, '__qualname__', cb)!s} failed: {exc!r}")
                if os.environ.get("BERTH_SHIM_DEBUG"):
                    import traceback

                    traceback.print_exc(file=sys.stderr)

    def _next_timeout(self) -> float:
        if self._ready or self._stopping:
            return 0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return -1
        return max(0.0, self._timers[0][0] - time.monotonic())

    def close(self) -> None:
        self._epoll.close()


class Lock:
    """A FIFO mutual-exclusion lock for tasks of one Loop (`async with lock:`)."""

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._locked:
            fut: Future[None] = Future()
            self._waiters.append(fut)
            await fut  # ownership is handed over directly by __aexit__
        else:
            self._locked = True

    async def __aexit__(self, *exc: object) -> None:
        if self._waiters:
            self._waiters.popleft().set_result(None)
        else:
            self._locked = False
