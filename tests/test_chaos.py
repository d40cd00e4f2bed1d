"""Chaos: a hypothesis state machine drives real containers while killing the daemon and
shims at any point. Invariants after every step: every exit status reported is the
process's real one, no task is lost or stuck, no shim outlives its task, no zombie, and the
daemon's metadata agrees with the model.

Bounded in CI; BERTH_CHAOS_EXAMPLES / BERTH_CHAOS_STEPS make a long run (scripts/soak).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from berth.shim.wire.errors import BerthError
from tests.support.helpers import Daemon, is_gone, process_state, wait_until

EXAMPLES = int(os.environ.get("BERTH_CHAOS_EXAMPLES", "3"))
STEPS = int(os.environ.get("BERTH_CHAOS_STEPS", "14"))
UNKNOWN = 255  # a task whose shim was killed: containerd's "unknown" status

# Exits 7 on SIGTERM (its trap), runs until then.
LONG = 'trap "exit 7" TERM; while true; do sleep 0.05; done'


@dataclass
class Box:
    id: str
    pid: int
    shim: int
    expected: int | None = None  # the exit status it must report, once known
    short: bool = False  # exits on its own after a moment (with `expected`)
    finished: bool = False  # its exit has been observed through wait
    deleted: bool = False


class Chaos(RuleBasedStateMachine):
    boxes = Bundle("boxes")

    def __init__(self) -> None:
        super().__init__()
        self.d = Daemon()
        self.model: dict[str, Box] = {}
        self.n = 0
        self.daemon_kills = 0

    def teardown(self) -> None:
        self.d.cleanup()

    def _task(self, cid: str) -> dict[str, Any]:
        return self.d.call("tasks.get", {"container_id": cid})

    # -- rules

    @rule(target=boxes, short=st.booleans(), code=st.integers(0, 9))
    def create(self, short: bool, code: int) -> Box:
        self.n += 1
        cid = f"b{self.n}"
        script = f"sleep 0.2; exit {code}" if short else LONG
        self.d.cli("run", "--busybox", "-d", cid, "sh", "-c", script, check=True)
        task = self._task(cid)
        box = Box(
            cid, task["pid"], self.d.shim_pids()[cid], expected=code if short else None, short=short
        )
        self.model[cid] = box
        return box

    @rule(box=boxes, code=st.integers(0, 9))
    def exec_into(self, box: Box, code: int) -> None:
        if box.deleted or box.short or box.expected is not None:
            return
        r = self.d.cli(
            "tasks", "exec", "--exec-id", f"e{self.n}", box.id, "sh", "-c", f"exit {code}"
        )
        assert r.returncode == code, r.stderr

    @rule(box=boxes, sig=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
    def kill(self, box: Box, sig: int) -> None:
        if box.deleted or box.short or box.expected is not None:
            return
        self.d.call("tasks.kill", {"container_id": box.id, "signal": int(sig)})
        box.expected = 7 if sig == signal.SIGTERM else 137

    @rule(box=boxes)
    def wait(self, box: Box) -> None:
        if box.deleted or box.expected is None:
            return
        result = self.d.call("tasks.wait", {"container_id": box.id})
        assert result["exit_status"] == box.expected, (box, result)
        box.finished = True

    @rule(box=boxes)
    def delete(self, box: Box) -> None:
        if box.deleted or not box.finished:
            return
        result = self.d.call("tasks.delete", {"container_id": box.id})
        assert result["exit_status"] == box.expected
        self.d.call("containers.delete", {"id": box.id})
        box.deleted = True
        wait_until(lambda: is_gone(box.shim) and is_gone(box.pid), what=f"{box.id} gone")

    @rule()
    def kill9_daemon(self) -> None:
        self.d.kill9()
        self.daemon_kills += 1
        self.d.start()

    @rule(box=boxes)
    def kill9_shim(self, box: Box) -> None:
        if box.deleted or box.short or box.expected is not None:
            return
        os.kill(box.shim, signal.SIGKILL)
        box.expected = UNKNOWN

    @precondition(lambda self: self.model)
    @rule()
    def sigterm_mid_request(self) -> None:
        """A request in flight when the daemon is told to stop: it may fail, nothing else."""
        done = threading.Event()

        def busy() -> None:
            try:
                for _ in range(20):
                    self.d.call("tasks.list")
                    self.d.call("containers.list")
            except (BerthError, OSError):
                pass
            finally:
                done.set()

        worker = threading.Thread(target=busy)
        worker.start()
        os.kill(self.d.pid, signal.SIGTERM)
        wait_until(lambda: is_gone(self.d.pid), what="berthd to stop on SIGTERM")
        worker.join(30)
        self.daemon_kills += 1
        self.d.start()

    # -- invariants

    @invariant()
    def metadata_agrees_with_the_model(self) -> None:
        live = {b.id for b in self.model.values() if not b.deleted}
        containers = {c["id"] for c in self.d.call("containers.list")["containers"]}
        tasks = {t["id"]: t for t in self.d.call("tasks.list")["tasks"]}
        assert containers == live, (containers, live)
        assert set(tasks) == live, (set(tasks), live)  # no task lost, none left over
        for cid in live:
            box, task = self.model[cid], tasks[cid]
            if box.expected is None:
                assert task["status"] == "running", task  # nothing stopped it
                assert task["pid"] == box.pid
            elif task["status"] == "stopped" and (box.finished or box.expected == UNKNOWN):
                assert task["exit_status"] == box.expected, (box, task)

    @invariant()
    def no_zombie_and_no_stray_shim(self) -> None:
        for box in self.model.values():
            if box.deleted:
                assert is_gone(box.shim) and is_gone(box.pid)

        def settled() -> bool:
            return all(process_state(p) != "Z" for p in self.d.descendants())

        wait_until(settled, timeout=5, what="no zombie below the test reaper")


TestChaos = Chaos.TestCase
TestChaos.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
