"""Nothing lost: output integrity across daemon kills, metadata durability, full disks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from berth.shim.wire.errors import BerthError
from tests.support.helpers import BERTH, Daemon, daemon_on_tmpfs, fill_disk, wait_until

STREAM_MIB = int(os.environ.get("BERTH_INTEGRITY_MIB", "256"))


def _stream(path: Path, mib: int) -> str:
    """A pseudo-random file of `mib` MiB (seeded: the same bytes every run); its sha256."""
    rng = random.Random(20261129)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = rng.randbytes(1 << 20)
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_output_survives_daemon_kills_in_log_and_fifo(daemon: Daemon) -> None:
    """A container writes a known stream (paced, so it lasts seconds) while berthd is killed
    and restarted several times: the shim's log file and an attached FIFO reader (a
    foreground `berth run`) both get exactly those bytes."""
    data = Path(daemon.dir, "data")
    data.mkdir()
    expected = _stream(data / "stream.bin", STREAM_MIB)
    # 1 MiB at a time with a pause: the stream takes several seconds to go by.
    script = (
        f"i=0; while [ $i -lt {STREAM_MIB} ]; do "
        "dd if=/data/stream.bin bs=1048576 skip=$i count=1 2>/dev/null; "
        "i=$((i+1)); sleep 0.01; done"
    )
    mount = f"type=bind,src={data},dst=/data,options=rbind:ro"
    daemon.cli(
        "run",
        "--busybox",
        "-d",
        "--mount",
        mount,
        "--log-max-size",
        str(1 << 30),
        "logged",
        "sh",
        "-c",
        script,
        check=True,
    )
    out_path = os.path.join(daemon.dir, "attached.out")
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    with open(out_path, "wb") as out:
        attached = subprocess.Popen(
            [BERTH, "run", "--busybox", "--rm", "--mount", mount, "fifo", "sh", "-c", script],
            stdout=out,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            for _ in range(4):
                time.sleep(0.7)
                daemon.kill9()
                time.sleep(0.3)
                daemon.start()
            assert attached.wait(timeout=600) == 0, attached.stderr.read()  # type: ignore[union-attr]
        finally:
            if attached.poll() is None:
                attached.kill()
                attached.wait()
    assert os.path.getsize(out_path) == STREAM_MIB << 20
    assert _sha256(out_path) == expected  # the FIFO reader got every byte, in order
    assert daemon.call("tasks.wait", {"container_id": "logged"})["exit_status"] == 0
    log = os.path.join(daemon.state, "tasks", daemon.namespace, "logged", "log", "stdout.log")
    assert _sha256(log) == expected  # and so did the log
    daemon.cli("tasks", "rm", "logged", check=True)


def test_kill9_during_metadata_writes_leaves_a_consistent_database(daemon: Daemon) -> None:
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            cid = f"m{i}"
            try:
                daemon.call(
                    "containers.create",
                    {"id": cid, "spec": {"process": {"args": ["true"]}}, "labels": {"n": str(i)}},
                )
                acknowledged.append(cid)
            except (BerthError, OSError):
                time.sleep(0.02)  # the daemon is down: try the next one

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            time.sleep(0.25)
            daemon.kill9()
            daemon.start()
    finally:
        stop.set()
        thread.join(30)
    with sqlite3.connect(os.path.join(daemon.root, "meta.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    present = {c["id"] for c in daemon.call("containers.list")["containers"]}
    assert set(acknowledged) <= present  # every acknowledged write survived
    assert len(acknowledged) > 10


def test_a_full_disk_gives_clear_errors_and_the_daemon_keeps_serving() -> None:
    with daemon_on_tmpfs("3m", extra_config="") as d:
        d.cli("run", "--busybox", "-d", "before", "sleep", "600", check=True)
        # fill the disk
        filler = Path(d.dir, "filler")
        fill_disk(filler)
        errors = []
        for i in range(3):
            try:
                d.call(
                    "containers.create",
                    {
                        "id": f"full{i}",
                        "spec": {"process": {"args": ["true"]}, "pad": "x" * 200_000},
                    },
                )
            except BerthError as exc:
                errors.append(exc)
        assert errors, "a full disk must fail a metadata write"
        for exc in errors:
            assert exc.code == "unavailable" and "no space left" in str(exc), exc
        r = d.cli("run", "--busybox", "-d", "during", "sleep", "600")
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
        # still serving what it can
        assert d.call("version")["protocol"] == 1
        assert d.call("tasks.get", {"container_id": "before"})["status"] == "running"
        filler.unlink()
        d.cli("run", "--busybox", "-d", "after", "sleep", "600", check=True)
        wait_until(
            lambda: (
                d is not None
                and d.call("tasks.get", {"container_id": "after"})["status"] == "running"
            )
        )


def test_berthd_restarts_on_a_full_root_and_manages_its_containers() -> None:
    """berthd killed, its root filesystem filled, berthd started again: it died of
    `database or disk is full` (it wrote its version into the database at every open,
    and dropped a predecessor's temporary leases as it started), and the running
    container could not be managed at all. Now opening writes nothing:
    it starts, reads work, writes fail with a typed one-line error, the container can be
    stopped and removed, and the daemon serves on."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="bt-fullroot-", dir="/tmp")
    root = os.path.join(base, "root")  # the root alone is small: the state dir is not full
    os.mkdir(root)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", root], check=True)
    d: Daemon | None = None
    try:
        d = Daemon(base_dir=base)
        d.cli("run", "--busybox", "-d", "keep", "sleep", "600", check=True)
        # as an import killed half-way leaves: the next start drops it (a write)
        d.cli("leases", "create", "--label", "berth.io/temporary=true", "--id", "tmp1", check=True)
        d.kill9()
        with contextlib.suppress(OSError), open(Path(root, "filler"), "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
        d.start()  # (raises with berthd's log if it exits)
        assert d.call("tasks.get", {"container_id": "keep"})["status"] == "running"
        assert [c["id"] for c in d.call("containers.list")["containers"]] == ["keep"]
        assert d.cli("namespaces", "ls").returncode == 0
        assert d.cli("leases", "ls", "-q").stdout.split() == [b"tmp1"]  # kept: it expires
        with pytest.raises(BerthError) as caught:
            d.call("containers.create", {"id": "more", "spec": {"process": {"args": ["true"]}}})
        assert caught.value.code == "unavailable" and "no space left" in str(caught.value)
        refused = d.cli("run", "--busybox", "-d", "more", "true")
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused
        assert d.cli("tasks", "kill", "-s", "SIGKILL", "keep").returncode == 0
        assert d.cli("tasks", "wait", "keep").stdout.strip() == b"137"
        assert d.cli("tasks", "rm", "keep").returncode == 0
        removed = d.cli("containers", "rm", "keep")
        assert removed.returncode == 0, removed.stderr
        assert d.call("containers.list")["containers"] == []
        assert d.call("version")["protocol"] == 1 and d.live_pids() == [d.pid]
        assert "Traceback" not in d.log_text()
    finally:
        try:
            if d is not None:
                d.cleanup()  # every process by pid (containers, shims, daemons), then files
        finally:
            subprocess.run(["umount", "-l", root], check=False)
            shutil.rmtree(base, ignore_errors=True)
