"""What a hostile container, a hostile image and an unlucky operator can do (round 2).

Each test is the regression test of one finding of the second hardening round: it failed
on the code before the fix. Real daemons, real runc, real overlay mounts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.shim.fs import remove_tree
from berth.shim.mount import mount_points_under
from berth.shim.wire.client import Client
from berth.shim.wire.errors import InvalidArgument, Unavailable
from tests.support.helpers import (
    BERTH,
    BERTHD,
    Daemon,
    daemon_on_tmpfs,
    fill_disk,
    is_gone,
    kill,
    wait_until,
)
from tests.support.images import build_oci_archive

pytestmark = pytest.mark.container


def tar_of(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644) -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def deep_layer(depth: int) -> bytes:
    """A layer holding one directory chain `depth` levels deep."""
    path, entries = "deep", []
    for _ in range(depth):
        entries.append(member(path, tarfile.DIRTYPE, mode=0o755))
        path += "/d"
    return tar_of(*entries)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bt-hostile-", dir="/tmp"))
    try:
        yield path
    finally:
        remove_tree(str(path))


def import_image(daemon: Daemon, archive: str) -> None:
    result = daemon.cli("images", "import", archive)
    assert result.returncode == 0, result.stderr.decode()


def snapshot_dirs(daemon: Daemon) -> list[str]:
    return sorted(os.listdir(Path(daemon.root, "snapshots", "overlayfs", "snapshots")))


# --- 1. trees of any depth -----------------------------------------------------------------


def test_a_1500_level_image_layer_is_removed_and_the_daemon_restarts(
    daemon: Daemon, busybox_rootfs: str, work: Path
) -> None:
    archive = str(work / "deep.tar")
    build_oci_archive(
        busybox_rootfs, archive, name="docker.io/library/deep:1", raw_layers=[deep_layer(1500)]
    )
    import_image(daemon, archive)
    assert snapshot_dirs(daemon)
    assert daemon.cli("images", "rm", "deep:1").returncode == 0
    gc = daemon.call("gc", {})
    assert gc["errors"] == [], gc
    assert gc["removed"]["snapshots"] == 2, gc
    assert snapshot_dirs(daemon) == []
    daemon.restart()
    assert daemon.call("version")["version"]


def test_a_container_that_digs_2100_levels_deep_is_removed_and_the_daemon_restarts(
    daemon: Daemon, busybox_rootfs: str, work: Path
) -> None:
    archive = str(work / "plain.tar")
    build_oci_archive(busybox_rootfs, archive, name="docker.io/library/plain:1")
    import_image(daemon, archive)
    # Two 1,050-level chains, one moved into the other's deepest directory: 2,101 levels,
    # past both Python's recursion limit and PATH_MAX (no path names the deepest ones).
    dig = (
        "cd /tmp && p=d && i=1 && while [ $i -lt 1050 ]; do p=$p/d; i=$((i+1)); done &&"
        " mkdir -p a/$p b/$p && mv a b/$p/ && echo dug"
    )
    run = daemon.cli("run", "--user", "1000", "plain:1", "digger", "sh", "-c", dig)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"dug\n"
    assert daemon.cli("tasks", "rm", "digger").returncode == 0
    removed = daemon.cli("containers", "rm", "digger")
    assert removed.returncode == 0, removed.stderr.decode()
    assert daemon.cli("images", "rm", "plain:1").returncode == 0
    assert daemon.call("gc", {})["errors"] == []
    assert snapshot_dirs(daemon) == []
    daemon.restart()
    assert daemon.call("version")["version"]


def test_a_start_up_cleanup_that_fails_on_one_item_logs_it_and_carries_on(
    daemon: Daemon, work: Path
) -> None:
    """A leftover snapshot dir that cannot be removed (here: something is mounted inside
    it) must neither stop berthd from starting nor be deleted through the mount."""
    daemon.terminate()
    data = Path(daemon.root, "snapshots", "overlayfs", "snapshots")
    stuck = data / "9999" / "fs" / "mnt"
    stuck.mkdir(parents=True)
    (data / "9998" / "fs").mkdir(parents=True)  # an ordinary leftover next to it
    shown = work / "shown"
    shown.mkdir()
    (shown / "precious").write_text("keep me")
    subprocess.run(["mount", "--bind", str(shown), str(stuck)], check=True)
    try:
        daemon.start()
        assert daemon.call("version")["version"]
        assert (shown / "precious").read_text() == "keep me"
        assert snapshot_dirs(daemon) == ["9999"]
        assert "cannot remove snapshot directory" in daemon.log_text()
    finally:
        subprocess.run(["umount", str(stuck)], check=True)


# --- 2. files read from a rootfs -----------------------------------------------------------


def test_an_image_whose_passwd_and_group_are_fifos_gets_a_clear_error_at_once(
    daemon: Daemon, busybox_rootfs: str, work: Path
) -> None:
    """Each call used to hang a worker thread for ever in open(2) of the FIFO; 41 of them
    used up trio's thread pool and every later run and import hung too."""
    archive = str(work / "fifo.tar")
    fifos = tar_of(
        member("etc/passwd", tarfile.FIFOTYPE, mode=0o644),
        member("etc/group", tarfile.FIFOTYPE, mode=0o644),
    )
    build_oci_archive(busybox_rootfs, archive, name="docker.io/library/fifo:1", raw_layers=[fifos])
    import_image(daemon, archive)
    with daemon.client() as client:
        client.call("images.unpack", {"name": "docker.io/library/fifo:1"})
    for i in range(45):  # more than trio's 40 worker threads
        with daemon.client() as client:
            client._sock.settimeout(10)  # a hang fails the test instead of hanging it
            with pytest.raises(InvalidArgument, match="/etc/passwd is not a regular file"):
                client.call(
                    "images.spec",
                    {"image": "docker.io/library/fifo:1", "id": f"f{i}", "user": "nobody"},
                )
    run = daemon.cli("run", "--rm", "--user", "nobody", "fifo:1", "f-run", "true", timeout=20)
    assert run.returncode == 1
    assert b"/etc/passwd is not a regular file" in run.stderr
    # The daemon still serves everything else: an import and a run.
    plain = str(work / "plain.tar")
    build_oci_archive(busybox_rootfs, plain, name="docker.io/library/plain:2")
    import_image(daemon, plain)
    ok = daemon.cli("run", "--rm", "plain:2", "ok", "echo", "fine", timeout=30)
    assert (ok.returncode, ok.stdout) == (0, b"fine\n"), ok.stderr.decode()


