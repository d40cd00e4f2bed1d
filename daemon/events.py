"""The daemon's event exchange: publish envelopes, subscribe with containerd-style filters.

Filters use containerd's syntax, so the same strings work on both APIs:

    topic=="/tasks/exit"                  equality (also !=)
    namespace==moby,topic~=|^/tasks/|     comma = AND; ~= is a regular expression
    event.container_id==c1                fields of the event payload
    topic                                 the field is present

Several filter strings are ORed. A subscriber that falls `QUEUE_SIZE` envelopes behind is
dropped (its stream ends with an error) rather than slowing the exchange: containerd does
the same. Nothing durable depends on this stream: exits are recoverable from the tasks API.

The exchange also keeps the last `HISTORY` envelopes. A subscriber may ask for those newer
than a timestamp (`since`): a client that was cut off by a daemon restart resubscribes with
the timestamp of the last envelope it saw, and receives what it missed, including the
exits that happened while the daemon was down (recovery publishes them with the time the
process really exited).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from berth.shim.errors import InvalidArgument

HISTORY = 4096
QUEUE_SIZE = HISTORY  # a `since` replay of the whole history must fit
MAX_FILTER_LEN = 4096

Envelope = dict[str, Any]
Predicate = Callable[[Envelope], bool]


@dataclass(frozen=True)
class _Selector:
    path: tuple[str, ...]
    op: str  # "", "==", "!=", "~="
    value: str
    regex: re.Pattern[str] | None

    def matches(self, envelope: Envelope) -> bool:
        present, value = _lookup(envelope, self.path)
        if self.op == "":
            return present
        text = "" if value is None else str(value)
        if self.op == "==":
            return present and text == self.value
        if self.op == "!=":
            return not present or text != self.value
        assert self.regex is not None
        return present and self.regex.search(text) is not None


def _lookup(envelope: Envelope, path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = envelope
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def parse_filter(text: str) -> Predicate:
    """Parse one containerd filter string into a predicate on envelopes."""
    if len(text) > MAX_FILTER_LEN:
        raise InvalidArgument("filter too long")
    selectors: list[_Selector] = []
    i, n = 0, len(text)

    def error(msg: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {text!r} at {i}: {msg}")

    while i < n:
        while i < n and text[i].isspace():
            i += 1
        start = i
        while i < n and (text[i].isalnum() or text[i] in "._-"):
            i += 1
        path = text[start:i]
        if not path or path.startswith(".") or path.endswith(".") or ".." in path:
            raise error("expected a field name")
        while i < n and text[i].isspace():
            i += 1
        op, value, regex = "", "", None
        if text.startswith(("==", "!=", "~="), i):
            op = text[i : i + 2]
            i += 2
            while i < n and text[i].isspace():
                i += 1
            if i < n and text[i] in '"|':
                quote = text[i]
                i += 1
                chars = []
                while i < n and text[i] != quote:
                    # In |...| (regular expressions) only \| is an escape, so \d and
                    # friends reach the regex intact; in "..." a backslash escapes anything.
                    if text[i] == "\\" and i + 1 < n and (quote == '"' or text[i + 1] == "|"):
                        i += 1
                    chars.append(text[i])
                    i += 1
                if i >= n:
                    raise error("unterminated quoted value")
                i += 1
                value = "".join(chars)
            else:
                start = i
                while i < n and text[i] != "," and not text[i].isspace():
                    i += 1
                value = text[start:i]
            if op == "~=":
                try:
                    regex = re.compile(value)
                except re.error as exc:
                    raise error(f"bad regular expression: {exc}") from None
        while i < n and text[i].isspace():
            i += 1
        if i < n:
            if text[i] != ",":
                raise error("expected ','")
            i += 1
        selectors.append(_Selector(tuple(path.split(".")), op, value, regex))
    if not selectors:
        return lambda envelope: True
    return lambda envelope: all(s.matches(envelope) for s in selectors)


def parse_filters(filters: list[str]) -> Predicate:
    """OR of several filter strings; no filters match everything."""
    predicates = [parse_filter(f) for f in filters]
    if not predicates:
        return lambda envelope: True
    return lambda envelope: any(p(envelope) for p in predicates)


class Subscription:
    def __init__(self, exchange: Exchange, predicate: Predicate) -> None:
        self._exchange = exchange
        self.predicate = predicate
        self.send, self.receive = trio.open_memory_channel[Envelope](QUEUE_SIZE)
        self.overflowed = False

    def close(self) -> None:
        self._exchange._subscribers.discard(self)
        self.send.close()


class Exchange:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._history: deque[Envelope] = deque(maxlen=HISTORY)
        self.published = 0

    def subscribe(self, filters: list[str], since: int | None = None) -> Subscription:
        """A new subscription; with `since` (ns), first the remembered envelopes newer
        than that. No await separates replay and registration, so nothing falls between."""
        sub = Subscription(self, parse_filters(filters))
        if since is not None:
            for envelope in self._history:
                if envelope["timestamp"] > since and sub.predicate(envelope):
                    try:
                        sub.send.send_nowait(envelope)
                    except trio.WouldBlock:
                        sub.overflowed = True
                        break
        self._subscribers.add(sub)
        return sub

    def publish(
        self, namespace: str, topic: str, event: dict[str, Any], timestamp: int | None = None
    ) -> Envelope:
        envelope = {
            "timestamp": timestamp or time.time_ns(),
            "namespace": namespace,
            "topic": topic,
            "event": event,
        }
        self.published += 1
        self._history.append(envelope)
        for sub in list(self._subscribers):
            if not sub.predicate(envelope):
                continue
            try:
                sub.send.send_nowait(envelope)
            except trio.WouldBlock:
                sub.overflowed = True
                sub.close()
            except trio.ClosedResourceError:
                self._subscribers.discard(sub)
        return envelope

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
