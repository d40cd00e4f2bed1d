"""The daemon's event exchange: publish envelopes, subscribe with containerd-style filters.

Filters use containerd's syntax, so the same strings work on both APIs:

    topic=="/tasks/exit"                  equality (also !=)
    namespace==moby,topic~=|^/tasks/|     comma = AND; ~= is a regular expression
    event.container_id==c1                fields of the event payload
    topic                                 the field is present

(daemon/filters.py parses them.)
Several filter strings are ORed. A subscriber that falls `QUEUE_SIZE` envelopes behind is
dropped (its stream ends with an error) rather than slowing the exchange: containerd does
the same. Nothing durable depends on this stream: exits are recoverable from the tasks API.

The exchange also keeps the last `HISTORY` envelopes. A subscriber may ask for those newer
than a timestamp (`since`): a client that was cut off by a daemon restart resubscribes with
the timestamp of the last envelope it saw, and receives what it missed, including the
exits that happened while the daemon was down (recovery publishes them with the time the
process really exited).

Every envelope also carries `seq`, a number that only grows, and `epoch`, the name of its
numbering; the history (with its numbering) passes from a daemon to its successor (an
upgrade, a standby's takeover). A client that resubscribes with `after_seq` and `epoch`
gets exactly what it has not seen: an exit a successor publishes after the handover keeps
the time it happened, which can be older than the last envelope the client saw, but its
`seq` is newer. A daemon restarted without a predecessor's history starts a new epoch;
a client of another epoch then gets the whole history (all of it is new to it).

A client may publish its own events (containerd's Events/Publish and Forward): an opaque
typed payload (`type_url`, `value` in base64) under a topic of containerd's form. They are
outside berthd's record of itself: marked `published`, not numbered (no `seq`/`epoch`: a
client's event must never take a number that a successor gives again, which would make
resuming subscribers skip a real exit), not kept in the history (containerd keeps none:
no replay, and no client can fill berthd's memory with them), and sent only to
subscribers that ask for them (`with_published`; berth-grpc and the CLI do), so that
berthd's own consumers and older clients never act on a forged `/tasks/exit`. They may
fill at most PUBLISHED_SHARE of a subscriber's queue; beyond that they are not sent to
it (counted), so a burst of them never drops a subscriber that berthd's own events reach.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import trio

from berth.daemon.filters import Predicate, parse_event_filters
from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.names import IDENTIFIER_MAX, is_identifier

HISTORY = 4096
QUEUE_SIZE = HISTORY  # a `since` replay of the whole history must fit
PUBLISHED_SHARE = 1024  # queued envelopes past which a client's events are not sent
Envelope = dict[str, Any]
__all__ = [
    "Exchange",
    "Predicate",
    "Subscription",
    "check_topic",
    "parse_event_filters",
]


def check_identifier(value: str, what: str) -> None:
    if len(value) > IDENTIFIER_MAX:
        raise InvalidArgument(f"{what} {value[:80]!r}...: longer than {IDENTIFIER_MAX} characters")
    if not is_identifier(value):
        raise InvalidArgument(
            f"{what} {value!r} must be letters and digits, joined by single '.', '_' or '-'"
        )


def check_topic(topic: str) -> None:
    """containerd's rule for a published topic: `/a/b.c`, each component an identifier."""
    if not topic.startswith("/"):
        raise InvalidArgument(f"topic {topic!r} must start with '/'")
    if topic == "/":
        raise InvalidArgument("topic '/' must have at least one component")
    for component in topic[1:].split("/"):
        check_identifier(component, f"topic {topic!r}: component")


class Subscription:
    def __init__(
        self, exchange: Exchange, predicate: Predicate, *, with_published: bool = False
    ) -> None:
        self._exchange = exchange
        self.predicate = predicate
        self.with_published = with_published  # also the events clients publish
        self.send, self.receive = trio.open_memory_channel[Envelope](QUEUE_SIZE)
        self.overflowed = False

    def close(self) -> None:
        self._exchange._subscribers.discard(self)
        self.send.close()


