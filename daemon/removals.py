"""Containers being removed behind the client's back (`containers.delete` with
`background`): what `berth run --rm` asks for once its container exited, so that it
answers with the exit status instead of waiting for `runc delete`, the shim's exit and
the snapshot's removal.

The promise of `--rm` is kept: the container is marked durably (a file under
`<root>/removing/<namespace>/<id>`, on disk like the container's record, so a reboot
does not bring it back) before the answer, and from then on it is gone for clients (get,
list, update and the task calls answer as if it were). berthd then deletes its task and
the container itself; a `containers.create` (or an attachment) of the same ID waits for
that, and a delete of it waits too and answers as a delete of a container that was there.
A daemon that dies in between leaves the mark: the next one finishes the removal once
its tasks are recovered, as it finishes any interrupted delete; a daemon that hands over
stops its removals first (they run in a task group of their own). A removal that fails
keeps its mark and is tried again (by the next create or delete of that ID, and every
minute).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from berth.shim.fs import atomic_write, fsync_dir

log = logging.getLogger("berthd.removals")

Key = tuple[str, str]  # (namespace, container id)
Removal = Callable[[], Awaitable[None]]
RETRY_INTERVAL = 60.0  # seconds between attempts at removals that failed
TMP_SUFFIX = ".tmp"  # atomic_write's temporary file: never a mark


class Removals:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "removing")
        self._marked: set[Key] = set(self._found())
        self._done: dict[Key, trio.Event] = {}  # removals under way -> set when finished
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    def _found(self) -> list[Key]:
        """The marks on disk (a removal a previous daemon did not finish)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for namespace in os.listdir(self.dir):
                directory = os.path.join(self.dir, namespace)
                with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                    found += [
                        (namespace, name)
                        for name in os.listdir(directory)
                        if not name.endswith(TMP_SUFFIX)
                    ]
        return found

    # -- the task group removals run in

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the removals under way until `stop`."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._nursery = None
            self._stopped.set()

    async def stop(self) -> None:
        """Cancel the removals under way and wait until they have stopped (a runtime or
        file operation in a worker thread finishes first): before a handover, so that the
        successor is alone with the tasks. Their marks stay; the successor finishes them."""
        self._scope.cancel()
        if self._nursery is not None:
            await self._stopped.wait()

    # -- marks

    def pending(self) -> list[Key]:
        """Marked, and no removal under way."""
        return sorted(key for key in self._marked if key not in self._done)

    def hidden(self, namespace: str, container_id: str) -> bool:
        """Whether clients no longer see this container (it is being removed)."""
        return (namespace, container_id) in self._marked

    def in_namespace(self, namespace: str) -> list[str]:
        return sorted(cid for ns, cid in self._marked if ns == namespace)

    async def mark(self, namespace: str, container_id: str) -> None:
        """Durably: from here on the removal is finished even if berthd dies."""
        directory = os.path.join(self.dir, namespace)

        def write() -> None:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
                fsync_dir(self.dir)
                fsync_dir(os.path.dirname(self.dir))
            atomic_write(os.path.join(directory, container_id), b"")

        await trio.to_thread.run_sync(write)
        self._marked.add((namespace, container_id))

    def _unmark(self, key: Key) -> None:
        path = os.path.join(self.dir, *key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        self._marked.discard(key)

    # -- carrying them out

    def start(self, key: Key, remove: Removal) -> None:
        """Carry out a marked removal in the background (registered now: a create that
        comes before it runs waits for it too)."""
        if key in self._done or self._nursery is None:
            return  # under way already; or stopping (the successor finishes it)
        done = self._done[key] = trio.Event()
        self._nursery.start_soon(self._run, key, remove, done)

    async def run(self, key: Key, remove: Removal) -> None:
        """Carry out a marked removal now and wait for it (one under way is waited for
        instead: never two at once)."""
        while key in self._done:
            await self._done[key].wait()
        if key not in self._marked:
            return
        done = self._done[key] = trio.Event()
        await self._run(key, remove, done)

    async def _run(self, key: Key, remove: Removal, done: trio.Event) -> None:
        """`remove` deletes the task and the container; the mark goes once it succeeded.
        A failure is logged and the mark kept (retried later): it never ends berthd."""
        try:
            await remove()
            await trio.to_thread.run_sync(self._unmark, key)
        except Exception as exc:  # kept, reported, retried
            log.warning("removing container %s/%s: %s (will retry)", key[0], key[1], exc)
        finally:
            self._done.pop(key, None)
            done.set()

    async def settled(self, namespace: str, container_id: str) -> None:
        """Wait until no removal of this container is under way."""
        key = (namespace, container_id)
        while key in self._done:
            await self._done[key].wait()

    async def retry_failed(self, removal_of: Callable[[str, str], Removal]) -> None:
        """Every RETRY_INTERVAL: start the marked removals nobody is carrying out."""
        while True:
            await trio.sleep(RETRY_INTERVAL)
            for key in self.pending():
                self.start(key, removal_of(*key))
