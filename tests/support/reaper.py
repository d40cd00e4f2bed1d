"""A minimal init for tests: run a command as a child subreaper and reap every orphan.

The shims a test daemon starts are detached (double fork), so they are reparented to the
nearest subreaper, or to pid 1. On a machine whose pid 1 does not reap (these sandboxes),
every exited shim would stay a zombie. Each test daemon therefore runs under this reaper,
which is what systemd or tini is for a real installation. It exits once its last child
(the daemon, every shim, every orphaned container process) is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    argv = sys.argv[1:]
    child = os.fork()
    if child == 0:
        os.execvp(argv[0], argv)

    def forward(signo: int, _frame: object) -> None:
        try:
            os.kill(child, signo)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