class Exchange:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._history: deque[Envelope] = deque(maxlen=HISTORY)
        self._seq = 0
        self.epoch = uuid.uuid4().hex[:12]
        # Counters for berthd's metrics (plain ints: free when metrics are off).
        self.published = 0
        self.replayed = 0  # envelopes sent again to a resubscriber (since / after_seq)
        self.dropped = 0  # envelopes a subscriber could not take: it was dropped
        self.published_by_clients = 0
        self.published_not_sent = 0  # a client's events past a subscriber's PUBLISHED_SHARE

    def subscribe(
        self,
        filters: list[str],
        since: int | None = None,
        after_seq: int | None = None,
        epoch: str | None = None,
        *,
        with_published: bool = False,
    ) -> Subscription:
        """A new subscription; with `since` (ns) or `after_seq` (of `epoch`), first the
        remembered envelopes newer than that. No await separates replay and registration,
        so nothing falls between. `with_published`: the events clients publish too."""
        sub = Subscription(self, parse_event_filters(filters), with_published=with_published)
        if after_seq is not None and epoch is not None and epoch != self.epoch:
            after_seq = 0  # another numbering: everything here is new to that client
        if since is not None or after_seq is not None:
            for envelope in self._history:
                newer = (since is None or envelope["timestamp"] > since) and (
                    after_seq is None or envelope["seq"] > after_seq
                )
                if newer and sub.predicate(envelope):
                    try:
                        sub.send.send_nowait(envelope)
                    except trio.WouldBlock:
                        sub.overflowed = True
                        self.dropped += 1
                        break
                    self.replayed += 1
        self._subscribers.add(sub)
        return sub

    def publish(
        self, namespace: str, topic: str, event: dict[str, Any], timestamp: int | None = None
    ) -> Envelope:
        """An event of berthd's own objects: numbered, remembered, sent to every subscriber."""
        self._seq += 1
        envelope = {
            "timestamp": timestamp or time.time_ns(),
            "namespace": namespace,
            "topic": topic,
            "event": event,
            "seq": self._seq,
            "epoch": self.epoch,
        }
        self._history.append(envelope)
        self.published += 1
        self._send(envelope, published=False)
        return envelope

    def publish_for_client(
        self, namespace: str, topic: str, event: dict[str, Any], timestamp: int | None = None
    ) -> Envelope:
        """A client's own event (see the module docstring): not numbered, not remembered."""
        envelope = {
            "timestamp": timestamp or time.time_ns(),
            "namespace": namespace,
            "topic": topic,
            "event": event,
            "published": True,
        }
        self.published_by_clients += 1
        self._send(envelope, published=True)
        return envelope

    def _send(self, envelope: Envelope, *, published: bool) -> None:
        for sub in list(self._subscribers):
            if published and not sub.with_published:
                continue
            if not sub.predicate(envelope):
                continue
            if published and sub.send.statistics().current_buffer_used >= PUBLISHED_SHARE:
                self.published_not_sent += 1
                continue
            try:
                sub.send.send_nowait(envelope)
            except trio.WouldBlock:
                sub.overflowed = True
                self.dropped += 1
                sub.close()
            except trio.ClosedResourceError:
                self._subscribers.discard(sub)

    def history(self) -> list[Envelope]:
        """What a successor takes over (see the module docstring)."""
        return list(self._history)

    def inherit(self, history: list[Envelope]) -> None:
        """Take over a predecessor's history and its numbering (before anything is
        published here)."""
        valid = [e for e in history if isinstance(e, dict) and isinstance(e.get("seq"), int)]
        if not valid:
            return
        self._history.extend(valid[-HISTORY:])
        self._seq = max([self._seq, *(e["seq"] for e in valid)])
        if isinstance(valid[-1].get("epoch"), str):
            self.epoch = valid[-1]["epoch"]

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
