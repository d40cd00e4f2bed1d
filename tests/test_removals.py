"""`berth run --rm` answers with the exit status and berthd removes the rest behind it
(`containers.delete` with `with_task` and `background`: daemon/removals.py): the promise of
`--rm` holds (the container and its task are gone for clients at once, its snapshot and
shim soon after), a create of the same ID waits for the removal, and a removal that a
daemon marked but did not finish is finished by the next one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from berth.shim.wire.errors import FailedPrecondition, NotFound
from tests.support.helpers import Daemon, wait_until
from tests.support.images import build_oci_archive

pytestmark = pytest.mark.container

IMAGE = "docker.io/library/busybox:latest"


def _ids(daemon: Daemon, *verb: str) -> list[str]:
    return daemon.cli(*verb, "ls", "-q", check=True).stdout.decode().split()


def _snapshots(daemon: Daemon) -> list[str]:
    listed = daemon.call("snapshots.list", {"snapshotter": "overlayfs"})
    return [s["name"] for s in listed["snapshots"] if s["kind"] == "active"]


def test_run_rm_answers_first_and_leaves_nothing(daemon: Daemon, busybox_rootfs: str) -> None:
    archive = os.path.join(daemon.dir, "image.tar")
    build_oci_archive(busybox_rootfs, archive, name=IMAGE)
    daemon.cli("images", "import", archive, check=True)
    for i in range(3):  # the same ID at once again: each create waits for the removal
        r = daemon.cli("run", "--rm", IMAGE, "same", "sh", "-c", f"echo run{i}; exit 3")
        assert r.returncode == 3 and r.stdout == f"run{i}\n".encode(), r.stderr
        # gone for clients the moment `run` returned
        assert "same" not in _ids(daemon, "containers")
        assert "same" not in _ids(daemon, "tasks")
        with pytest.raises(NotFound):
            daemon.call("containers.get", {"id": "same"})
    # and soon on disk too: no snapshot, no shim, no mark
    wait_until(lambda: _snapshots(daemon) == [], what="the writable snapshots removed")
    wait_until(lambda: daemon.shim_pids() == {}, what="the shims gone")
    wait_until(lambda: not any(Path(daemon.root, "removing").glob("*/*")), what="no marks left")


def test_a_namespace_is_deleted_right_after_run_rm(daemon: Daemon) -> None:
    """`run --rm` then `namespaces rm`: the removal left behind is waited for, not
    reported as a container or task the namespace still holds."""
    namespace = daemon.namespace + "x"
    for i in range(3):
        daemon.cli("-n", namespace, "run", "--rm", "--busybox", f"n{i}", "true", check=True)
        daemon.call("namespaces.delete", {"name": namespace})
        with pytest.raises(NotFound):
            daemon.call("namespaces.get", {"name": namespace})


def test_a_running_task_is_not_removed_behind(daemon: Daemon) -> None:
    daemon.cli("run", "-d", "--busybox", "up", "sleep", "600", check=True)
    try:
        with pytest.raises(FailedPrecondition, match="has not stopped"):
            daemon.call("containers.delete", {"id": "up", "with_task": True, "background": True})
        with pytest.raises(FailedPrecondition, match="has a task"):
            daemon.call("containers.delete", {"id": "up"})
        assert _ids(daemon, "containers") == ["up"]
        assert daemon.call("tasks.get", {"container_id": "up"})["status"] == "running"
    finally:
        daemon.cli("tasks", "rm", "-f", "up")
        daemon.cli("containers", "rm", "up")


def test_a_removal_a_daemon_did_not_finish_is_finished_by_the_next(daemon: Daemon) -> None:
    """What a berthd killed right after it marked a removal leaves: the mark, the
    container, its exited task and shim. The next berthd finishes the removal, and the
    container is never seen again in between."""
    daemon.cli("run", "--busybox", "left", "true", check=True)  # exited, not removed
    shim = daemon.shim_pids()["left"]
    daemon.kill9()
    mark = Path(daemon.root, "removing", daemon.namespace, "left")
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_bytes(b"")
    daemon.start()
    assert "left" not in _ids(daemon, "containers")
    wait_until(lambda: not mark.exists(), what="the removal finished")
    with pytest.raises(NotFound):
        daemon.call("tasks.get", {"container_id": "left"})
    wait_until(lambda: "left" not in daemon.shim_pids(), what=f"the shim {shim} gone")
    daemon.cli("run", "--rm", "--busybox", "left", "true", check=True)  # the ID is free


def test_run_rm_through_daemon_kills_leaves_nothing(daemon: Daemon) -> None:
    """`run --rm` again and again while berthd is killed (-9) at random moments (before,
    during and after the removal it leaves behind): afterwards no container, task, shim,
    writable snapshot or mark is left, and every run that answered gave its status."""
    import random
    import subprocess
    import time

    from tests.support.helpers import BERTH

    rng = random.Random(int(os.environ.get("BERTH_CHAOS_SEED", "1414")))
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    kills = answered = 0
    for i in range(int(os.environ.get("BERTH_RM_CHAOS_CYCLES", "40"))):
        cid = f"r{i % 4}"  # IDs come back: a create waits for (or finishes) the removal
        run = subprocess.Popen(
            [BERTH, "run", "--rm", "--busybox", cid, "sh", "-c", "exit 7"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.15))
                daemon.kill9()
                kills += 1
                daemon.start()
            code = run.wait(60)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        if code == 7:
            answered += 1
        else:  # cut by a kill: whatever it left is a container of that ID, maybe stopped
            assert code == 1, (code, run.stderr.read() if run.stderr else b"")
            daemon.cli("tasks", "rm", "-f", cid)
            daemon.cli("containers", "rm", cid)
        if run.stderr:
            run.stderr.close()
    print(f"\n{answered} runs answered, {kills} kills of berthd")
    assert answered > 0
    wait_until(lambda: _ids(daemon, "containers") == [], what="no container left")
    assert _ids(daemon, "tasks") == []
    wait_until(lambda: daemon.shim_pids() == {}, what="no shim left")
    wait_until(lambda: not any(Path(daemon.root, "removing").glob("*/*")), what="no mark left")
    assert daemon.container_pids() == []
