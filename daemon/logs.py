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

import contextlib
import contextvars
import json
import logging
import sys
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


def setup(level: str, log_format: str) -> None:
    """Configure the root logger on stderr: `level` by name, `log_format` "text" or "json"
    (config.LOG_FORMATS, validated by the caller). In JSON, Python's warnings join the
    log, which no line of plain text may break."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
