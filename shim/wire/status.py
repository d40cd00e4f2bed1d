"""Task states, exit statuses and event topics: the vocabulary a shim and berthd share,
defined once."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    from typing import Final


# A process's states (containerd's names).
CREATED: Final = "created"
RUNNING: Final = "running"
PAUSED: Final = "paused"
STOPPED: Final = "stopped"

UNKNOWN_EXIT: Final = 255  # containerd's status when the real one cannot be known

# Topics a shim publishes; berthd publishes each under containerd's name (DAEMON_TOPICS).
TASK_CREATE: Final = "task.create"
TASK_START: Final = "task.start"
TASK_EXIT: Final = "task.exit"
TASK_OOM: Final = "task.oom"
TASK_PAUSED: Final = "task.paused"
TASK_RESUMED: Final = "task.resumed"
TASK_DELETE: Final = "task.delete"
EXEC_ADDED: Final = "exec.added"
EXEC_STARTED: Final = "exec.started"
EXEC_EXIT: Final = "exec.exit"

DAEMON_TOPICS: Final = {
    TASK_CREATE: "/tasks/create",
    TASK_START: "/tasks/start",
    TASK_EXIT: "/tasks/exit",
    EXEC_EXIT: "/tasks/exit",
    TASK_OOM: "/tasks/oom",
    TASK_PAUSED: "/tasks/paused",
    TASK_RESUMED: "/tasks/resumed",
    TASK_DELETE: "/tasks/delete",
    EXEC_ADDED: "/tasks/exec-added",
    EXEC_STARTED: "/tasks/exec-started",
}


# A container's process list crosses from a shim to berthd as 4 bytes a pid (little-endian
# unsigned; Linux pids are below 2**22), not a map per process: a 1 MiB shim frame then
# holds ~260,000 processes instead of ~60,000.
def pack_pids(pids: list[int]) -> bytes:
    import array
    import sys

    packed = array.array("I", pids)  # OverflowError for a pid that is not a u32
    if packed.itemsize != 4:  # pragma: no cover - every Linux ABI berth runs on has 4
        raise OverflowError("unsigned int is not 4 bytes here")
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def unpack_pids(data: bytes) -> list[int]:
    """ValueError if `data` is not a whole number of pids."""
    import array
    import sys

    if len(data) % 4:
        raise ValueError(f"a packed pid list of {len(data)} bytes")
    packed = array.array("I")
    packed.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        packed.byteswap()
    return packed.tolist()
