"""containerd's own `ctr` (Debian's containerd 1.6 package, its CLI only) driving berth
through berth-grpc: image import and unpack over Content/Snapshots/Diff, containers and
tasks over Containers/Tasks, with rootfs mounts passed in Tasks/Create."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from berth.daemon.tasks.rootfs import build_busybox_rootfs
from tests.support.clients import CTR, Ctr, frontend_pids, grpc_address, grpc_daemon
from tests.support.helpers import is_gone, process_state, wait_until
from tests.support.images import build_oci_archive

pytestmark = pytest.mark.container

IMAGE = "docker.io/library/busybox:ctr"


@pytest.fixture(scope="module")
def ctr() -> Iterator[Ctr]:
    if not os.path.exists(CTR):
        pytest.fail("ctr is not installed (scripts/setup installs containerd)")
    daemon = grpc_daemon()
    work = tempfile.mkdtemp(prefix="bt-img-", dir="/tmp")
    try:
        rootfs = build_busybox_rootfs(os.path.join(work, "rootfs"))
        archive = os.path.join(work, "busybox-oci.tar")
        build_oci_archive(rootfs, archive, name=IMAGE)
        client = Ctr(daemon)
        imported = client("images", "import", archive)
        assert imported.returncode == 0, imported.stderr
        assert "unpacking" in imported.stdout and "done" in imported.stdout
        yield client
    finally:
        daemon.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def _ok(ctr: Ctr, *args: str) -> str:
    result = ctr(*args)
    assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stderr}"
    return result.stdout


def _run(ctr: Ctr, container_id: str, *args: str) -> list[str]:
    return [
        "run",
        "--fifo-dir",
        ctr.fifo_dir,
        "--cgroup",
        ctr.cgroup(container_id),
        *args,
    ]


def test_images_ls_and_snapshots(ctr: Ctr) -> None:
    listing = _ok(ctr, "images", "ls")
    assert IMAGE in listing and "linux/amd64" in listing
    snapshots = _ok(ctr, "snapshots", "ls")
    assert "Committed" in snapshots  # the unpacked layer, as ctr's unpack committed it
    # the same image and snapshot through berth's own API: one state, two front doors
    images = ctr.daemon.call("images.list")["images"]
    assert [i["name"] for i in images] == [IMAGE]


def test_run_rm_echo_and_exit_code(ctr: Ctr) -> None:
    out = ctr(*_run(ctr, "r1", "--rm", IMAGE, "r1", "echo", "hi"))
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    out = ctr(*_run(ctr, "r2", "--rm", IMAGE, "r2", "sh", "-c", "exit 5"))
    assert out.returncode == 5, out.stderr
    assert _ok(ctr, "containers", "ls", "-q") == ""  # --rm removed both


def test_runtimes_are_resolved_when_the_task_is_created(ctr: Ctr) -> None:
    """As containerd: a container may name any runtime (its task's create fails if the
    runtime is not there, and ctr's clean-up after a failed `run --rm` then finds the
    container and its snapshot to remove, so the same id runs at once); the path of
    containerd's runc shim runs the container with runc."""
    _ok(ctr, "containers", "create", "--runtime", "io.containerd.runsc.v1", IMAGE, "rt-other")
    assert "rt-other" in _ok(ctr, "containers", "ls")
    _ok(ctr, "containers", "rm", "rt-other")
    failed = ctr(
        *_run(
            ctr, "rt-retry", "--rm", "--runtime", "io.containerd.nope.v2", IMAGE, "rt-retry", "true"
        )
    )
    assert failed.returncode != 0 and "unknown runtime" in failed.stderr, failed.stderr
    again = ctr(*_run(ctr, "rt-retry", "--rm", IMAGE, "rt-retry", "echo", "ok"))
    assert (again.returncode, again.stdout) == (0, "ok\n"), again.stderr
    shim = "/usr/bin/containerd-shim-runc-v2"
    by_path = ctr(
        *_run(ctr, "rt-path", "--rm", "--runtime", shim, IMAGE, "rt-path", "echo", "path")
    )
    assert (by_path.returncode, by_path.stdout) == (0, "path\n"), by_path.stderr


