"""Durable exit files: an exit status is on disk before anyone is told about it.

One small JSON file per process (`init.json`, `<exec-id>.json`) in the container's `exit/`
directory, written to a temporary name, fsynced, renamed, and the directory fsynced. A
reader therefore sees either no file or a complete one, after any crash. The shim removes
the file only when the process is deleted; a daemon that was down when the process exited
finds its status here even if the shim itself died since.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from berth.shim.fs import atomic_write, reserve

EXIT_FILE_VERSION = 1
MAX_EXIT_FILE = 4096


@dataclass(frozen=True, slots=True)
class ExitRecord:
    pid: int
    status: int
    exited_at: int  # nanoseconds since the epoch

    def to_wire(self) -> dict[str, int]:
        """As the API answers it (wait, delete) and events carry it."""
        return {"pid": self.pid, "exit_status": self.status, "exited_at": self.exited_at}

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> ExitRecord:
        return cls(doc.get("pid", 0), doc.get("exit_status", 0), doc.get("exited_at", 0))

    def to_json(self) -> dict[str, int]:
        return {
            "version": EXIT_FILE_VERSION,
            "pid": self.pid,
            "status": self.status,
            "exited_at": self.exited_at,
        }


def exit_path(directory: str, process: str) -> str:
    return os.path.join(directory, f"{process}.json")


def write_exit_file(directory: str, process: str, record: ExitRecord) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    atomic_write(exit_path(directory, process), json.dumps(record.to_json()).encode())


def reserve_exit_file(directory: str, process: str) -> None:
    """Preallocate the space `process`'s exit file will need, when the process is created,
    so that its status reaches the disk even if the disk is full by the time it exits."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    reserve(exit_path(directory, process), MAX_EXIT_FILE)


class CorruptExitFile(ValueError):
    pass


def read_exit_file(directory: str, process: str) -> ExitRecord | None:
    """The record, None when there is no file, CorruptExitFile when it cannot be trusted."""
    try:
        with open(exit_path(directory, process), "rb") as f:
            data = f.read(MAX_EXIT_FILE + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_EXIT_FILE:
        raise CorruptExitFile("exit file too large")
    try:
        doc = json.loads(data)
        version = doc["version"]
        if not isinstance(version, int) or version < 1:
            raise CorruptExitFile(f"bad exit file version {version!r}")
        # Newer versions only add fields; the three below are kept forever.
        pid, status, exited_at = doc["pid"], doc["status"], doc["exited_at"]
        if not all(isinstance(v, int) for v in (pid, status, exited_at)):
            raise CorruptExitFile("exit file fields must be integers")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        if isinstance(exc, CorruptExitFile):
            raise
        raise CorruptExitFile(f"unreadable exit file: {exc}") from None
    return ExitRecord(pid=pid, status=status, exited_at=exited_at)


DELETED_MARKER = "deleted"


def mark_deleted(bundle: str) -> None:
    """Record durably that the task of `bundle` was deleted (its exit files go next)."""
    atomic_write(os.path.join(bundle, DELETED_MARKER), b"")


def is_deleted(bundle: str) -> bool:
    return os.path.exists(os.path.join(bundle, DELETED_MARKER))


def remove_exit_file(directory: str, process: str) -> None:
    for path in (exit_path(directory, process), exit_path(directory, process) + ".tmp"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