# --- 11. deep nesting and hostile patterns ------------------------------------------------


def test_deeply_nested_requests_and_filters_are_invalid_arguments(daemon: Daemon) -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}}
    node = spec
    for _ in range(1000):
        node["x"] = {}
        node = node["x"]
    with daemon.client() as client:
        with pytest.raises(InvalidArgument, match="nest deeper"):
            client.call("containers.create", {"container": {"id": "deep", "spec": spec}})
        with pytest.raises(InvalidArgument, match="bad regular expression"):
            for _ in client.stream("events.subscribe", {"filters": ["topic~=" + "(" * 1000]}):
                pass
        assert client.call("containers.list", {})["containers"] == []
        assert client.call("version")["version"]


def test_a_pathological_filter_regex_cannot_stall_the_event_loop(daemon: Daemon) -> None:
    """`(a|a)*$` backtracks 2^n steps on n a's and a b with Python's re, inside berthd's
    event loop (for every publish, and for every replayed event). RE2 (containerd's regexp
    syntax and semantics) is linear."""
    since = time.time_ns()
    spec = {"process": {"args": ["true"]}}
    with daemon.client() as client:
        client.call("containers.create", {"container": {"id": "a" * 60 + "b", "spec": spec}})
        client.call("containers.create", {"container": {"id": "aaa", "spec": spec}})
    with daemon.client() as subscriber, daemon.client() as client:
        subscriber._sock.settimeout(10)  # a stalled loop fails the test instead of hanging it
        client._sock.settimeout(10)
        events = subscriber.stream(
            "events.subscribe", {"filters": ['event.id~="^(a|a)*$"'], "since": since}
        )
        try:
            first = next(events)
            assert (first["topic"], first["event"]["id"]) == ("/containers/create", "aaa")
            client.call("containers.create", {"container": {"id": "a" * 59 + "c", "spec": spec}})
            assert client.call("version")["version"]
        finally:
            events.close()