def test_task_create_event_names_the_rootfs_mounts(ctr: Ctr) -> None:
    """`ctr events` during a `ctr run`: the /tasks/create event names the rootfs mounts
    the task was created with (the snapshot's overlay), as containerd's TaskCreate."""
    events = subprocess.Popen(
        [CTR, "-a", grpc_address(ctr.daemon), "-n", ctr.daemon.namespace, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(0.5)  # subscribed before the run
        out = ctr(*_run(ctr, "evr", "--rm", IMAGE, "evr", "true"))
        assert out.returncode == 0, out.stderr
        time.sleep(0.5)
    finally:
        events.terminate()
        printed, _ = events.communicate(timeout=10)
    line = next(x for x in printed.splitlines() if "/tasks/create" in x and '"evr"' in x)
    created = json.loads(line[line.index("{") :])
    assert [m["type"] for m in created["rootfs"]] == ["overlay"], created
    assert any(o.startswith("lowerdir=") for o in created["rootfs"][0]["options"]), created


def test_detached_task_operations(ctr: Ctr) -> None:
    _ok(
        ctr,
        *_run(
            ctr,
            "d1",
            "-d",
            IMAGE,
            "d1",
            "sh",
            "-c",
            'trap "exit 3" TERM; while true; do sleep 0.1; done',
        ),
    )
    listing = _ok(ctr, "tasks", "ls")
    line = next(ln for ln in listing.splitlines() if ln.startswith("d1 "))
    pid = int(line.split()[1])
    assert "RUNNING" in line and process_state(pid) not in (None, "Z")

    out = ctr(
        "tasks", "exec", "--fifo-dir", ctr.fifo_dir, "--exec-id", "e1", "d1", "echo", "from-exec"
    )
    assert (out.returncode, out.stdout) == (0, "from-exec\n"), out.stderr

    assert str(pid) in _ok(ctr, "tasks", "ps", "d1")

    _ok(ctr, "tasks", "pause", "d1")
    assert "PAUSED" in _ok(ctr, "tasks", "ls")
    _ok(ctr, "tasks", "resume", "d1")
    assert "RUNNING" in _ok(ctr, "tasks", "ls")

    metrics = _ok(ctr, "tasks", "metrics", "d1")
    assert "memory.usage" in metrics and "pids.current" in metrics

    _ok(ctr, "tasks", "kill", "d1")  # SIGTERM by default -> exit 3
    wait_until(lambda: "STOPPED" in _ok(ctr, "tasks", "ls"), what="task to stop")
    assert ctr.daemon.call("tasks.get", {"container_id": "d1"})["exit_status"] == 3
    wait_until(lambda: is_gone(pid) or process_state(pid) == "Z", what="init gone")
    _ok(ctr, "tasks", "rm", "d1")
    _ok(ctr, "containers", "rm", "d1")
    assert "d1" not in _ok(ctr, "containers", "ls", "-q")


def test_an_exec_reads_its_stdin_to_the_end_of_a_pipe(ctr: Ctr) -> None:
    """`echo abc | ctr tasks exec ... cat` ends when ctr closes its end of the stdin FIFO
    (ctr calls no CloseIO), as on containerd, whose shim does not hold an exec's stdin
    open: berth's did, and `cat` waited for input forever. The init's stdin is still held
    (`ctr run -d` must not end it), as containerd holds it."""
    _ok(ctr, *_run(ctr, "in1", "-d", IMAGE, "in1", "sleep", "1000"))
    try:
        # (Not empty input: ctr may close its end before opening it, and then neither
        # containerd nor berth sees a writer come and go; both wait.)
        for exec_id, data in (("x1", "abc\n"), ("x3", "line\n" * 20000)):
            out = subprocess.run(
                [
                    CTR,
                    "-a",
                    grpc_address(ctr.daemon),
                    "-n",
                    ctr.daemon.namespace,
                    "tasks",
                    "exec",
                    "--fifo-dir",
                    ctr.fifo_dir,
                    "--exec-id",
                    exec_id,
                    "in1",
                    "cat",
                ],
                input=data,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert (out.returncode, out.stdout) == (0, data), out.stderr
        pid = ctr.daemon.call("tasks.get", {"container_id": "in1"})["pid"]
        assert process_state(pid) not in (None, "Z")  # the init's own stdin did not end
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", "in1")
        wait_until(lambda: "STOPPED" in _ok(ctr, "tasks", "ls"), what="in1 to stop")
        _ok(ctr, "tasks", "rm", "in1")
        _ok(ctr, "containers", "rm", "in1")


def test_images_rm(ctr: Ctr) -> None:
    other = "docker.io/library/busybox:other"
    _ok(ctr, "images", "tag", IMAGE, other)
    assert other in _ok(ctr, "images", "ls", "-q")
    _ok(ctr, "images", "rm", other)
    assert other not in _ok(ctr, "images", "ls", "-q")
    assert IMAGE in _ok(ctr, "images", "ls", "-q")


def test_images_mount_and_unmount(ctr: Ctr) -> None:
    """`ctr images mount` names its lease after the mount point (a path: not an identifier;
    containerd takes any lease id): berth refused it. The image's files are there, and
    `unmount --rm` takes the view and the lease away."""
    target = tempfile.mkdtemp(prefix="bt-mnt-", dir="/tmp")
    try:
        out = _ok(ctr, "images", "mount", IMAGE, target)
        assert target in out
        assert os.path.exists(os.path.join(target, "bin", "busybox"))
        leases = _ok(ctr, "leases", "ls")
        assert target in leases and f"containerd.io/gc.ref.snapshot.overlayfs={target}" in leases
        assert target in _ok(ctr, "snapshots", "ls")
        _ok(ctr, "images", "unmount", "--rm", target)
        assert not os.path.ismount(target)
        assert target not in _ok(ctr, "leases", "ls")
        wait_until(lambda: target not in _ok(ctr, "snapshots", "ls"), what="the view collected")
    finally:
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        shutil.rmtree(target, ignore_errors=True)


def test_berth_grpc_logs_each_call_at_debug_not_each_frame(ctr: Ctr) -> None:
    """At `log_level = "debug"` (the tests' daemons), berth-grpc logs each call's method,
    status and time; h2's and hpack's own debug lines (per frame, per header block) stay
    out of the log."""
    _ok(ctr, "version")
    log = ctr.daemon.log_text()
    assert "containerd.services.version.v1.Version/Version: OK in" in log
    assert "Decoding b'" not in log and "Encoded header block" not in log
    assert "hpack" not in log


def test_grpc_front_end_is_a_separate_process(ctr: Ctr) -> None:
    """berth-grpc holds protobuf (and serves gRPC with h2, without grpcio, on one thread);
    berthd itself loads neither."""
    maps = Path(f"/proc/{ctr.daemon.pid}/maps").read_text()
    assert "grpc" not in maps
    assert "_upb" not in maps
    fronts = frontend_pids(ctr.daemon)
    assert len(fronts) == 1
    front_maps = Path(f"/proc/{fronts[0]}/maps").read_text()
    assert "_upb" in front_maps  # protobuf's C module: the messages are decoded here
    assert "cygrpc" not in front_maps
    assert os.listdir(f"/proc/{fronts[0]}/task") == [str(fronts[0])]  # single-threaded
