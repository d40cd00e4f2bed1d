"""The shim's on-disk record (`shim.json` in the container's directory), versioned.

A restarted (or upgraded) daemon finds its shims by reading these files. Rules for
versions: a newer writer only *adds* fields; a reader accepts any version >= 1 and
ignores fields it does not know; a field's meaning never changes within a major version.
`start_time` (clock ticks since boot, /proc/<pid>/stat field 22) guards against pid
reuse: a pid whose start time differs is not this shim.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from berth.shim.fs import atomic_write

STATE_FILE = "shim.json"
STATE_VERSION = 1
MAX_STATE_FILE = 64 * 1024


class CorruptState(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ShimRecord:
    version: int
    pid: int
    start_time: int
    address: str
    protocol: int
    id: str
    namespace: str
    bundle: str
    runtime: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "pid": self.pid,
            "start_time": self.start_time,
            "address": self.address,
            "protocol": self.protocol,
            "id": self.id,
            "namespace": self.namespace,
            "bundle": self.bundle,
            "runtime": self.runtime,
        }


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None if there is no such process. Any other
    failure (out of descriptors: EMFILE) is raised: "cannot tell" is not "gone", and a
    daemon that took a live shim for dead would clean its container up."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def write_state(bundle: str, record: ShimRecord) -> None:
    atomic_write(os.path.join(bundle, STATE_FILE), json.dumps(record.to_json()).encode())


def read_state(bundle: str) -> ShimRecord | None:
    """The record, None if absent, CorruptState if unusable (the caller skips it)."""
    path = os.path.join(bundle, STATE_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_STATE_FILE:
        raise CorruptState(f"{path}: larger than {MAX_STATE_FILE} bytes")
    try:
        doc = json.loads(data)
        runtime = doc.get("runtime") if isinstance(doc, dict) else None
        if not isinstance(doc, dict):
            raise CorruptState(f"{path}: not a JSON object")
        version = doc.get("version")
        if not isinstance(version, int) or version < 1:
            raise CorruptState(f"{path}: unknown version {version!r}")
        record = ShimRecord(
            version=version,
            pid=_int(doc, "pid"),
            start_time=_int(doc, "start_time"),
            address=_str(doc, "address"),
            protocol=_int(doc, "protocol"),
            id=_str(doc, "id"),
            namespace=_str(doc, "namespace"),
            bundle=_str(doc, "bundle"),
            runtime=runtime if isinstance(runtime, dict) else {},
        )
        if record.pid <= 1 or record.start_time <= 0:
            raise CorruptState(f"{path}: pid {record.pid} / start_time {record.start_time}")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        if isinstance(exc, CorruptState):
            raise
        raise CorruptState(f"{path}: {exc}") from None
    return record


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CorruptState(f"{key} must be an integer")
    return value


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise CorruptState(f"{key} must be a string")
    return value