# --- 3. a daemon that does not answer ---------------------------------------------------


def test_the_cli_gives_up_on_a_stopped_daemon_but_long_calls_stay_open(daemon: Daemon) -> None:
    started = daemon.cli("run", "--busybox", "-d", "sleeper", "sh", "-c", "sleep 1; exit 7")
    assert started.returncode == 0, started.stderr.decode()
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    waiter = subprocess.Popen(
        [BERTH, "--timeout", "2", "tasks", "wait", "sleeper"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.3)
        kill(daemon.pid, signal.SIGSTOP)
        try:
            for argv in (["version"], ["tasks", "ls"]):
                began = time.monotonic()
                result = daemon.cli("--timeout", "2", *argv, timeout=30)
                assert result.returncode == 1
                assert b"does not answer" in result.stderr, result.stderr
                assert time.monotonic() - began < 10
            # a long call does not give up: the container's exit is still to come
            time.sleep(4)
            assert waiter.poll() is None, waiter.communicate()
        finally:
            kill(daemon.pid, signal.SIGCONT)
        out, err = waiter.communicate(timeout=30)
        assert (waiter.returncode, out) == (0, b"7\n"), err
    finally:
        if waiter.poll() is None:
            kill(waiter.pid)
            waiter.wait()


def test_a_stream_notices_a_daemon_that_stops_answering(daemon: Daemon) -> None:
    with Client(daemon.address, timeout=1.0, keepalive=0.5) as client:
        events = client.stream("events.subscribe", {})
        kill(daemon.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(Unavailable, match="does not answer"):
                next(events)
            assert time.monotonic() - began < 5
        finally:
            kill(daemon.pid, signal.SIGCONT)
    # A live daemon answers the pings: a quiet stream stays open for many keepalive periods.
    since = time.time_ns()
    with daemon.client() as other:
        other.call("namespaces.create", {"name": "n1" + daemon.namespace[2:]})
    with Client(daemon.address, timeout=1.0, keepalive=0.2) as client:
        events = client.stream("events.subscribe", {"since": since})
        assert next(events)["topic"] == "/namespaces/create"  # replayed: subscribed now
        later = threading.Timer(
            2.0, daemon.call, ("namespaces.create", {"name": "n2" + daemon.namespace[2:]})
        )
        later.start()
        try:
            assert next(events)["event"]["name"] == "n2" + daemon.namespace[2:]
        finally:
            later.join()
            events.close()


# --- 6. an exit status on a full disk ------------------------------------------------------


def test_an_exit_status_reaches_a_full_disk_and_survives_the_shim(work: Path) -> None:
    """The exit file's space is reserved when the task is created: a container that exits
    on a full state dir, while berthd is down, with its shim killed afterwards, still
    reports its true status (was 255: the write failed with ENOSPC)."""
    with daemon_on_tmpfs("4m") as d:
        gate = work / "gate"
        gate.mkdir()
        script = "while [ ! -e /gate/go ]; do sleep 0.05; done; exit 42"
        mount = f"type=bind,src={gate},dst=/gate"
        started = d.cli("run", "--busybox", "-d", "--mount", mount, "c42", "sh", "-c", script)
        assert started.returncode == 0, started.stderr.decode()
        pid = d.call("tasks.get", {"container_id": "c42"})["pid"]
        shim = d.shim_pids()["c42"]
        d.kill9()
        filler = Path(d.dir, "filler")
        fill_disk(filler)
        (gate / "go").touch()
        wait_until(lambda: is_gone(pid), what="the container to exit and be reaped")
        # The shim writes the exit file right after it reaps: killing it in between would
        # test that window, not the full disk.
        exit_file = Path(d.dir, "state", "tasks", d.namespace, "c42", "exit", "init.json")
        wait_until(  # reaped first, then written: the file may not be there yet
            lambda: exit_file.exists() and b'"status": 42' in exit_file.read_bytes(),
            what="the exit file",
        )
        kill(shim)
        wait_until(lambda: is_gone(shim), what="the shim to die")
        filler.unlink()
        d.start()
        with d.client() as client:
            assert client.call("tasks.wait", {"container_id": "c42"})["exit_status"] == 42


# --- 4, 5, 10. an unlucky operator -------------------------------------------------------


def test_a_second_daemon_on_the_same_root_is_refused_naming_the_first(daemon: Daemon) -> None:
    started = daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600")
    assert started.returncode == 0, started.stderr.decode()
    other_state = tempfile.mkdtemp(prefix="bt-other-", dir="/tmp")
    try:
        second = subprocess.run(
            [BERTHD, "--root", daemon.root, "--state", other_state],
            capture_output=True,
            timeout=30,
        )
        assert second.returncode == 1
        message = second.stderr.decode()
        assert f"the root {daemon.root} is in use by another berthd (pid {daemon.pid}" in message
        assert len(message.strip().splitlines()) == 1, message
        assert daemon.call("containers.get", {"id": "kept"})["id"] == "kept"
        assert daemon.call("tasks.get", {"container_id": "kept"})["status"] == "running"
    finally:
        remove_tree(other_state)


def test_a_lost_database_next_to_data_is_an_error_not_a_fresh_start(
    daemon: Daemon, busybox_rootfs: str, work: Path
) -> None:
    archive = str(work / "plain.tar")
    build_oci_archive(busybox_rootfs, archive, name="docker.io/library/plain:3")
    import_image(daemon, archive)
    started = daemon.cli("run", "-d", "plain:3", "survivor", "sleep", "600")
    assert started.returncode == 0, started.stderr.decode()
    pid = daemon.call("tasks.get", {"container_id": "survivor"})["pid"]
    daemon.kill9()
    db = Path(daemon.root, "meta.db")
    with contextlib.closing(sqlite3.connect(db)) as conn:  # everything into meta.db itself
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    saved = db.read_bytes()
    for damage in ("garbage", "truncated", "deleted"):
        for p in db.parent.glob("meta.db-*"):
            p.unlink()
        if damage == "garbage":
            db.write_bytes(b"this is not a database" * 100)
        elif damage == "truncated":
            db.write_bytes(saved[: len(saved) // 2])
        else:
            db.unlink()
        result = subprocess.run(
            [BERTHD, "--config", daemon.config_path], capture_output=True, timeout=30
        )
        message = result.stderr.decode()
        assert result.returncode == 1, message
        assert len(message.strip().splitlines()) == 1, message
        assert str(db) in message and "--rebuild-metadata" in message, message
        assert "Traceback" not in message
        assert not is_gone(pid)  # nothing was touched: the container runs on
    # the explicit rebuild: the running task is manageable again, nothing is collected
    daemon.start_with("--rebuild-metadata")
    assert "rebuild:" in daemon.log_text()
    assert daemon.call("containers.get", {"id": "survivor"})["snapshot_key"] == "survivor"
    leases = daemon.call("leases.list", {})["leases"]
    assert [lease["id"].startswith("rebuilt-") for lease in leases] == [True]
    assert daemon.call("gc", {})["removed"]["snapshots"] == 0
    assert not is_gone(pid)
    assert daemon.cli("tasks", "rm", "-f", "survivor").returncode == 0
    assert daemon.cli("containers", "rm", "survivor").returncode == 0


def test_root_state_and_databases_are_private_whatever_existed(tmp_path: Path) -> None:
    base = tempfile.mkdtemp(prefix="bt-modes-", dir="/tmp")
    for name in ("root", "state"):
        os.mkdir(os.path.join(base, name), 0o755)
        os.chmod(os.path.join(base, name), 0o755)
    d = Daemon(base_dir=base)
    try:
        started = d.cli("run", "--busybox", "-d", "--env", "SECRET=s3cr3t", "c1", "sleep", "60")
        assert started.returncode == 0, started.stderr.decode()
        d.terminate()
        os.chmod(Path(d.root, "meta.db"), 0o644)  # as an older berthd left it
        d.start()
        assert os.stat(d.root).st_mode & 0o777 == 0o700
        assert os.stat(d.state).st_mode & 0o777 == 0o711
        private = [Path(d.root, "uuid"), *Path(d.root).glob("**/*.db*")]
        private += [p for p in Path(d.state, "tasks").glob("**/*") if p.is_file()]
        assert len(private) > 5
        for path in private:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
        # The task tree is traversable, never listable (a user-namespaced container's root
        # reaches its bundle through it); the bundles themselves are private.
        traversable = {Path(d.state, "tasks"), Path(d.state, "tasks", d.namespace)}
        for path in [*Path(d.state).iterdir(), *Path(d.state, "tasks").glob("*/*")]:
            if path.is_dir():
                mode = path.stat().st_mode & 0o077
                assert mode == (0o011 if path in traversable else 0), f"{path} is {oct(mode)}"
        assert Path(d.state, "tasks", d.namespace, "c1").is_dir()
    finally:
        d.cleanup()


# --- 7, 8. what a crash in the middle of an import leaves ----------------------------------


@pytest.fixture(scope="module")
def big_image(busybox_rootfs: str) -> Iterator[str]:
    """busybox plus a 48 MiB layer of random bytes (gzip cannot shrink it): an import
    that takes long enough to be killed in the middle, while writing and while unpacking."""
    work = tempfile.mkdtemp(prefix="bt-big-", dir="/tmp")
    try:
        rng = random.Random(9)
        payload = rng.randbytes(48 << 20)
        layer = tar_of(member("big.bin", data=payload))
        archive = os.path.join(work, "big.tar")
        build_oci_archive(
            busybox_rootfs, archive, name="docker.io/library/big:1", raw_layers=[layer]
        )
        yield archive
    finally:
        remove_tree(work)


def _import_until(daemon: Daemon, archive: str, cut: Any) -> None:
    """Start importing `archive`, kill -9 the daemon once `cut()` holds, restart it."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    cli = subprocess.Popen(
        [BERTH, "images", "import", archive],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(cut, timeout=60, interval=0.002, what="the import to get far enough")
        daemon.kill9()
    finally:
        cli.kill()
        cli.wait()
    daemon.start()


def test_a_crash_during_an_unpack_leaves_no_mount_behind(daemon: Daemon, big_image: str) -> None:
    mounts = Path(daemon.state, "mounts")
    _import_until(daemon, big_image, lambda: mount_points_under(str(mounts)))
    assert mount_points_under(str(mounts)) == []
    assert os.listdir(mounts) == []
    assert "released 1 mount(s)" in daemon.log_text()
    # and the store is whole: the import runs again to the end
    again = daemon.cli("images", "import", big_image, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert daemon.call("gc", {})["errors"] == []


def test_a_partial_ingest_of_a_dead_import_expires_and_gc_reclaims_it(
    busybox_rootfs: str, big_image: str
) -> None:
    daemon = Daemon(extra_config="[content]\ningest_expiry = 2\n")
    try:
        ingests = Path(daemon.root, "content", "ingest")

        def written() -> int:
            total = 0
            for data in ingests.glob("*/data"):
                with contextlib.suppress(FileNotFoundError):  # committed since the glob
                    total += data.stat().st_size
            return total

        _import_until(daemon, big_image, lambda: written() >= 8 << 20)
        listed = daemon.cli("content", "ingests", "--format", "json")
        assert listed.returncode == 0, listed.stderr.decode()
        (ingest,) = json.loads(listed.stdout)
        assert ingest["offset"] >= 8 << 20
        # its temporary lease died with the daemon: nothing holds it once it is stale
        assert daemon.call("leases.list", {})["leases"] == []
        time.sleep(2.5)
        wait_until(lambda: not list(ingests.iterdir()), timeout=10, what="GC to reclaim it")
        assert json.loads(daemon.cli("content", "ingests", "--format", "json").stdout) == []
        # abort by hand, for an ingest nobody holds
        with daemon.client() as client:
            client.call("content.write.open", {"ref": "by-hand"})
            client.call("content.write.chunk", {"ref": "by-hand", "data": b"x" * 1000, "offset": 0})
        aborted = daemon.cli("content", "abort", "by-hand")
        assert aborted.returncode == 0, aborted.stderr.decode()
        assert not list(ingests.iterdir())
    finally:
        daemon.cleanup()


# --- 9. sparse files, and deletes on a full disk -----------------------------------------


def test_a_sparse_layer_stays_sparse_and_deletes_work_on_a_full_disk(
    busybox_rootfs: str, work: Path
) -> None:
    """A 10 GiB sparse file in a 1 MB layer was written out in full and filled the disk;
    and then leases rm, snapshots rm and gc failed with ENOSPC too."""
    source = work / "sparse"
    source.mkdir()
    with open(source / "big", "wb") as f:
        f.truncate(10 << 30)
        f.seek(5000 << 20)
        f.write(random.Random(1).randbytes(1 << 20))
    layer = subprocess.run(
        ["tar", "--sparse", "--format=posix", "-cf", "-", "-C", str(source), "big"],
        check=True,
        capture_output=True,
    ).stdout
    assert len(layer) < 2 << 20
    archive = str(work / "sparse.tar")
    build_oci_archive(
        busybox_rootfs, archive, name="docker.io/library/sparse:1", raw_layers=[layer]
    )
    with daemon_on_tmpfs("48m") as d:
        import_image(d, archive)
        (big,) = Path(d.root, "snapshots", "overlayfs", "snapshots").glob("*/fs/big")
        assert big.stat().st_size == 10 << 30
        assert big.stat().st_blocks * 512 <= 2 << 20
        probe = d.cli(
            "run",
            "--rm",
            "sparse:1",
            "probe",
            "sh",
            "-c",
            "stat -c %s /big; dd if=/big bs=1048576 skip=5000 count=1 2>/dev/null | md5sum",
        )
        expected = hashlib.md5(random.Random(1).randbytes(1 << 20)).hexdigest()
        assert probe.stdout.decode().split() == [str(10 << 30), expected, "-"], probe.stderr
        # now fill the disk, then free it in-band
        with d.client() as client:
            chain = client.call("images.spec", {"image": "docker.io/library/sparse:1", "id": "x"})
            lease = client.call("leases.create", {"id": "held"})["id"]
            client.call(
                "snapshots.prepare", {"key": "k1", "parent": chain["chain_id"]}, lease=lease
            )
        filler = Path(d.dir, "filler")
        fill_disk(filler, b"\1")
        for argv in (
            ["images", "rm", "sparse:1"],
            ["leases", "rm", "held"],
            ["snapshots", "rm", "k1"],
            ["gc"],
        ):
            result = d.cli(*argv)
            assert result.returncode == 0, (argv, result.stderr.decode())
        assert not list(Path(d.root, "snapshots", "overlayfs", "snapshots").iterdir())
        assert not Path(d.root, "reserve").exists()  # it was spent
        filler.unlink()
        assert d.cli("gc").returncode == 0
        assert Path(d.root, "reserve").stat().st_size == 8 << 20  # and taken again


# --- 13. a run whose output goes to a file ---------------------------------------------


def test_run_into_a_file_shared_by_stdout_and_stderr_keeps_every_line(
    daemon: Daemon, work: Path
) -> None:
    """`scripts/demo > log 2>&1` printed nothing for its first container: the CLI's stderr
    copy rewound the shared offset (see test_units), and the next line overwrote it. The
    container closes its stdout early so that the stderr copy is the one to finish last."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    log = work / "log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        result = subprocess.run(
            [
                BERTH,
                "run",
                "--busybox",
                "--rm",
                "shared",
                "sh",
                "-c",
                "echo out; exec 1>&-; sleep 0.5; echo err >&2",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            timeout=60,
        )
        os.write(fd, b"next\n")  # what the shell's next command writes
    finally:
        os.close(fd)
    assert result.returncode == 0
    assert log.read_bytes() == b"out\nerr\nnext\n"


def test_a_cli_started_with_its_stdio_closed_works(daemon: Daemon) -> None:
    """With fd 0 closed the daemon socket became fd 0, and the stdin copy read the
    daemon's replies (the CLI hung)."""
    env = dict(os.environ, BERTH_ADDRESS=daemon.address, BERTH_NAMESPACE=daemon.namespace)
    result = subprocess.run(
        [BERTH, "run", "--busybox", "--rm", "closed", "echo", "hi"],
        env=env,
        capture_output=True,
        timeout=60,
        preexec_fn=lambda: os.close(0),
    )
    assert (result.returncode, result.stdout) == (0, b"hi\n"), result.stderr
