"""Containers being removed behind the client's back (`containers.delete` with
`background`): what `berth run --rm` asks for once its container exited, so that it
answers with the exit status instead of waiting for `runc delete`, the shim's exit and
the snapshot's removal.

The promise of `--rm` is kept: the container is marked durably (a file under
`<root>/removing/<namespace>/<id>`, on disk like the container's record, so a reboot
does not bring it back) before the answer, and from then on it is gone for clients (get,
list and update answer as if it were). berthd then deletes its task and the container
itself; a `containers.create` of the same ID waits for that. A daemon that dies (or hands
over) in between leaves the mark: the next one finishes the removal at start, as it
finishes any interrupted delete.
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


class Removals:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "removing")
        self._marked: set[Key] = set(self._found())
        self._done: dict[Key, trio.Event] = {}  # removals under way -> set when finished

    def _found(self) -> list[Key]:
        """The marks on disk (a removal a previous daemon did not finish)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for namespace in os.listdir(self.dir):
                directory = os.path.join(self.dir, namespace)
                with contextlib.suppress(NotADirectoryError, FileNotFoundError):
                    found += [(namespace, name) for name in os.listdir(directory)]
        return found

    def pending(self) -> list[Key]:
        """Marked, and no removal under way: what `start` finishes."""
        return sorted(key for key in self._marked if key not in self._done)

    def hidden(self, namespace: str, container_id: str) -> bool:
        """Whether clients no longer see this container (it is being removed)."""
        return (namespace, container_id) in self._marked

    def mark(self, namespace: str, container_id: str) -> None:
        """Durably: from here on the removal is finished even if berthd dies."""
        directory = os.path.join(self.dir, namespace)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(directory, container_id), b"")
        self._marked.add((namespace, container_id))

    def _unmark(self, key: Key) -> None:
        path = os.path.join(self.dir, *key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        self._marked.discard(key)

    def start(self, nursery: trio.Nursery, key: Key, remove: Callable[[], Awaitable[None]]) -> None:
        """Carry out a marked removal in `nursery` (registered now: a create that comes
        before it runs waits for it too)."""
        if key not in self._done:
            self._done[key] = trio.Event()
            nursery.start_soon(self.run, key, remove)

    async def run(self, key: Key, remove: Callable[[], Awaitable[None]]) -> None:
        """Carry out a marked removal (`remove` deletes the task and the container); the
        mark goes once it succeeded. A failure is logged and the mark kept: the next
        create of that ID, or the next daemon, tries again."""
        done = self._done.setdefault(key, trio.Event())
        try:
            await remove()
        except Exception as exc:  # kept, reported, retried
            log.warning("removing container %s/%s: %s (will retry)", key[0], key[1], exc)
        else:
            self._unmark(key)
        finally:
            del self._done[key]
            done.set()

    async def settled(self, namespace: str, container_id: str) -> None:
        """Wait until a removal of this container under way is over."""
        done = self._done.get((namespace, container_id))
        if done is not None:
            await done.wait()
