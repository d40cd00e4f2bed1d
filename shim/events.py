"""The shim's outgoing events, kept until the daemon acknowledges them.

containerd's shim retries an event five times and then drops it; about 15 s of daemon
downtime loses an exit. Here an event leaves the queue only when acknowledged. Whoever
subscribes (a restarted daemon, say) first receives every unacknowledged event, in order.
Delivery is therefore at-least-once; each event has a sequence number so a subscriber can
recognise a repeat. The queue stays small in practice: a process produces a handful of
events in its whole life, and its exit file is the durable record in any case.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_QUEUED = 100_000  # a backstop far above any real backlog; see `publish`


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    topic: str
    timestamp: int  # ns since the epoch
    payload: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "topic": self.topic,
            "timestamp": self.timestamp,
            "payload": self.payload,
        }


Subscriber = Callable[[Event], None]


class EventQueue:
    def __init__(self) -> None:
        self._seq = 0
        self._pending: deque[Event] = deque()
        self._subscriber: Subscriber | None = None
        self.overflowed = 0

    def publish(self, topic: str, payload: dict[str, Any]) -> Event:
        self._seq += 1
        event = Event(self._seq, topic, time.time_ns(), payload)
        self._pending.append(event)
        if len(self._pending) > MAX_QUEUED:
            # Only reachable if nobody acknowledges for a very long time while a client
            # drives the shim directly; exits stay recoverable from the exit files.
            self._pending.popleft()
            self.overflowed += 1
        if self._subscriber is not None:
            self._subscriber(event)
        return event

    def subscribe(self, subscriber: Subscriber) -> None:
        """Replace the subscriber (there is one daemon) and replay every unacked event."""
        self._subscriber = subscriber
        for event in list(self._pending):
            subscriber(event)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if self._subscriber is subscriber:
            self._subscriber = None

    def ack(self, seq: int) -> int:
        """Forget every event up to and including `seq`; return how many remain."""
        while self._pending and self._pending[0].seq <= seq:
            self._pending.popleft()
        return len(self._pending)

    @property
    def last_seq(self) -> int:
        return self._seq

    def pending(self) -> list[Event]:
        return list(self._pending)
