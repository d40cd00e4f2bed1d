"""Event subscriptions carried from a berth-grpc being replaced to its successor.

containerd's Events/Subscribe has no way to resume: a client whose stream ends subscribes
again and gets what is published from then on. dockerd learns of every container exit
from that stream (it never calls Wait), so an exit published between the end of its old
stream and its new subscription would be lost to it for good. So a berth-grpc that is
replaced ends each Subscribe stream with UNAVAILABLE (dockerd subscribes again at once;
CANCELLED would make it stop), and first records where the stream was in berthd's event
numbering: (namespace, filters) -> (epoch, seq), or the time if it had delivered nothing.
The successor's next subscription with the same namespace and filters resumes there: no
event lost, none repeated. Entries live a minute; each is taken once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from berth.shim.fs import atomic_write

log = logging.getLogger("berth.grpc")

FILE = "grpc-events.json"
LIFETIME_NS = 60 * 10**9
MAX_ENTRIES = 256


@dataclass
class Cursor:
    """Where a subscription is in berthd's event numbering (updated as events pass)."""

    epoch: str | None = None
    seq: int | None = None
    since: int | None = None  # ns: resume from this time (no event seen yet)

    def params(self) -> dict[str, Any]:
        if self.epoch is not None and self.seq is not None:
            return {"epoch": self.epoch, "after_seq": self.seq}
        if self.since is not None:
            return {"since": self.since}
        return {}


class Handoff:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, FILE) if state_dir else ""
        self.closing = asyncio.Event()  # set when this front end is being replaced

    @staticmethod
    def key(namespace: str | None, filters: list[str]) -> str:
        return json.dumps([namespace or "", sorted(filters)])

    def take(self, key: str) -> Cursor:
        """The cursor a predecessor left for a subscription like this one (taken once),
        or a fresh one."""
        with self._locked():
            entries = self._read()
            for index, entry in enumerate(entries):
                if entry.get("key") == key:
                    del entries[index]
                    self._write(entries)
                    log.info("a subscription resumes where the previous berth-grpc left it")
                    return Cursor(entry.get("epoch"), entry.get("seq"), entry.get("since"))
        return Cursor()

    def leave(self, key: str, cursor: Cursor) -> None:
        """Record where a subscription ends (before its stream ends: the client's next
        subscription may reach the successor at once)."""
        if not self.path:
            return
        entry: dict[str, Any] = {"key": key, "written": time.time_ns()}
        if cursor.epoch is not None and cursor.seq is not None:
            entry.update(epoch=cursor.epoch, seq=cursor.seq)
        else:
            entry["since"] = cursor.since if cursor.since is not None else time.time_ns()
        with self._locked():
            self._write([*self._read(), entry][-MAX_ENTRIES:])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The file is read, changed and written by two processes at once (the one
        replaced leaves entries while its successor takes them): one at a time, or an
        entry written in between is lost."""
        if not self.path:
            yield
            return
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("cannot lock the subscriptions file: %s", exc)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a write of one small file
            yield
        finally:
            os.close(fd)

    def _read(self) -> list[dict[str, Any]]:
        if not self.path:
            return []
        try:
            with open(self.path, "rb") as f:
                entries = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            return []
        if not isinstance(entries, list):
            return []
        now = time.time_ns()
        return [
            e
            for e in entries
            if isinstance(e, dict)
            and isinstance(e.get("written"), int)
            and now - e["written"] < LIFETIME_NS
            and _valid(e)
        ]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        try:
            if entries:
                atomic_write(self.path, json.dumps(entries).encode(), mode=0o600)
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot record subscriptions for the next berth-grpc: %s", exc)


def _valid(entry: dict[str, Any]) -> bool:
    if not isinstance(entry.get("key"), str):
        return False
    if "seq" in entry:
        return isinstance(entry.get("epoch"), str) and type(entry.get("seq")) is int
    return type(entry.get("since")) is int
